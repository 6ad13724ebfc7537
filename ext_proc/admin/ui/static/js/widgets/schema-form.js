// A form generated from a policy type's JSON Schema (GET /v1/policy-types): one control
// per parameter, labelled, with the schema's own help text and limits; CEL expressions
// get the CEL editor with the variables of their phase.

import { h, field, setFieldError } from "../dom.js";
import { celEditor } from "./cel-editor.js";

const COMMON = ["enabled", "on_error"];

function humanize(name) {
  const text = name.replace(/_/g, " ");
  return text.charAt(0).toUpperCase() + text.slice(1);
}

/** What kind of control a property needs, and its facts. */
export function describe(name, schema, celVariables) {
  let inner = schema;
  let nullable = false;
  if (Array.isArray(schema.anyOf)) {
    const rest = schema.anyOf.filter((member) => member.type !== "null");
    nullable = rest.length < schema.anyOf.length;
    inner = rest.length === 1 ? rest[0] : { anyOf: rest };
  }
  const info = {
    name,
    nullable,
    title: humanize(name),
    description: schema.description || inner.description || "",
    default: schema.default,
    minimum: inner.minimum ?? inner.exclusiveMinimum,
    maximum: inner.maximum,
    kind: "string",
  };
  const variants = Array.isArray(inner.anyOf) ? inner.anyOf : null;
  if (celVariables && celVariables[name]) info.kind = "cel";
  else if (variants && variants.some((v) => v.type === "string" && v.pattern) && variants.some((v) => v.type === "number")) info.kind = "duration";
  else if (Array.isArray(inner.enum)) {
    info.kind = "enum";
    info.options = inner.enum;
  } else if (inner.type === "boolean") info.kind = "boolean";
  else if (inner.type === "integer") info.kind = "integer";
  else if (inner.type === "number") info.kind = "number";
  else if (inner.type === "array") info.kind = "list";
  return info;
}

function helpText(info, required) {
  const parts = [];
  if (info.description) parts.push(info.description);
  if (info.kind === "duration" && !/duration/.test(info.description)) parts.push("a duration such as 500ms, 60s, 5m, 1h, 1d");
  if (info.minimum !== undefined && info.maximum !== undefined) parts.push(`from ${info.minimum} to ${info.maximum}`);
  else if (info.minimum !== undefined) parts.push(`at least ${info.minimum}`);
  else if (info.maximum !== undefined) parts.push(`at most ${info.maximum}`);
  if (info.kind === "list") parts.push("one per line");
  if (info.default !== undefined && info.default !== null && info.kind !== "boolean") parts.push(`default: ${info.default}`);
  if (!required && info.default === null) parts.push("optional");
  return parts.join(" · ");
}

/**
 * The form of `type` (one entry of GET /v1/policy-types), filled with `values` (a
 * policy as the API answers it). `onChange` runs on every edit. Returns
 * {element, read({nulls}), setErrors(errors), editors}.
 */
export function policyForm(type, values = {}, onChange = () => {}) {
  const schema = type.parameters || {};
  const properties = schema.properties || {};
  const required = new Set(schema.required || []);
  const names = [...(type.fields || []), ...Object.keys(properties).filter((n) => n !== "type" && !(type.fields || []).includes(n) && !COMMON.includes(n)), ...COMMON].filter(
    (n) => n in properties,
  );
  const controls = new Map(); // name -> {info, read(), wrapper, setError()}
  const editors = {};

  for (const name of names) {
    const info = describe(name, properties[name], type.cel_variables);
    const isRequired = required.has(name);
    const current = values[name];
    const help = helpText(info, isRequired);
    const label = [info.title, " ", h("code", { class: "yaml-name" }, name)];
    if (info.kind === "cel") {
      const editor = celEditor({
        name,
        label,
        help,
        value: current ?? "",
        variables: type.cel_variables[name] || {},
        onInput: onChange,
      });
      editors[name] = editor;
      controls.set(name, {
        info,
        wrapper: editor.element,
        read: () => (editor.value.trim() ? editor.value : undefined),
        setError: (error) => editor.setError(error),
      });
      continue;
    }
    let control;
    let read;
    if (info.kind === "boolean") {
      control = h("input", { type: "checkbox", name, checked: current ?? info.default ?? false });
      read = () => control.checked;
    } else if (info.kind === "enum") {
      const chosen = current ?? info.default ?? "";
      control = h(
        "select",
        { name },
        info.nullable || (!isRequired && info.default === undefined) ? h("option", { value: "", selected: chosen === "" }, "(not set)") : null,
        info.options.map((option) => h("option", { value: option, selected: option === chosen }, option)),
      );
      read = () => (control.value === "" ? undefined : control.value);
    } else if (info.kind === "integer" || info.kind === "number") {
      control = h("input", {
        type: "number",
        name,
        inputmode: info.kind === "integer" ? "numeric" : "decimal",
        step: info.kind === "integer" ? "1" : "any",
        min: info.minimum,
        max: info.maximum,
        value: current ?? "",
        placeholder: info.default !== undefined && info.default !== null ? String(info.default) : "",
      });
      read = () => (control.value.trim() === "" ? undefined : Number(control.value));
    } else if (info.kind === "list") {
      control = h("textarea", { name, rows: 3, spellcheck: "false", value: Array.isArray(current) ? current.join("\n") : "" });
      read = () => {
        const items = control.value
          .split(/\n|,/)
          .map((item) => item.trim())
          .filter(Boolean);
        return items.length ? items : undefined;
      };
    } else {
      control = h("input", {
        type: "text",
        name,
        value: current ?? "",
        spellcheck: "false",
        autocomplete: "off",
        placeholder: info.kind === "duration" ? "e.g. 60s" : "",
      });
      read = () => (control.value.trim() === "" ? undefined : control.value.trim());
    }
    control.addEventListener("input", onChange);
    control.addEventListener("change", onChange);
    const wrapper = field(label, control, { help, required: isRequired, inline: info.kind === "boolean" });
    controls.set(name, { info, wrapper, read, setError: (error) => setFieldError(wrapper, error ? error.message : null) });
  }

  const own = names.filter((n) => !COMMON.includes(n));
  const element = h(
    "div",
    { class: "schema-form" },
    own.map((n) => controls.get(n).wrapper),
    h("fieldset", { class: "common" }, h("legend", {}, "Every policy"), COMMON.filter((n) => controls.has(n)).map((n) => controls.get(n).wrapper)),
  );

  return {
    element,
    editors,
    /** The body's parameters; with `nulls`, absent optional ones as null (a merge patch removes them). */
    read({ nulls = false } = {}) {
      const out = { type: type.type };
      for (const [name, { info, read }] of controls) {
        const value = read();
        if (value === undefined) {
          if (nulls && !required.has(name)) out[name] = null;
          continue;
        }
        if (info.kind === "boolean" && value === info.default && !nulls) continue;
        out[name] = value;
      }
      return out;
    },
    /** Errors of POST /v1/policies/validate: each shown at its field; the rest returned. */
    setErrors(errors) {
      const rest = [];
      const byField = new Map();
      for (const error of errors) {
        const top = String(error.field || "").split(/[.[]/)[0];
        if (controls.has(top) && !byField.has(top)) byField.set(top, error);
        else rest.push(error);
      }
      for (const [name, control] of controls) control.setError(byField.get(name) || null);
      return rest;
    },
    setReadOnly(flag) {
      for (const { wrapper } of controls.values()) {
        for (const el of wrapper.querySelectorAll("input, select, textarea")) {
          if (el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && el.type !== "checkbox")) el.readOnly = flag;
          else el.disabled = flag;
        }
      }
    },
  };
}
