// Small pieces every view uses: error text, write-only buttons, ordered policy lists.

import { ApiError } from "../api.js";
import { h, uid } from "../dom.js";

/** An error as a person reads it: the API's message, then each field problem it lists
 * and what still uses the object, unless the message says them already. */
export function errorText(exc) {
  if (!(exc instanceof ApiError)) return `Request failed: ${exc.message}`;
  const details = exc.errors
    .slice(1)
    .map((e) => (e.field ? `${e.field}: ${e.message}` : e.message))
    .filter((text) => !exc.message.includes(text))
    .join("; ");
  const users = [].concat(exc.usedBy || []).filter((name) => !exc.message.includes(name));
  const used = users.length ? ` (used by ${users.join(", ")})` : "";
  return `${exc.message}${used}${details ? ` — also ${details}` : ""}`;
}

/** A paragraph showing a failure (role=alert) or nothing. */
export function errorBox() {
  const box = h("p", { class: "form-error", role: "alert", hidden: true });
  return {
    element: box,
    show(exc) {
      box.textContent = typeof exc === "string" ? exc : errorText(exc);
      box.hidden = false;
    },
    clear() {
      box.hidden = true;
      box.textContent = "";
    },
  };
}

const READ_ONLY_NOTE = "Needs an admin token: this viewer token can only read.";

/** A button that changes something: disabled (with the reason) for a viewer token. */
export function writeButton(context, label, onclick, attrs = {}) {
  const button = h("button", { type: "button", class: "primary", ...attrs, onclick }, label);
  button.dataset.write = "true";
  if (!context.canWrite) {
    button.disabled = true;
    button.title = READ_ONLY_NOTE;
  }
  return button;
}

/** Disable every control of a form for a viewer token (the API would refuse anyway). */
export function guardForm(context, form) {
  form.dataset.write = "true";
  if (context.canWrite) return;
  for (const el of form.querySelectorAll("input, select, textarea, button")) {
    el.disabled = true;
    el.title = READ_ONLY_NOTE;
  }
}

/**
 * An ordered list of policy names (the order they run in): move up/down, remove, add
 * from `available`. Returns {element, value(), setValue(list)}.
 */
export function policyList({ label, value = [], available = [], disabled = false, onChange = () => {} }) {
  let items = [...value];
  const labelId = uid("pl");
  const list = h("ol", { class: "policy-list" });
  const pickerId = uid("pick");
  const picker = h("select", { id: pickerId, disabled });
  const add = h("button", { type: "button", class: "secondary small", disabled }, "Add");
  const element = h(
    "div",
    { class: "policy-editor", role: "group", "aria-labelledby": labelId },
    h("span", { id: labelId, class: "group-label" }, label),
    list,
    h("div", { class: "add-row" }, h("label", { for: pickerId, class: "visually-hidden" }, `Add a policy to ${label}`), picker, add),
  );

  function draw() {
    list.replaceChildren(
      ...items.map((name, i) =>
        h(
          "li",
          { dataset: { policy: name } },
          h("span", { class: "policy-name" }, name),
          h("span", { class: "row-actions" },
            h("button", { type: "button", class: "icon", disabled: disabled || i === 0, "aria-label": `Move ${name} up`, title: "Move up", onclick: () => move(i, -1) }, "↑"),
            h("button", { type: "button", class: "icon", disabled: disabled || i === items.length - 1, "aria-label": `Move ${name} down`, title: "Move down", onclick: () => move(i, 1) }, "↓"),
            h("button", { type: "button", class: "icon", disabled, "aria-label": `Remove ${name}`, title: "Remove", onclick: () => remove(i) }, "✕"),
          ),
        ),
      ),
    );
    if (!items.length) list.append(h("li", { class: "empty" }, "no policies"));
    const left = available.filter((name) => !items.includes(name));
    picker.replaceChildren(h("option", { value: "" }, left.length ? "choose a policy…" : "no other policy"), ...left.map((name) => h("option", { value: name }, name)));
    add.disabled = disabled || !left.length;
  }
  function move(i, by) {
    const [item] = items.splice(i, 1);
    items.splice(i + by, 0, item);
    draw();
    onChange();
  }
  function remove(i) {
    items.splice(i, 1);
    draw();
    onChange();
  }
  add.addEventListener("click", () => {
    if (!picker.value) return;
    items.push(picker.value);
    draw();
    onChange();
  });
  draw();
  return {
    element,
    value: () => [...items],
    setValue(next) {
      items = [...next];
      draw();
    },
  };
}
