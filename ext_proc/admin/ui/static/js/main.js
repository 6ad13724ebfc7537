// The console's shell: sign-in, navigation between views, the signed-in token's role.

import { ApiError, get, session } from "./api.js";
import { h, replace } from "./dom.js";
import * as usage from "./views/usage.js";
import * as apps from "./views/apps.js";
import * as models from "./views/models.js";
import * as policies from "./views/policies.js";
import * as activity from "./views/activity.js";

const VIEWS = [
  { path: "usage", title: "Usage and cost", view: usage },
  { path: "apps", title: "Applications and keys", view: apps },
  { path: "models", title: "Models and providers", view: models },
  { path: "policies", title: "Policies", view: policies },
  { path: "activity", title: "Live activity", view: activity },
];

const root = document.getElementById("app");
let cleanup = null; // stops the current view (its stream, its charts)
let notice = ""; // why the sign-in form is shown again
let routed = false;

/** Announce a result (saved, deleted, failed) to everyone, screen readers included. */
export function announce(message, kind = "info") {
  const region = document.getElementById("announcer");
  if (!region) return;
  region.className = `announcer ${kind}`;
  region.textContent = message;
  region.hidden = !message;
}

function signOut(message = "") {
  if (cleanup) cleanup();
  cleanup = null;
  session.clear();
  notice = message;
  if (window.location.hash) window.history.replaceState(null, "", window.location.pathname);
  renderLogin();
}

session.onUnauthorized((error) => signOut(`Signed out: ${error.message}`));

function renderLogin() {
  document.title = "Sign in · Gateway console";
  const input = h("input", {
    id: "token",
    name: "token",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    "aria-describedby": "token-help login-error",
  });
  const error = h("p", { id: "login-error", class: "form-error", role: "alert", hidden: !notice }, notice);
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h(
    "form",
    { class: "login", "aria-labelledby": "login-title" },
    h("h1", { id: "login-title" }, "Gateway console"),
    h("label", { for: "token" }, "Admin API token"),
    input,
    h(
      "p",
      { id: "token-help", class: "help" },
      "EXT_PROC_ADMIN_TOKEN, or an admin or viewer token from POST /v1/tokens. It is kept for this browser tab only (sessionStorage) and sent to this server's admin API alone.",
    ),
    error,
    button,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    button.disabled = true;
    error.hidden = true;
    try {
      const who = await get("/v1/whoami", null, { token });
      session.save(token, who);
      notice = "";
      renderShell();
    } catch (exc) {
      error.textContent = exc instanceof ApiError && exc.status === 401 ? "That token is unknown, revoked or expired." : `Cannot sign in: ${exc.message}`;
      error.hidden = false;
      input.focus();
    } finally {
      button.disabled = false;
    }
  });
  replace(root, h("main", { id: "main", class: "login-page" }, form));
  input.focus();
}

function currentPath() {
  const path = window.location.hash.replace(/^#\/?/, "").split("?")[0];
  return VIEWS.some((v) => v.path === path) ? path : "usage";
}

function renderShell() {
  const who = session.who;
  const links = VIEWS.map((v) => h("li", {}, h("a", { href: `#/${v.path}`, dataset: { path: v.path } }, v.title)));
  const header = h(
    "header",
    { class: "topbar" },
    h("a", { class: "skip", href: "#main" }, "Skip to content"),
    h("span", { class: "brand" }, "Gateway console"),
    h(
      "div",
      { class: "who" },
      h("span", { "data-testid": "who" }, `${who.name} · `, h("strong", { class: `role role-${who.role}` }, who.role), who.org ? ` · org ${who.org}` : ""),
      h("button", { type: "button", class: "secondary small", onclick: () => signOut() }, "Sign out"),
    ),
  );
  const nav = h("nav", { class: "sidebar", "aria-label": "Console" }, h("ul", {}, links));
  const banner =
    who.role === "admin"
      ? null
      : h("p", { class: "readonly-banner", role: "note", "data-testid": "readonly-banner" }, "Read-only: this is a viewer token. Changes are disabled (and the API refuses them).");
  const main = h("main", { id: "main", tabindex: "-1" });
  const announcer = h("div", { id: "announcer", class: "announcer", role: "status", "aria-live": "polite", hidden: true });
  replace(root, header, h("div", { class: "layout" }, nav, h("div", { class: "content" }, banner, announcer, main)));
  document.body.classList.toggle("read-only", who.role !== "admin");
  route();
}

function route() {
  if (!session.token || !document.getElementById("main") || document.querySelector(".login-page")) return;
  const path = currentPath();
  const entry = VIEWS.find((v) => v.path === path);
  for (const link of document.querySelectorAll(".sidebar a")) {
    if (link.dataset.path === path) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (cleanup) cleanup();
  cleanup = null;
  announce("");
  const main = document.getElementById("main");
  replace(main);
  document.title = `${entry.title} · Gateway console`;
  const heading = h("h1", { tabindex: "-1" }, entry.title);
  main.append(heading);
  const context = { canWrite: session.canWrite, who: session.who, announce };
  cleanup = entry.view.render(main, context) || null;
  // Focus follows a change of view (not the first one: the page just loaded).
  if (routed) heading.focus();
  routed = true;
}

window.addEventListener("hashchange", route);

if (session.token && session.who) {
  // Check the token again (it may have been revoked since); the 401 handler signs out.
  const token = session.token;
  get("/v1/whoami")
    .then((who) => {
      if (session.token !== token) return; // signed out (or in again) meanwhile
      session.save(token, who);
      renderShell();
    })
    .catch((exc) => {
      if (!(exc instanceof ApiError && exc.status === 401)) signOut(`Cannot reach the admin API: ${exc.message}`);
    });
} else {
  renderLogin();
}
