// Building the page without innerHTML: every value from the API becomes text, never markup.

/**
 * h("button", {class: "primary", onclick: fn, disabled: true}, "Save")
 * Attributes: `class`, `text`, `dataset` (object), `style` (object of CSS properties),
 * `on<event>` (listeners), boolean DOM properties (disabled, checked, hidden, ...),
 * everything else through setAttribute (aria-*, role, for, ...). Children: nodes,
 * strings, numbers, arrays of them; null/undefined/false are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") el.className = Array.isArray(value) ? value.filter(Boolean).join(" ") : value;
    else if (name === "text") el.textContent = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "style") Object.assign(el.style, value);
    else if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name in PROPS) el[PROPS[name]] = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

const PROPS = {
  disabled: "disabled",
  checked: "checked",
  hidden: "hidden",
  value: "value",
  selected: "selected",
  readOnly: "readOnly",
  required: "required",
  multiple: "multiple",
  open: "open",
};

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function replace(el, ...children) {
  clear(el);
  return append(el, children);
}

let counter = 0;
/** A unique element id (labels, aria-describedby). */
export function uid(prefix = "c") {
  counter += 1;
  return `${prefix}-${counter}`;
}

/** A labelled form field: label, control, help text and an error slot, wired by ids. */
export function field(label, control, { help, required, inline } = {}) {
  const id = control.id || uid("f");
  control.id = id;
  const helpId = help ? `${id}-help` : null;
  const errorId = `${id}-error`;
  const describedBy = [helpId, errorId].filter(Boolean).join(" ");
  control.setAttribute("aria-describedby", describedBy);
  if (required) control.required = true;
  const wrapper = h(
    "div",
    { class: ["field", inline && "inline"], dataset: { field: control.name || "" } },
    inline ? [control, h("label", { for: id }, label)] : [h("label", { for: id }, label, required ? h("span", { class: "req", "aria-hidden": "true" }, " *") : null), control],
    help ? h("p", { class: "help", id: helpId }, help) : null,
    h("p", { class: "field-error", id: errorId, hidden: true }),
  );
  return wrapper;
}

/** Show (or clear, with null) a field's error message. */
export function setFieldError(wrapper, message) {
  const control = wrapper.querySelector("input, select, textarea");
  const slot = wrapper.querySelector(".field-error");
  if (!slot) return;
  slot.textContent = message || "";
  slot.hidden = !message;
  if (control) {
    if (message) control.setAttribute("aria-invalid", "true");
    else control.removeAttribute("aria-invalid");
  }
}

export function debounce(fn, ms) {
  let timer = null;
  const wrapped = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  wrapped.cancel = () => clearTimeout(timer);
  return wrapped;
}
