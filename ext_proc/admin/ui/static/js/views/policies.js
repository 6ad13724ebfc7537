// Policies: the list, and a builder whose form is generated from GET /v1/policy-types
// (each parameter with its help text); every edit is checked by POST
// /v1/policies/validate (debounced), errors shown at their field, CEL errors at their
// line and column in the expression.

import { ApiError, del, get, p, patch, post } from "../api.js";
import { debounce, field, h, replace, setFieldError } from "../dom.js";
import { confirmDialog } from "../widgets/dialog.js";
import { errorBox, writeButton } from "../widgets/common.js";
import { policyForm } from "../widgets/schema-form.js";

const VALIDATE_DELAY = 300; // ms after the last keystroke

/** A policy's parameters, one `name: value` per line. */
function summary(policy) {
  const skip = new Set(["name", "type", "managed_by", "created_at", "updated_at", "version", "warnings", "enabled", "on_error"]);
  return Object.entries(policy)
    .filter(([key, value]) => !skip.has(key) && value !== null && value !== undefined)
    .map(([key, value]) => h("div", {}, h("span", { class: "sub" }, `${key}: `), Array.isArray(value) ? value.join(", ") : String(value)));
}

/** A type's description (a docstring): ``literal`` parts as code. */
function describeType(text) {
  return String(text || "")
    .split("``")
    .map((part, i) => (i % 2 ? h("code", {}, part) : part));
}

export function render(main, context) {
  const listError = errorBox();
  const listBox = h("div", { class: "table-scroll" });
  const builder = h("section", { class: "panel builder", "aria-labelledby": "builder-title" });
  main.append(h("div", { class: "grid-2 policies-layout" }, h("section", { class: "panel" }, h("h2", {}, "Policies"), listError.element, listBox), builder));

  let types = [];
  let policies = [];
  let apps = [];
  let current = null; // the builder's state
  const controller = new AbortController();

  async function load() {
    try {
      const [typeList, policyList, appList] = await Promise.all([get("/v1/policy-types"), get("/v1/policies"), get("/v1/applications")]);
      types = typeList.data;
      policies = policyList.data;
      apps = appList.data;
      listError.clear();
      drawList();
      if (!current) openBuilder(null);
    } catch (exc) {
      listError.show(exc);
    }
  }

  function boundBy(name) {
    const out = [];
    for (const app of apps) {
      if ((app.policies || []).includes(name)) out.push(app.name);
      for (const [env, spec] of Object.entries(app.environments || {})) if (spec && (spec.policies || []).includes(name)) out.push(`${app.name}/${env}`);
    }
    return out;
  }

  function drawList() {
    if (!policies.length) {
      replace(listBox, h("p", { class: "empty" }, "No policies yet."));
      return;
    }
    replace(
      listBox,
      h(
        "table",
        { class: "data compact", "data-testid": "policies-table" },
        h("caption", { class: "visually-hidden" }, "Policies"),
        h("thead", {}, h("tr", {}, ["Name", "Type", "Parameters", "Bound by", ""].map((t) => h("th", { scope: "col" }, t || h("span", { class: "visually-hidden" }, "Actions"))))),
        h(
          "tbody",
          {},
          policies.map((policy) =>
            h(
              "tr",
              { dataset: { policy: policy.name } },
              h("th", { scope: "row" }, policy.name, h("div", { class: "sub" }, `v${policy.version} · ${policy.managed_by}${policy.enabled === false ? " · disabled" : ""}`)),
              h("td", {}, h("code", {}, policy.type)),
              h("td", { class: "wrap" }, summary(policy).length ? summary(policy) : "–"),
              h("td", {}, boundBy(policy.name).join(", ") || "–"),
              h("td", {}, h("button", { type: "button", class: "secondary small", "aria-label": `Open ${policy.name} in the builder`, onclick: () => openBuilder(policy) }, context.canWrite ? "Edit" : "View")),
            ),
          ),
        ),
      ),
    );
  }

  function openBuilder(policy) {
    if (current) current.validate.cancel();
    const editing = Boolean(policy);
    const error = errorBox();
    const name = h("input", { name: "name", autocomplete: "off", spellcheck: "false", value: policy ? policy.name : "", readOnly: editing });
    const nameField = field("Name", name, { required: true, help: editing ? "a policy cannot be renamed" : "lowercase letters, digits, - _ ." });
    const typeSelect = h(
      "select",
      { name: "type", disabled: editing, "data-testid": "policy-type" },
      types.map((t) => h("option", { value: t.type, selected: policy ? t.type === policy.type : t.type === "custom_cel" }, t.type)),
    );
    const typeHelp = h("p", { class: "help type-description" });
    const formBox = h("div", {});
    const verdict = h("p", { class: "verdict", role: "status", "aria-live": "polite", "data-testid": "policy-verdict" });
    const general = h("ul", { class: "general-errors" });
    const save = writeButton(context, editing ? "Save changes" : "Create policy", () => submit(), { "data-testid": "save-policy" });
    const actions = [h("button", { type: "button", class: "secondary", onclick: () => openBuilder(null) }, "New policy"), save];
    if (editing) actions.push(writeButton(context, "Delete", () => remove(), { class: "danger" }));

    const state = { editing, policy, form: null, sequence: 0, aborter: null };
    current = state;

    function buildForm() {
      const type = types.find((t) => t.type === typeSelect.value) || types[0];
      replace(typeHelp, describeType(type.description));
      state.form = policyForm(type, policy || {}, () => state.validate());
      replace(formBox, state.form.element);
      state.validate();
    }

    function body({ nulls = false } = {}) {
      return { name: name.value.trim() || undefined, ...state.form.read({ nulls }) };
    }

    state.validate = debounce(async () => {
      state.sequence += 1;
      const mine = state.sequence;
      if (state.aborter) state.aborter.abort();
      state.aborter = new AbortController();
      verdict.textContent = "Checking…";
      verdict.className = "verdict pending";
      try {
        const answer = await post("/v1/policies/validate", body(), { signal: state.aborter.signal });
        if (mine !== state.sequence || current !== state) return;
        const rest = state.form.setErrors(answer.errors);
        setFieldError(nameField, null);
        const others = rest.filter((e) => {
          if (e.field === "name") {
            setFieldError(nameField, e.message);
            return false;
          }
          return true;
        });
        general.replaceChildren(...others.map((e) => h("li", {}, e.field ? `${e.field}: ${e.message}` : e.message)));
        verdict.textContent = answer.valid ? "Valid." : `${answer.errors.length} problem${answer.errors.length === 1 ? "" : "s"} to fix.`;
        verdict.className = `verdict ${answer.valid ? "ok" : "bad"}`;
      } catch (exc) {
        if (exc.name === "AbortError") return;
        verdict.textContent = `Cannot check: ${exc.message}`;
        verdict.className = "verdict bad";
      }
    }, VALIDATE_DELAY);

    async function submit() {
      error.clear();
      try {
        if (editing) {
          const { name: _ignored, ...changes } = body({ nulls: true });
          await patch(p`/v1/policies/${policy.name}`, changes);
          context.announce(`Saved policy ${policy.name}.`, "ok");
        } else {
          const created = await post("/v1/policies", body());
          context.announce(`Created policy ${created.name}.`, "ok");
          policy = created;
        }
        current = null;
        await load();
        openBuilder(policies.find((pol) => pol.name === (policy && policy.name)) || null);
      } catch (exc) {
        error.show(exc);
        if (exc instanceof ApiError && exc.errors.length) state.form.setErrors(exc.errors);
      }
    }

    async function remove() {
      const ok = await confirmDialog({ title: `Delete policy ${policy.name}?`, message: "Refused while an application or environment still binds it.", confirmLabel: "Delete policy", danger: true });
      if (!ok) return;
      try {
        await del(p`/v1/policies/${policy.name}`);
        context.announce(`Deleted policy ${policy.name}.`, "ok");
        current = null;
        await load();
        openBuilder(null);
      } catch (exc) {
        error.show(exc);
      }
    }

    typeSelect.addEventListener("change", buildForm);
    name.addEventListener("input", () => state.validate());
    const form = h(
      "form",
      { "aria-labelledby": "builder-title", "data-testid": "policy-builder", class: "policy-form" },
      h("h2", { id: "builder-title" }, editing ? `Policy ${policy.name}` : "New policy"),
      h("div", { class: "form-grid" }, nameField, field("Type", typeSelect, { help: editing ? "to change the type, create a new policy" : "" })),
      typeHelp,
      formBox,
      verdict,
      general,
      error.element,
      h("div", { class: "actions" }, actions),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (context.canWrite) submit();
    });
    replace(builder, form);
    buildForm();
  }

  load();
  return () => {
    controller.abort();
    if (current) {
      current.validate.cancel();
      if (current.aborter) current.aborter.abort();
    }
    current = null;
  };
}
