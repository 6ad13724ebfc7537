// Time-series charts (uPlot, vendored): one line per series over UTC time buckets.

import uPlot from "../../vendor/uplot/uPlot.esm.js";
import { h } from "../dom.js";

// Tableau 10: told apart by most readers, also with common colour-vision deficiencies.
export const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

const HEIGHT = 240;

/**
 * A line chart in `container`. `x`: bucket starts in seconds since the epoch; `series`:
 * [{label, values}] (null: no value); `format`: a value as text (axis and legend);
 * `label`: what the chart shows, for screen readers. Returns {destroy()}; it follows the
 * container's width.
 */
export function timeChart(container, { x, series, format = String, label, bucket = "hour" }) {
  const target = h("div", { class: "chart-canvas" });
  container.append(target);
  const width = () => Math.max(320, Math.floor(target.clientWidth || container.clientWidth || 640));
  const options = {
    width: width(),
    height: HEIGHT,
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
    cursor: { drag: { x: false, y: false } },
    legend: { live: true },
    scales: {
      x: { time: true },
      y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] },
    },
    axes: [
      { stroke: "#555", grid: { stroke: "#e6e6e6" }, ticks: { stroke: "#ccc" } },
      {
        stroke: "#555",
        grid: { stroke: "#e6e6e6" },
        ticks: { stroke: "#ccc" },
        size: 80,
        values: (u, values) => values.map((v) => format(v)),
      },
    ],
    series: [
      { label: "Time (UTC)", value: bucket === "day" ? "{YYYY}-{MM}-{DD}" : "{YYYY}-{MM}-{DD} {HH}:{mm}" },
      ...series.map((s, i) => ({
        label: s.label,
        stroke: PALETTE[i % PALETTE.length],
        width: 2,
        points: { show: x.length <= 48, size: 5 },
        spanGaps: false,
        value: (u, v) => (v === null || v === undefined ? "–" : format(v)),
      })),
    ],
  };
  const chart = new uPlot(options, [x, ...series.map((s) => s.values)], target);
  const canvas = target.querySelector("canvas");
  if (canvas) {
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", label);
  }
  let frame = 0;
  const observer = new ResizeObserver(() => {
    // Resized on the next frame, not inside the observer's callback (no resize loop).
    cancelAnimationFrame(frame);
    frame = requestAnimationFrame(() => {
      const next = width();
      if (next !== chart.width) chart.setSize({ width: next, height: HEIGHT });
    });
  });
  observer.observe(container);
  return {
    destroy() {
      observer.disconnect();
      cancelAnimationFrame(frame);
      chart.destroy();
    },
  };
}
