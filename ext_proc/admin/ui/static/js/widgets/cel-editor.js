// A CEL expression editor: a plain <textarea> (every keyboard and screen-reader habit
// works) with line numbers, a marker under the error's position, the message with its
// line and column, and the variables the expression may read (a click inserts one).

import { h, uid } from "../dom.js";

/** Offset in `text` of 1-based `line` / `column`, clamped to the text. */
export function offsetOf(text, line, column) {
  const lines = text.split("\n");
  const row = Math.min(Math.max(1, line), lines.length);
  let offset = 0;
  for (let i = 0; i < row - 1; i += 1) offset += lines[i].length + 1;
  return offset + Math.min(Math.max(0, column - 1), lines[row - 1].length);
}

export function celEditor({ name, label, help, value = "", variables = {}, onInput }) {
  const id = uid("cel");
  const helpId = `${id}-help`;
  const errorId = `${id}-error`;
  const varsId = `${id}-vars`;
  const textarea = h("textarea", {
    id,
    name,
    rows: 4,
    wrap: "off",
    spellcheck: "false",
    autocapitalize: "off",
    autocomplete: "off",
    class: "cel-text",
    "aria-describedby": [help ? helpId : null, errorId, varsId].filter(Boolean).join(" "),
    "data-testid": `cel-${name}`,
  });
  textarea.value = value;
  const gutter = h("pre", { class: "cel-gutter", "aria-hidden": "true" });
  const backdrop = h("div", { class: "cel-backdrop", "aria-hidden": "true" });
  const message = h("span", { class: "cel-message" });
  const position = h("span", { class: "cel-position" });
  const goto = h("button", { type: "button", class: "link", onclick: () => focusError() }, "Go to error");
  const errorBox = h("p", { class: "field-error cel-error", id: errorId, hidden: true, "aria-live": "polite", "data-testid": `cel-error-${name}` }, position, message, " ", goto);
  let error = null; // {line, column, message}

  const varButtons = Object.entries(variables).map(([variable, type]) =>
    h(
      "button",
      {
        type: "button",
        class: "chip",
        title: `insert ${variable} (${type})`,
        onclick: () => insert(variable),
      },
      h("code", {}, variable),
      " ",
      h("span", { class: "type" }, type),
    ),
  );
  const vars = h(
    "div",
    { class: "cel-vars", id: varsId },
    h("span", { class: "cel-vars-label" }, "Variables you can use:"),
    varButtons.length ? varButtons : h("span", {}, "none"),
  );

  function insert(text) {
    if (textarea.disabled) return;
    const start = textarea.selectionStart;
    const end = textarea.selectionEnd;
    textarea.setRangeText(text, start, end, "end");
    textarea.focus();
    textarea.dispatchEvent(new Event("input", { bubbles: true }));
  }

  function render() {
    const text = textarea.value;
    const lines = text.split("\n").length;
    gutter.textContent = Array.from({ length: lines }, (_, i) => String(i + 1)).join("\n");
    backdrop.replaceChildren();
    if (error && error.line) {
      const at = offsetOf(text, error.line, error.column || 1);
      const char = text.slice(at, at + 1);
      const marked = !char || char === "\n" ? " " : char;
      backdrop.append(
        text.slice(0, at),
        h("mark", { class: "cel-mark", "data-testid": `cel-mark-${name}` }, marked),
        char === "\n" ? text.slice(at) : text.slice(at + 1),
      );
    } else {
      backdrop.append(text);
    }
    backdrop.append("\n"); // keeps the last empty line's height
    syncScroll();
  }

  function syncScroll() {
    backdrop.scrollTop = textarea.scrollTop;
    backdrop.scrollLeft = textarea.scrollLeft;
    gutter.scrollTop = textarea.scrollTop;
  }

  function focusError() {
    if (!error || !error.line) return;
    const at = offsetOf(textarea.value, error.line, error.column || 1);
    textarea.focus();
    textarea.setSelectionRange(at, Math.min(at + 1, textarea.value.length));
  }

  textarea.addEventListener("input", () => {
    render();
    if (onInput) onInput();
  });
  textarea.addEventListener("scroll", syncScroll);

  const element = h(
    "div",
    { class: "field cel-field", dataset: { field: name } },
    h("label", { for: id }, label),
    help ? h("p", { class: "help", id: helpId }, help) : null,
    h("div", { class: "cel-editor" }, gutter, h("div", { class: "cel-input" }, backdrop, textarea)),
    errorBox,
    vars,
  );
  render();

  return {
    element,
    textarea,
    get value() {
      return textarea.value;
    },
    set disabled(flag) {
      textarea.readOnly = flag;
    },
    /** Show an error ({message, line?, column?}) or clear it (null). */
    setError(next) {
      error = next;
      if (next) {
        position.textContent = next.line ? `Line ${next.line}, column ${next.column || 1}: ` : "";
        message.textContent = next.message;
        goto.hidden = !next.line;
        errorBox.hidden = false;
        textarea.setAttribute("aria-invalid", "true");
      } else {
        errorBox.hidden = true;
        textarea.removeAttribute("aria-invalid");
      }
      render();
    },
  };
}
