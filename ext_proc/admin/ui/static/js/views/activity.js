// Live activity: finished requests streaming in from GET /v1/activity (server-sent
// events read with fetch(), so the token travels in the Authorization header), newest
// first; pausable, filtered by application and decision (the API filters).

import { ApiError, events, get } from "../api.js";
import { h, replace, uid } from "../dom.js";
import * as fmt from "../format.js";

const KEEP = 200; // rows shown
const HELD = 1000; // events kept while paused
const RETRY_MS = [1000, 2000, 5000, 10000];

export function render(main, context) {
  const appId = uid("app");
  const decisionId = uid("dec");
  const appFilter = h("select", { id: appId, name: "app" }, h("option", { value: "" }, "every application"));
  const decisionFilter = h(
    "select",
    { id: decisionId, name: "decision" },
    h("option", { value: "" }, "every decision"),
    ["allowed", "denied", "error"].map((d) => h("option", { value: d }, d)),
  );
  const pause = h("button", { type: "button", class: "secondary", "aria-pressed": "false", "data-testid": "pause" }, "Pause");
  const clearButton = h("button", { type: "button", class: "secondary" }, "Clear");
  const connection = h("span", { class: "connection", role: "status", "aria-live": "polite", "data-testid": "stream-state" }, "connecting…");
  const held = h("span", { class: "held", "aria-live": "polite" });
  const body = h("tbody", { "data-testid": "activity-rows" });
  const empty = h("p", { class: "empty" }, "Waiting for requests… Each request this replica finishes appears here as it ends.");
  main.append(
    h(
      "div",
      { class: "toolbar", role: "group", "aria-label": "Activity filters" },
      h("div", { class: "field compact" }, h("label", { for: appId }, "Application"), appFilter),
      h("div", { class: "field compact" }, h("label", { for: decisionId }, "Decision"), decisionFilter),
      pause,
      clearButton,
      connection,
      held,
    ),
    h("p", { class: "help" }, "This replica's requests (behind several replicas, each streams its own). ~ marks tokens the gateway estimated."),
    h(
      "div",
      { class: "table-scroll" },
      h(
        "table",
        { class: "data compact activity", "data-testid": "activity-table" },
        h("caption", { class: "visually-hidden" }, "Finished requests, newest first"),
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["Time (UTC)", "Request", "App", "Model", "Decision", "Policy", "Status", "Tokens", "Cost", "Latency"].map((t) => h("th", { scope: "col", class: ["Tokens", "Cost", "Latency", "Status"].includes(t) ? "num" : "" }, t)),
          ),
        ),
        body,
      ),
    ),
    empty,
  );

  let paused = false;
  let waiting = [];
  let controller = null;
  let stopped = false;
  let attempt = 0;
  let retryTimer = null;

  function row(event) {
    const tokens = event.total_tokens === null || event.total_tokens === undefined ? "–" : `${event.tokens_estimated ? "~" : ""}${fmt.count(event.total_tokens)}`;
    return h(
      "tr",
      { dataset: { requestId: event.request_id, decision: event.decision || "" }, class: `decision-${event.decision}` },
      h("td", {}, fmt.clock(event.time)),
      h("td", {}, h("code", { title: event.request_id }, String(event.request_id).slice(0, 13))),
      h("td", {}, event.app || "–", event.environment && event.environment !== "default" ? h("span", { class: "sub" }, ` ${event.environment}`) : null),
      h("td", {}, event.model || "–", event.provider ? h("div", { class: "sub" }, event.provider) : null),
      h("td", {}, h("span", { class: `badge decision ${event.decision}` }, event.decision || "–")),
      h("td", {}, event.policy || "–", event.error_code ? h("div", { class: "sub" }, event.error_code) : null),
      h("td", { class: "num" }, event.status ?? "–"),
      h("td", { class: "num", title: `${fmt.count(event.prompt_tokens)} prompt + ${fmt.count(event.completion_tokens)} completion` }, tokens),
      h("td", { class: "num" }, fmt.usd(event.cost_usd)),
      h("td", { class: "num" }, fmt.ms(event.latency_ms)),
    );
  }

  function show(list) {
    if (!list.length) return;
    empty.hidden = true;
    const fragment = document.createDocumentFragment();
    for (const event of list.slice().reverse()) fragment.append(row(event));
    body.prepend(fragment);
    while (body.rows.length > KEEP) body.lastElementChild.remove();
  }

  function receive(event) {
    if (paused) {
      waiting.push(event);
      if (waiting.length > HELD) waiting = waiting.slice(-HELD);
      held.textContent = `${waiting.length} new while paused`;
    } else {
      show([event]);
    }
  }

  async function connect() {
    if (stopped) return;
    controller = new AbortController();
    const query = { app: appFilter.value || null, decision: decisionFilter.value || null };
    connection.textContent = "connecting…";
    connection.className = "connection";
    try {
      const opened = () => {
        attempt = 0;
        connection.textContent = "live";
        connection.className = "connection live";
      };
      for await (const message of events("/v1/activity", query, controller.signal, { onOpen: opened })) {
        if (message.event === "request") receive(JSON.parse(message.data));
        else if (message.event === "dropped") {
          const lost = JSON.parse(message.data).dropped;
          context.announce(`${lost} requests were not shown: the console fell behind.`, "error");
        }
      }
      if (!stopped) retry("the stream ended");
    } catch (exc) {
      if (exc.name === "AbortError" || stopped) return;
      if (exc instanceof ApiError && exc.status === 401) return; // signed out
      retry(exc.message);
    }
  }

  function retry(reason) {
    const delay = RETRY_MS[Math.min(attempt, RETRY_MS.length - 1)];
    attempt += 1;
    connection.textContent = `disconnected (${reason}); retrying in ${delay / 1000} s`;
    connection.className = "connection down";
    retryTimer = setTimeout(connect, delay);
  }

  function clearRows() {
    replace(body);
    waiting = [];
    held.textContent = "";
    empty.hidden = false;
  }

  /** A filter changed: what is shown was chosen by the old one, so start empty. */
  function restart() {
    clearTimeout(retryTimer);
    if (controller) controller.abort();
    attempt = 0;
    clearRows();
    connect();
  }

  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    pause.setAttribute("aria-pressed", String(paused));
    if (!paused) {
      show(waiting);
      waiting = [];
      held.textContent = "";
    }
  });
  clearButton.addEventListener("click", clearRows);
  appFilter.addEventListener("change", restart);
  decisionFilter.addEventListener("change", restart);

  get("/v1/applications")
    .then((answer) => {
      for (const app of answer.data) appFilter.append(h("option", { value: app.name }, app.name));
    })
    .catch((exc) => {
      // The stream works without the list: the filter then offers "every application".
      context.announce(`Cannot list applications: ${exc.message}`, "error");
    });
  connect();
  return () => {
    stopped = true;
    clearTimeout(retryTimer);
    if (controller) controller.abort();
  };
}
