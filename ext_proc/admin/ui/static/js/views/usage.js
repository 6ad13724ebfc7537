// Usage and cost: GET /v1/usage rollups over the last 24 h / 7 d / 30 d, in hour or day
// buckets (UTC), split by org, app, model or provider; totals, rates, latency, the top
// spenders, and a table that exports CSV. Every number is the API's, which is the same
// rollup `ext-proc usage` prints (the table says the equivalent command).

import { ApiError, get } from "../api.js";
import { h, replace, uid } from "../dom.js";
import * as fmt from "../format.js";
import { timeChart } from "../widgets/chart.js";

const RANGES = { "24h": 24 * 3600, "7d": 7 * 86400, "30d": 30 * 86400 };
const SPLITS = { "": "nothing", org_id: "organization", app_id: "application", model: "model", provider: "provider" };
const METRICS = {
  requests: { label: "Requests", format: (v) => fmt.short(v) },
  total_tokens: { label: "Tokens", format: (v) => fmt.short(v) },
  cost_usd: { label: "Cost (USD)", format: (v) => (v >= 1 ? `$${v.toFixed(2)}` : `$${Number(v.toPrecision(3))}`) },
};
const TABLE_GROUPS = {
  "app_id,model": "application and model",
  org_id: "organization",
  app_id: "application",
  model: "model",
  provider: "provider",
  "provider,deployment": "provider and deployment",
  key_id: "API key",
  environment: "environment",
  decision: "decision",
  status_class: "status class",
};
const MAX_SERIES = 8;
// The table's columns after its group keys: the rollup's measures, as `ext-proc usage` names them.
const COLUMNS = [
  ["requests", "requests"],
  ["prompt_tokens", "prompt"],
  ["completion_tokens", "completion"],
  ["total_tokens", "total"],
  ["cached_tokens", "cached"],
  ["cache_creation_tokens", "cache-write"],
  ["reasoning_tokens", "reasoning"],
  ["cost_usd", "cost_usd"],
  ["estimated_rows", "estimated"],
  ["errors", "errors"],
  ["denied", "denied"],
  ["avg_latency_ms", "avg ms"],
  ["p95_latency_ms", "p95 ms"],
];

function select(name, label, options, value) {
  const id = uid("sel");
  const control = h(
    "select",
    { id, name },
    Object.entries(options).map(([key, text]) => h("option", { value: key, selected: key === value }, text)),
  );
  return { control, element: h("div", { class: "field compact" }, h("label", { for: id }, label), control) };
}

function keyText(key, value) {
  if (value === null || value === undefined) return "(none)";
  if (key === "hour") return fmt.utc(value, { seconds: false });
  if (key === "day") return String(value).slice(0, 10);
  return String(value);
}

/** Bucket starts (seconds) from the one holding `since` to the one holding `until`. */
function buckets(since, until, bucket) {
  const step = bucket === "day" ? 86400 : 3600;
  const first = Math.floor(since.getTime() / 1000 / step) * step;
  const last = Math.floor((until.getTime() - 1) / 1000 / step) * step;
  const out = [];
  for (let t = first; t <= last; t += step) out.push(t);
  return out;
}

function measure(row, metric) {
  const value = row[metric];
  return value === null || value === undefined ? 0 : Number(value);
}

export function render(main, context) {
  const state = { range: "24h", bucket: "hour", split: "app_id", metric: "requests", table: "app_id,model" };
  const range = select("range", "Range", { "24h": "Last 24 hours", "7d": "Last 7 days", "30d": "Last 30 days" }, state.range);
  const bucket = select("bucket", "Buckets", { hour: "Hourly", day: "Daily" }, state.bucket);
  const split = select("split", "Split by", SPLITS, state.split);
  const metric = select("metric", "Show", Object.fromEntries(Object.entries(METRICS).map(([k, m]) => [k, m.label])), state.metric);
  const refresh = h("button", { type: "submit", class: "secondary" }, "Refresh");
  const controls = h("form", { class: "toolbar", "aria-label": "Usage range and grouping" }, range.element, bucket.element, split.element, metric.element, refresh);
  const rangeText = h("p", { class: "range-text", "data-testid": "usage-range" });
  const summary = h("dl", { class: "cards", "data-testid": "usage-summary" });
  const mainChart = h("div", { class: "chart" });
  const mainChartTitle = h("h2", {}, "Requests");
  const rateChart = h("div", { class: "chart" });
  const latencyChart = h("div", { class: "chart" });
  const topApps = h("div", { class: "top-list" });
  const topModels = h("div", { class: "top-list" });
  const tableSelect = select("table", "Rows by", TABLE_GROUPS, state.table);
  const exportButton = h("button", { type: "button", class: "secondary", disabled: true }, "Export CSV");
  const tableBox = h("div", { class: "table-scroll", tabindex: "0", role: "region", "aria-label": "Usage table" });
  const command = h("p", { class: "help command" });
  const error = h("p", { class: "form-error", role: "alert", hidden: true });

  main.append(
    controls,
    rangeText,
    error,
    h("section", { "aria-label": "Totals" }, summary),
    h("section", { class: "panel" }, mainChartTitle, mainChart),
    h(
      "div",
      { class: "grid-2" },
      h("section", { class: "panel" }, h("h2", {}, "Error and denial rates"), rateChart),
      h("section", { class: "panel" }, h("h2", {}, "Latency"), h("p", { class: "help" }, "Average, and p95 from the rollup's latency histogram (approximate: within a few percent)."), latencyChart),
    ),
    h(
      "div",
      { class: "grid-2" },
      h("section", { class: "panel" }, h("h2", {}, "Top applications by cost"), topApps),
      h("section", { class: "panel" }, h("h2", {}, "Top models by cost"), topModels),
    ),
    h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", {}, "Usage table"), h("div", { class: "toolbar" }, tableSelect.element, exportButton)), command, tableBox),
  );

  let charts = [];
  let generation = 0;
  let tableRows = [];
  let tableKeys = [];
  let window_ = null;
  const controller = new AbortController();

  function destroyCharts() {
    for (const chart of charts) chart.destroy();
    charts = [];
  }

  async function load() {
    generation += 1;
    const mine = generation;
    // Whole seconds (the range is the `ext-proc usage --since/--until` the table shows),
    // ending after now: the end is exclusive, so a range ending at now floored to the
    // second left out the requests made earlier in that second.
    const until = new Date((Math.floor(Date.now() / 1000) + 1) * 1000);
    const since = new Date(until.getTime() - RANGES[state.range] * 1000);
    const base = { since: fmt.isoSeconds(since), until: fmt.isoSeconds(until), limit: 100000 };
    main.setAttribute("aria-busy", "true");
    error.hidden = true;
    const query = (by) => get("/v1/usage", { ...base, by }, { signal: controller.signal });
    try {
      const [totals, perBucket, perSplit, apps, models, table] = await Promise.all([
        query(""),
        query(state.bucket),
        state.split ? query(`${state.bucket},${state.split}`) : Promise.resolve(null),
        query("app_id"),
        query("model"),
        query(state.table),
      ]);
      if (mine !== generation) return;
      window_ = { since: totals.since, until: totals.until };
      summary.dataset.since = totals.since;
      summary.dataset.until = totals.until;
      rangeText.textContent = `From ${fmt.utc(totals.since)} to ${fmt.utc(totals.until)} (${state.bucket === "day" ? "daily" : "hourly"} buckets, UTC).`;
      renderSummary(totals.rows[0] || {});
      destroyCharts();
      const x = buckets(since, until, state.bucket);
      renderMain(x, perBucket.rows, perSplit ? perSplit.rows : null);
      renderRates(x, perBucket.rows);
      renderTop(topApps, apps.rows, "app_id", "Application");
      renderTop(topModels, models.rows, "model", "Model");
      renderTable(table);
    } catch (exc) {
      if (exc.name === "AbortError") return;
      error.textContent = exc instanceof ApiError ? exc.message : `Cannot load usage: ${exc.message}`;
      error.hidden = false;
    } finally {
      if (mine === generation) main.removeAttribute("aria-busy");
    }
  }

  function renderSummary(row) {
    const requests = row.requests || 0;
    // Each card carries the rollup's own field and value (data-field, data-value): what
    // it shows is that number formatted, so it can be checked against GET /v1/usage.
    const items = [
      ["Requests", fmt.count(requests), "requests"],
      ["Tokens", fmt.count(row.total_tokens), "total_tokens", `${fmt.count(row.prompt_tokens)} prompt · ${fmt.count(row.completion_tokens)} completion`],
      ["Cost", fmt.usdShort(row.cost_usd), "cost_usd", row.cost_usd === null || row.cost_usd === undefined ? "no priced request" : fmt.usd(row.cost_usd)],
      ["Error rate", fmt.percent(row.errors || 0, requests), "errors", `${fmt.count(row.errors)} errors`],
      ["Denial rate", fmt.percent(row.denied || 0, requests), "denied", `${fmt.count(row.denied)} denied`],
      ["Avg latency", fmt.ms(row.avg_latency_ms), "avg_latency_ms"],
      ["p95 latency", row.p95_latency_ms === null || row.p95_latency_ms === undefined ? "–" : `≈ ${fmt.ms(row.p95_latency_ms)}`, "p95_latency_ms", "approximate"],
    ];
    replace(
      summary,
      items.map(([label, value, key, detail]) =>
        h("div", { class: "card", dataset: { field: key, value: row[key] ?? "" } }, h("dt", {}, label), h("dd", {}, h("span", { class: "value" }, value), detail ? h("span", { class: "detail" }, detail) : null)),
      ),
    );
  }

  function renderMain(x, perBucket, perSplit) {
    const m = METRICS[state.metric];
    mainChartTitle.textContent = `${m.label} per ${state.bucket}${state.split ? ` by ${SPLITS[state.split]}` : ""}`;
    const index = new Map(x.map((t, i) => [t, i]));
    const at = (row) => index.get(Math.floor(Date.parse(row[state.bucket]) / 1000));
    let series;
    if (!perSplit) {
      const values = x.map(() => 0);
      for (const row of perBucket) {
        const i = at(row);
        if (i !== undefined) values[i] += measure(row, state.metric);
      }
      series = [{ label: m.label, values }];
    } else {
      const totals = new Map();
      for (const row of perSplit) {
        const key = keyText(state.split, row[state.split]);
        totals.set(key, (totals.get(key) || 0) + measure(row, state.metric));
      }
      const ranked = [...totals.entries()].sort((a, b) => b[1] - a[1]).map(([key]) => key);
      const shown = ranked.slice(0, MAX_SERIES);
      const other = ranked.length > MAX_SERIES;
      const lines = new Map([...shown, ...(other ? ["other"] : [])].map((key) => [key, x.map(() => 0)]));
      for (const row of perSplit) {
        const i = at(row);
        if (i === undefined) continue;
        const key = keyText(state.split, row[state.split]);
        lines.get(lines.has(key) ? key : "other")[i] += measure(row, state.metric);
      }
      series = [...lines.entries()].map(([label, values]) => ({ label, values }));
      if (!series.length) series = [{ label: m.label, values: x.map(() => 0) }];
    }
    charts.push(timeChart(mainChart, { x, series, format: m.format, label: `${mainChartTitle.textContent}: ${series.map((s) => s.label).join(", ")}`, bucket: state.bucket }));
  }

  function renderRates(x, perBucket) {
    const index = new Map(x.map((t, i) => [t, i]));
    const errors = x.map(() => null);
    const denied = x.map(() => null);
    const avg = x.map(() => null);
    const p95 = x.map(() => null);
    for (const row of perBucket) {
      const i = index.get(Math.floor(Date.parse(row[state.bucket]) / 1000));
      if (i === undefined || !row.requests) continue;
      errors[i] = (100 * row.errors) / row.requests;
      denied[i] = (100 * row.denied) / row.requests;
      avg[i] = row.avg_latency_ms;
      p95[i] = row.p95_latency_ms;
    }
    const pct = (v) => `${Number(v.toFixed(1))}%`;
    charts.push(
      timeChart(rateChart, {
        x,
        series: [
          { label: "Errors", values: errors },
          { label: "Denied", values: denied },
        ],
        format: pct,
        label: "Error and denial rates per bucket, in percent of requests",
        bucket: state.bucket,
      }),
    );
    charts.push(
      timeChart(latencyChart, {
        x,
        series: [
          { label: "Average", values: avg },
          { label: "p95 (approx.)", values: p95 },
        ],
        format: (v) => `${v >= 10 ? Math.round(v) : Number(v.toFixed(1))} ms`,
        label: "Average and p95 latency per bucket, in milliseconds",
        bucket: state.bucket,
      }),
    );
  }

  function renderTop(box, rows, key, label) {
    const ranked = rows
      .filter((row) => row.requests > 0)
      .sort((a, b) => measure(b, "cost_usd") - measure(a, "cost_usd") || b.requests - a.requests)
      .slice(0, 8);
    if (!ranked.length) {
      replace(box, h("p", { class: "empty" }, "No requests in this range."));
      return;
    }
    const top = Math.max(...ranked.map((row) => measure(row, "cost_usd")), 0);
    replace(
      box,
      h(
        "table",
        { class: "data compact" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, label), h("th", { scope: "col", class: "num" }, "Cost"), h("th", { scope: "col", class: "num" }, "Requests"), h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "Share of the top cost")))),
        h(
          "tbody",
          {},
          ranked.map((row) => {
            const share = top > 0 ? measure(row, "cost_usd") / top : 0;
            return h(
              "tr",
              {},
              h("th", { scope: "row" }, keyText(key, row[key])),
              h("td", { class: "num" }, fmt.usd(row.cost_usd)),
              h("td", { class: "num" }, fmt.count(row.requests)),
              h("td", { class: "bar-cell", "aria-hidden": "true" }, h("span", { class: "bar", style: { width: `${Math.round(share * 100)}%` } })),
            );
          }),
        ),
      ),
    );
  }

  function renderTable(answer) {
    tableKeys = answer.group_by;
    tableRows = answer.rows;
    command.replaceChildren(
      "The same numbers from the command line: ",
      h("code", {}, `ext-proc usage --by ${tableKeys.join(",")} --since ${answer.since} --until ${answer.until}`),
    );
    exportButton.disabled = false;
    if (!tableRows.length) {
      replace(tableBox, h("p", { class: "empty" }, "No requests in this range."));
      return;
    }
    const sums = Object.fromEntries(COLUMNS.map(([name]) => [name, null]));
    for (const row of tableRows) {
      for (const [name] of COLUMNS) {
        if (name.endsWith("latency_ms")) continue;
        const value = row[name];
        if (value === null || value === undefined) continue;
        sums[name] = (sums[name] || 0) + Number(value);
      }
    }
    const table = h(
      "table",
      { class: "data usage-table", "data-testid": "usage-table", dataset: { since: answer.since, until: answer.until, by: tableKeys.join(",") } },
      h("caption", {}, `Usage by ${TABLE_GROUPS[state.table]}, ${fmt.utc(answer.since)} to ${fmt.utc(answer.until)}`),
      h("thead", {}, h("tr", {}, tableKeys.map((key) => h("th", { scope: "col" }, key)), COLUMNS.map(([, label]) => h("th", { scope: "col", class: "num" }, label)))),
      h(
        "tbody",
        {},
        tableRows.map((row) =>
          h(
            "tr",
            { dataset: { key: JSON.stringify(tableKeys.map((key) => row[key])) } },
            tableKeys.map((key, i) => h(i === 0 ? "th" : "td", i === 0 ? { scope: "row" } : {}, keyText(key, row[key]))),
            COLUMNS.map(([name]) => h("td", { class: "num", dataset: { col: name, value: row[name] ?? "" } }, cell(name, row[name]))),
          ),
        ),
      ),
      h(
        "tfoot",
        {},
        h(
          "tr",
          {},
          tableKeys.map((key, i) => h(i === 0 ? "th" : "td", i === 0 ? { scope: "row" } : {}, i === 0 ? "total" : "")),
          COLUMNS.map(([name]) => h("td", { class: "num" }, name.endsWith("latency_ms") ? "" : cell(name, sums[name]))),
        ),
      ),
    );
    replace(tableBox, table);
  }

  function cell(name, value) {
    if (value === null || value === undefined) return "–";
    if (name === "cost_usd") return fmt.usd(value);
    if (name.endsWith("latency_ms")) return Number(value).toFixed(1);
    return fmt.count(value);
  }

  function exportCsv() {
    const quote = (value) => {
      const text = value === null || value === undefined ? "" : String(value);
      return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
    };
    const header = [...tableKeys, ...COLUMNS.map(([name]) => name)];
    const lines = [header.map(quote).join(",")];
    for (const row of tableRows) lines.push(header.map((name) => quote(row[name])).join(","));
    const blob = new Blob([`${lines.join("\r\n")}\r\n`], { type: "text/csv" });
    const link = h("a", { href: URL.createObjectURL(blob), download: `usage-${tableKeys.join("-")}-${window_.since.slice(0, 19)}-${window_.until.slice(0, 19)}.csv`.replace(/:/g, "") });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
    context.announce(`Exported ${tableRows.length} rows as CSV.`);
  }

  range.control.addEventListener("change", () => {
    state.range = range.control.value;
    state.bucket = state.range === "24h" ? "hour" : "day";
    bucket.control.value = state.bucket;
    load();
  });
  bucket.control.addEventListener("change", () => {
    state.bucket = bucket.control.value;
    load();
  });
  split.control.addEventListener("change", () => {
    state.split = split.control.value;
    load();
  });
  metric.control.addEventListener("change", () => {
    state.metric = metric.control.value;
    load();
  });
  tableSelect.control.addEventListener("change", () => {
    state.table = tableSelect.control.value;
    load();
  });
  controls.addEventListener("submit", (event) => {
    event.preventDefault();
    load();
  });
  exportButton.addEventListener("click", exportCsv);

  load();
  return () => {
    controller.abort();
    destroyCharts();
  };
}
