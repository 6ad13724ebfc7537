// Models and providers: the catalog (provider, deployment, price, fallbacks) and each
// provider's connectivity test (POST /v1/providers/{name}/test: status and latency).

import { get, p, post } from "../api.js";
import { h, replace } from "../dom.js";
import * as fmt from "../format.js";
import { errorBox, writeButton } from "../widgets/common.js";

function priceText(price) {
  if (!price) return null;
  const parts = [`in $${price.input}`];
  if (price.cached_input !== undefined && price.cached_input !== null) parts.push(`cached $${price.cached_input}`);
  if (price.cache_write !== undefined && price.cache_write !== null) parts.push(`cache write $${price.cache_write}`);
  parts.push(`out $${price.output}`);
  return parts.join(" · ");
}

function credentialText(provider) {
  if (provider.api_key_env) return `env ${provider.api_key_env}`;
  if (provider.api_key_file) return `file ${provider.api_key_file}`;
  return "none";
}

export function render(main, context) {
  const error = errorBox();
  const providersBox = h("div", { class: "table-scroll" });
  const modelsBox = h("div", { class: "table-scroll" });
  const testAll = writeButton(context, "Test every provider", () => testEvery(), { class: "secondary" });
  main.append(
    error.element,
    h(
      "section",
      { class: "panel" },
      h("div", { class: "panel-head" }, h("h2", {}, "Providers"), testAll),
      h("p", { class: "help" }, "Test reaches the provider with its credential (a model list read) from this replica; the credential is never shown."),
      providersBox,
    ),
    h(
      "section",
      { class: "panel" },
      h("h2", {}, "Models"),
      h("p", { class: "help" }, "Prices are USD per million tokens. A model without a price in the catalog is priced from the public price table (genai-prices) when its name is known there. Status is its provider's last test."),
      modelsBox,
    ),
  );

  const results = new Map(); // provider -> {state: "testing"|"done"|"error", test?, message?}
  const statusCells = new Map(); // provider -> [cells to update]
  let providers = [];
  let models = [];

  function statusNode(name) {
    const result = results.get(name);
    if (!result) return h("span", { class: "badge status-unknown" }, "not tested");
    if (result.state === "testing") return h("span", { class: "badge status-pending" }, "testing…");
    if (result.state === "error") return h("span", { class: "badge status-error" }, result.message);
    const test = result.test;
    return h(
      "span",
      {},
      h("span", { class: `badge ${test.ok ? "status-ok" : "status-error"}` }, test.ok ? "ok" : "failed"),
      " ",
      h("span", { class: "sub" }, [test.status ? `HTTP ${test.status}` : "no answer", test.latency_ms !== null ? fmt.ms(test.latency_ms) : null].filter(Boolean).join(" · ")),
      test.error ? h("div", { class: "sub error-text" }, test.error) : null,
    );
  }

  function refreshStatus(name) {
    for (const cell of statusCells.get(name) || []) replace(cell, statusNode(name));
  }

  function statusCell(name, attrs = {}) {
    const cell = h("td", { ...attrs, dataset: { status: name } }, statusNode(name));
    if (!statusCells.has(name)) statusCells.set(name, []);
    statusCells.get(name).push(cell);
    return cell;
  }

  async function test(name) {
    results.set(name, { state: "testing" });
    refreshStatus(name);
    try {
      const answer = await post(p`/v1/providers/${name}/test`);
      results.set(name, { state: "done", test: answer.test });
      context.announce(`Provider ${name}: ${answer.test.ok ? "ok" : "failed"}${answer.test.latency_ms !== null ? `, ${fmt.ms(answer.test.latency_ms)}` : ""}.`, answer.test.ok ? "ok" : "error");
    } catch (exc) {
      results.set(name, { state: "error", message: exc.message });
    }
    refreshStatus(name);
  }

  async function testEvery() {
    await Promise.all(providers.map((provider) => test(provider.name)));
  }

  function draw() {
    statusCells.clear();
    replace(
      providersBox,
      h(
        "table",
        { class: "data", "data-testid": "providers-table" },
        h("caption", { class: "visually-hidden" }, "Providers"),
        h("thead", {}, h("tr", {}, ["Name", "Type", "Base URL", "Credential", "Timeout", "Models", "Status", ""].map((t) => h("th", { scope: "col" }, t || h("span", { class: "visually-hidden" }, "Actions"))))),
        h(
          "tbody",
          {},
          providers.map((provider) =>
            h(
              "tr",
              { dataset: { provider: provider.name } },
              h("th", { scope: "row" }, provider.name),
              h("td", {}, provider.type),
              h("td", {}, h("code", {}, provider.base_url || "–")),
              h("td", {}, credentialText(provider)),
              h("td", {}, provider.timeout || "–"),
              h("td", { class: "num" }, String(models.filter((m) => m.provider === provider.name).length)),
              statusCell(provider.name),
              h("td", {}, writeButton(context, "Test", () => test(provider.name), { class: "secondary small", "aria-label": `Test provider ${provider.name}` })),
            ),
          ),
        ),
      ),
    );
    const types = new Map(providers.map((provider) => [provider.name, provider.type]));
    replace(
      modelsBox,
      h(
        "table",
        { class: "data", "data-testid": "models-table" },
        h("caption", { class: "visually-hidden" }, "Models"),
        h("thead", {}, h("tr", {}, ["Model", "Provider", "Deployment", "Price (USD / 1M tokens)", "Fallbacks", "Managed by", "Status"].map((t) => h("th", { scope: "col" }, t)))),
        h(
          "tbody",
          {},
          models.map((model) =>
            h(
              "tr",
              { dataset: { model: model.name } },
              h("th", { scope: "row" }, model.name, model.aliases && model.aliases.length ? h("div", { class: "sub" }, `aliases: ${model.aliases.join(", ")}`) : null),
              h("td", {}, model.provider, h("div", { class: "sub" }, types.get(model.provider) || "")),
              h("td", {}, h("code", {}, model.deployment || model.name)),
              h("td", {}, priceText(model.price) || h("span", { class: "sub" }, "public price table")),
              h(
                "td",
                {},
                model.fallbacks && model.fallbacks.length
                  ? h("ol", { class: "fallbacks" }, model.fallbacks.map((t) => h("li", {}, `${t.provider}${t.deployment ? ` / ${t.deployment}` : ""}${t.weight ? ` (weight ${t.weight})` : ""}`)))
                  : "–",
              ),
              h("td", {}, model.managed_by),
              statusCell(model.provider),
            ),
          ),
        ),
      ),
    );
  }

  async function load() {
    try {
      const [providerList, modelList] = await Promise.all([get("/v1/providers"), get("/v1/models")]);
      providers = providerList.data;
      models = modelList.data;
      error.clear();
      draw();
    } catch (exc) {
      error.show(exc);
    }
  }

  load();
  return null;
}
