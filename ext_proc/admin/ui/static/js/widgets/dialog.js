// Modal dialogs on <dialog>: focus is trapped by the browser, Escape cancels.

import { h, uid } from "../dom.js";

/**
 * Ask before doing something. `body` is extra content (inputs); `read` turns the dialog
 * into the answer (called on confirm). Resolves to that answer, or null when cancelled.
 */
export function confirmDialog({ title, message, confirmLabel = "Confirm", danger = false, body = null, read = null }) {
  return new Promise((resolve) => {
    const titleId = uid("dlg");
    const form = h(
      "form",
      { method: "dialog", class: "dialog-form" },
      h("h2", { id: titleId }, title),
      message ? h("p", {}, message) : null,
      body,
      h(
        "div",
        { class: "actions" },
        h("button", { type: "button", class: "secondary", value: "cancel", onclick: () => finish(null) }, "Cancel"),
        h("button", { type: "submit", class: danger ? "danger" : "primary", value: "ok" }, confirmLabel),
      ),
    );
    const dialog = h("dialog", { "aria-labelledby": titleId, class: "modal" }, form);
    let done = false;
    function finish(answer) {
      if (done) return;
      done = true;
      dialog.close();
      dialog.remove();
      resolve(answer);
    }
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      finish(read ? read(form) : true);
    });
    dialog.addEventListener("cancel", (event) => {
      event.preventDefault();
      finish(null);
    });
    document.body.append(dialog);
    dialog.showModal();
    const first = form.querySelector("input, select, textarea") || form.querySelector("button[type=submit]");
    if (first) first.focus();
  });
}

/**
 * Show a secret once (a new API key): read-only, selectable, with a copy button. When the
 * dialog closes the secret is removed from the page.
 */
export function showSecret({ title, secret, note }) {
  return new Promise((resolve) => {
    const titleId = uid("dlg");
    const inputId = uid("secret");
    const status = h("p", { class: "copy-status", role: "status", "aria-live": "polite" });
    const input = h("input", {
      id: inputId,
      type: "text",
      readOnly: true,
      value: secret,
      class: "secret",
      spellcheck: "false",
      autocomplete: "off",
      "data-testid": "secret-value",
    });
    async function copy() {
      input.select();
      try {
        await navigator.clipboard.writeText(secret);
        status.textContent = "Copied to the clipboard.";
      } catch {
        // No clipboard permission (an insecure origin, a locked-down browser): the
        // text is selected, so Ctrl+C still copies it.
        status.textContent = "Selected: press Ctrl+C (⌘C) to copy.";
      }
    }
    const done = h("button", { type: "button", class: "primary" }, "I have copied it");
    const dialog = h(
      "dialog",
      { "aria-labelledby": titleId, class: "modal secret-dialog" },
      h("h2", { id: titleId }, title),
      h("p", { class: "warning" }, note || "Copy it now: it is shown this once and stored nowhere."),
      h(
        "div",
        { class: "secret-row" },
        h("label", { for: inputId, class: "visually-hidden" }, "The new key"),
        input,
        h("button", { type: "button", class: "secondary", onclick: copy }, "Copy"),
      ),
      status,
      h("div", { class: "actions" }, done),
    );
    function close() {
      input.value = "";
      dialog.close();
      dialog.remove();
      resolve();
    }
    done.addEventListener("click", close);
    dialog.addEventListener("cancel", (event) => {
      event.preventDefault();
      close();
    });
    document.body.append(dialog);
    dialog.showModal();
    input.focus();
    input.select();
  });
}
