// Applications and keys: list and create applications, edit their policies and
// environments (a JSON merge patch), and manage their API keys: create (shown once),
// revoke, rotate with a grace period.

import { get, p, patch, post } from "../api.js";
import { field, h, replace } from "../dom.js";
import * as fmt from "../format.js";
import { confirmDialog, showSecret } from "../widgets/dialog.js";
import { errorBox, guardForm, policyList, writeButton } from "../widgets/common.js";

const DEFAULT_ENV = "default";

export function render(main, context) {
  const listError = errorBox();
  const listBox = h("div", { class: "table-scroll" });
  const createBox = h("div", { hidden: true });
  const detail = h("section", { class: "panel detail", "aria-live": "polite", hidden: true });
  const newButton = writeButton(context, "New application", () => openCreate(), { "data-testid": "new-app" });
  main.append(
    h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", {}, "Applications"), newButton), listError.element, createBox, listBox),
    detail,
  );

  let catalog = { apps: [], orgs: [], policies: [] };
  let selected = null;

  async function loadAll() {
    try {
      const [apps, orgs, policies] = await Promise.all([get("/v1/applications"), get("/v1/organizations"), get("/v1/policies")]);
      catalog = { apps: apps.data, orgs: orgs.data, policies: policies.data.map((pol) => pol.name) };
      listError.clear();
      drawList();
      if (selected) {
        const app = catalog.apps.find((a) => a.name === selected);
        if (app) drawDetail(app);
      }
    } catch (exc) {
      listError.show(exc);
    }
  }

  function drawList() {
    if (!catalog.apps.length) {
      replace(listBox, h("p", { class: "empty" }, "No applications yet."));
      return;
    }
    replace(
      listBox,
      h(
        "table",
        { class: "data", "data-testid": "apps-table" },
        h("caption", { class: "visually-hidden" }, "Applications"),
        h("thead", {}, h("tr", {}, ["Name", "Organization", "Policies", "Environments", "Managed by"].map((t) => h("th", { scope: "col" }, t)))),
        h(
          "tbody",
          {},
          catalog.apps.map((app) =>
            h(
              "tr",
              { dataset: { app: app.name }, class: app.name === selected ? "selected" : "" },
              h("th", { scope: "row" }, h("button", { type: "button", class: "link", onclick: () => select(app.name), "aria-pressed": String(app.name === selected) }, app.name)),
              h("td", {}, app.org),
              h("td", {}, (app.policies || []).join(", ") || "–"),
              h("td", {}, Object.keys(environmentsOf(app)).join(", ")),
              h("td", {}, app.managed_by),
            ),
          ),
        ),
      ),
    );
  }

  function environmentsOf(app) {
    return { [DEFAULT_ENV]: { policies: [] }, ...(app.environments || {}) };
  }

  function select(name) {
    selected = name;
    drawList();
    const app = catalog.apps.find((a) => a.name === name);
    if (app) drawDetail(app);
    const heading = detail.querySelector("h2");
    if (heading) heading.focus();
  }

  // --- create an application ---------------------------------------------------------

  function openCreate() {
    const error = errorBox();
    const name = h("input", { name: "name", autocomplete: "off", spellcheck: "false", required: true, pattern: "[a-z0-9][a-z0-9._\\-]*", maxlength: "128" });
    const org = h(
      "select",
      { name: "org" },
      catalog.orgs.map((o) => h("option", { value: o.name }, o.name)),
      h("option", { value: "__new__" }, "New organization…"),
    );
    const newOrg = h("input", { name: "new_org", autocomplete: "off", spellcheck: "false" });
    const newOrgField = field("New organization's name", newOrg, { help: "created first (POST /v1/organizations)" });
    newOrgField.hidden = catalog.orgs.length > 0;
    if (!catalog.orgs.length) org.value = "__new__";
    org.addEventListener("change", () => {
      newOrgField.hidden = org.value !== "__new__";
    });
    const description = h("input", { name: "description", autocomplete: "off" });
    const policies = policyList({ label: "Policies (in the order they run)", available: catalog.policies });
    const form = h(
      "form",
      { class: "create-form", "aria-label": "New application", "data-testid": "create-app-form" },
      h("h3", {}, "New application"),
      h(
        "div",
        { class: "form-grid" },
        field("Name", name, { required: true, help: "lowercase letters, digits, - _ . (its id; cannot be renamed)" }),
        field("Organization", org),
        newOrgField,
        field("Description", description),
      ),
      policies.element,
      error.element,
      h("div", { class: "actions" }, h("button", { type: "button", class: "secondary", onclick: () => close() }, "Cancel"), h("button", { type: "submit", class: "primary" }, "Create application")),
    );
    function close() {
      createBox.hidden = true;
      createBox.replaceChildren();
      newButton.focus();
    }
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      error.clear();
      const submit = form.querySelector("button[type=submit]");
      submit.disabled = true;
      try {
        let orgName = org.value;
        if (orgName === "__new__") {
          orgName = newOrg.value.trim();
          await post("/v1/organizations", { name: orgName });
        }
        const body = { name: name.value.trim(), org: orgName, policies: policies.value() };
        if (description.value.trim()) body.description = description.value.trim();
        const created = await post("/v1/applications", body);
        context.announce(`Created application ${created.name}.`, "ok");
        createBox.hidden = true;
        createBox.replaceChildren();
        selected = created.name;
        await loadAll();
        select(created.name);
      } catch (exc) {
        error.show(exc);
      } finally {
        submit.disabled = false;
      }
    });
    guardForm(context, form);
    replace(createBox, form);
    createBox.hidden = false;
    name.focus();
  }

  // --- one application: settings and keys ------------------------------------------------

  function drawDetail(app) {
    detail.hidden = false;
    const error = errorBox();
    const description = h("input", { name: "description", autocomplete: "off", value: app.description || "" });
    const ownPolicies = policyList({ label: "Application policies (run first, in this order)", value: app.policies || [], available: catalog.policies, disabled: !context.canWrite });
    const envs = new Map(); // name -> policyList
    const removed = new Set();
    const envBox = h("div", { class: "environments" });
    const original = environmentsOf(app);

    function drawEnvs() {
      envBox.replaceChildren(
        ...[...envs.entries()].map(([env, list]) =>
          h(
            "fieldset",
            { class: "environment", dataset: { env } },
            h("legend", {}, `Environment ${env}`),
            list.element,
            env === DEFAULT_ENV
              ? h("p", { class: "help" }, "Always exists; keys made without an environment get it.")
              : writeButton(context, `Remove environment ${env}`, () => {
                  envs.delete(env);
                  if (env in original) removed.add(env);
                  drawEnvs();
                }, { class: "secondary small" }),
          ),
        ),
      );
    }
    for (const [env, spec] of Object.entries(original)) {
      envs.set(env, policyList({ label: `Policies added for ${env} keys`, value: (spec && spec.policies) || [], available: catalog.policies, disabled: !context.canWrite }));
    }
    drawEnvs();
    const newEnv = h("input", { name: "new_environment", autocomplete: "off", spellcheck: "false" });
    const addEnv = writeButton(
      context,
      "Add environment",
      () => {
        const env = newEnv.value.trim();
        if (!env || envs.has(env)) return;
        removed.delete(env);
        envs.set(env, policyList({ label: `Policies added for ${env} keys`, available: catalog.policies }));
        newEnv.value = "";
        drawEnvs();
      },
      { class: "secondary small" },
    );

    const form = h(
      "form",
      { class: "settings", "aria-label": `Settings of ${app.name}`, "data-testid": "app-settings" },
      h("h3", {}, "Settings"),
      h("p", { class: "help" }, `Organization ${app.org} · managed by ${app.managed_by} · updated ${fmt.utc(app.updated_at)}`),
      field("Description", description),
      ownPolicies.element,
      h("h4", {}, "Environments"),
      envBox,
      h("div", { class: "add-row" }, field("New environment", newEnv), addEnv),
      error.element,
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary", dataset: { write: "true" } }, "Save settings")),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      error.clear();
      const environments = {};
      for (const [env, list] of envs) if (env !== DEFAULT_ENV || list.value().length || DEFAULT_ENV in (app.environments || {})) environments[env] = { policies: list.value() };
      for (const env of removed) environments[env] = null;
      try {
        await patch(p`/v1/applications/${app.name}`, {
          description: description.value.trim() || null,
          policies: ownPolicies.value(),
          environments,
        });
        context.announce(`Saved application ${app.name}.`, "ok");
        await loadAll();
      } catch (exc) {
        error.show(exc);
      }
    });
    guardForm(context, form);

    const keys = keysSection(app, Object.keys(original));
    // Keys first and full width (their table has seven columns); the settings below.
    replace(detail, h("h2", { tabindex: "-1" }, `Application ${app.name}`), keys.element, form);
    keys.load();
  }

  function keysSection(app, environments) {
    const error = errorBox();
    const showAll = h("input", { type: "checkbox", name: "all" });
    const box = h("div", { class: "table-scroll" });
    const env = h("select", { name: "environment" }, environments.map((e) => h("option", { value: e }, e)));
    const keyName = h("input", { name: "key_name", autocomplete: "off", placeholder: "what it is for" });
    const expires = h("input", { name: "expires_at", type: "datetime-local" });
    const create = h(
      "form",
      { class: "inline-form", "aria-label": `New key for ${app.name}`, "data-testid": "create-key-form" },
      field("Environment", env),
      field("Name", keyName),
      field("Expires (UTC, optional)", expires),
      h("button", { type: "submit", class: "primary" }, "Create key"),
    );
    create.addEventListener("submit", async (event) => {
      event.preventDefault();
      error.clear();
      const body = { app: app.name, environment: env.value };
      if (keyName.value.trim()) body.name = keyName.value.trim();
      if (expires.value) body.expires_at = `${expires.value}${expires.value.length === 16 ? ":00" : ""}Z`;
      try {
        const created = await post("/v1/keys", body);
        keyName.value = "";
        await showSecret({ title: `New key ${created.prefix}… for ${app.name} (${created.environment})`, secret: created.key });
        context.announce(`Created key ${created.id}.`, "ok");
        await load();
      } catch (exc) {
        error.show(exc);
      }
    });
    guardForm(context, create);
    showAll.addEventListener("change", () => load());

    async function load() {
      try {
        const answer = await get("/v1/keys", { app: app.name, all: showAll.checked ? "true" : null });
        drawKeys(answer.data);
      } catch (exc) {
        error.show(exc);
      }
    }

    function drawKeys(keys) {
      if (!keys.length) {
        replace(box, h("p", { class: "empty" }, showAll.checked ? "No keys." : "No active keys."));
        return;
      }
      replace(
        box,
        h(
          "table",
          { class: "data compact", "data-testid": "keys-table" },
          h("caption", { class: "visually-hidden" }, `API keys of ${app.name}`),
          h("thead", {}, h("tr", {}, ["Key", "Name", "Environment", "Status", "Created", "Expires", ""].map((t) => h("th", { scope: "col" }, t || h("span", { class: "visually-hidden" }, "Actions"))))),
          h(
            "tbody",
            {},
            keys.map((key) =>
              h(
                "tr",
                { dataset: { key: key.id } },
                h("th", { scope: "row" }, h("code", {}, `${key.prefix}…`), h("div", { class: "sub" }, key.id)),
                h("td", {}, key.name || "–"),
                h("td", {}, key.environment),
                h("td", {}, h("span", { class: `badge status-${key.status}` }, key.status), key.replaced_by ? h("div", { class: "sub" }, `replaced by ${key.replaced_by}`) : null),
                h("td", { class: "nowrap" }, fmt.utc(key.created_at, { seconds: false })),
                h("td", { class: "nowrap" }, key.expires_at ? fmt.utc(key.expires_at, { seconds: false }) : "never"),
                h(
                  "td",
                  {},
                  key.status === "active" || key.status === "rotating"
                    ? h(
                        "div",
                        { class: "row-actions" },
                        writeButton(context, "Rotate", () => rotate(key), { class: "secondary small", "aria-label": `Rotate key ${key.id}`, disabled: key.status !== "active" }),
                        writeButton(context, "Revoke", () => revoke(key), { class: "danger small", "aria-label": `Revoke key ${key.id}` }),
                      )
                    : null,
                ),
              ),
            ),
          ),
        ),
      );
    }

    async function revoke(key) {
      const ok = await confirmDialog({
        title: `Revoke key ${key.prefix}…?`,
        message: `Every replica refuses it within a second. Apps still using it get 401.`,
        confirmLabel: "Revoke key",
        danger: true,
      });
      if (!ok) return;
      try {
        await post(p`/v1/keys/${key.id}/revoke`);
        context.announce(`Revoked key ${key.id}.`, "ok");
        await load();
      } catch (exc) {
        error.show(exc);
      }
    }

    async function rotate(key) {
      const grace = h("input", { name: "grace_period", value: "24h", autocomplete: "off", spellcheck: "false" });
      const answer = await confirmDialog({
        title: `Rotate key ${key.prefix}…`,
        message: "A new key for the same application and environment. The old one keeps working for the grace period, then stops.",
        confirmLabel: "Rotate",
        body: field("Grace period", grace, { help: "a duration: 30m, 24h, 7d; 0 stops the old key now" }),
        read: () => grace.value.trim() || "24h",
      });
      if (!answer) return;
      try {
        const created = await post(p`/v1/keys/${key.id}/rotate`, { grace_period: answer });
        await showSecret({ title: `New key ${created.prefix}… replacing ${key.prefix}…`, secret: created.key, note: `Copy it now: it is shown this once. The old key works until ${fmt.utc(created.replaced && created.replaced.expires_at)}.` });
        context.announce(`Rotated key ${key.id}: the new one is ${created.id}.`, "ok");
        await load();
      } catch (exc) {
        error.show(exc);
      }
    }

    return {
      element: h(
        "section",
        { class: "keys", "aria-label": `Keys of ${app.name}` },
        h("div", { class: "panel-head" }, h("h3", {}, "API keys"), h("label", { class: "inline" }, showAll, " show revoked and expired")),
        create,
        error.element,
        box,
      ),
      load,
    };
  }

  loadAll();
  return null;
}
