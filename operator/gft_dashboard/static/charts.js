// Line charts (uPlot, the one vendored library): readable axes with labels and gridlines, the
// exact values under the pointer in the legend, TensorBoard's smoothing, a log scale, zoom to
// a step range (drag across a chart, or type the range; a double click resets), and the same
// numbers as a table for whoever does not see the chart.

import uPlot from "./vendor/uplot/uPlot.esm.js";
import {esc, num} from "./util.js";

// Okabe-Ito: told apart with the common colour blindnesses; evaluations are dashed as well.
export const PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#8C6D1F", "#999999"];
const TABLE_ROWS = 200;

// The settings every chart of a page shares (the controls above them change them).
export const view = {smoothing: 0, log: false, from: null, to: null};

// TensorBoard's smoothing: an exponential moving average, debiased so that it starts at the
// first value rather than at 0.
export function smooth(ys, weight) {
  if (!weight) return ys;
  let last = 0, n = 0;
  return ys.map((y) => {
    if (y === null || !Number.isFinite(y)) return y;
    last = last * weight + (1 - weight) * y;
    n += 1;
    return last / (1 - Math.pow(weight, n));
  });
}

function cssVar(name, fallback) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
}

const charts = new Set();

// One chart in `holder`: {title, xLabel, yLabel, series: [{label, points: [[x, y]], color, dash}]}.
export function lineChart(holder, spec) {
  const figure = document.createElement("figure");
  figure.className = "chart";
  const id = "c" + Math.random().toString(36).slice(2, 8);
  figure.innerHTML = `<figcaption id="${id}">${esc(spec.title)}</figcaption><div class="plot" role="img" aria-labelledby="${id} ${id}-d"></div>
    <p class="sr-only" id="${id}-d"></p>
    <details><summary>Values as a table</summary><div class="scroll"><table class="values"></table></div></details>`;
  holder.append(figure);
  const chart = {figure, spec, plot: null};
  draw(chart);
  charts.add(chart);
  return chart;
}

export function redrawAll() { for (const c of charts) if (c.figure.isConnected) draw(c); else charts.delete(c); }
export function clearCharts(holder) { for (const c of charts) if (holder.contains(c.figure)) { c.plot?.destroy(); charts.delete(c); } }

function aligned(series) {
  // One x column for every series (uPlot's shape): the union of their x values, null where a
  // series has no point.
  const xs = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const columns = series.map((s) => {
    const col = new Array(xs.length).fill(null);
    for (const [x, y] of s.points) col[index.get(x)] = y;
    return col;
  });
  return [xs, ...columns];
}

function draw(chart) {
  const {figure, spec} = chart;
  const holder = figure.querySelector(".plot");
  chart.plot?.destroy();
  holder.replaceChildren();
  const series = spec.series.filter((s) => s.points.length);
  const positive = series.every((s) => s.points.every(([, y]) => y > 0));
  const log = view.log && positive;
  const [xs, ...raw] = aligned(series);
  const data = [xs, ...raw.map((ys) => smooth(ys, view.smoothing))];
  const fg = cssVar("--fg", "#1f2328"), grid = cssVar("--grid", "#d0d7de");
  const axis = {stroke: fg, grid: {stroke: grid, width: 1}, ticks: {stroke: grid}, font: "12px system-ui, sans-serif", labelFont: "bold 12px system-ui, sans-serif", labelSize: 18};
  const width = Math.max(260, holder.clientWidth || figure.clientWidth || 560);
  chart.plot = new uPlot({
    width, height: 220,
    scales: {x: {time: false, ...(view.from !== null || view.to !== null ? {min: view.from ?? xs[0], max: view.to ?? xs[xs.length - 1]} : {})}, y: {distr: log ? 3 : 1}},
    axes: [{...axis, label: spec.xLabel || "step"}, {...axis, label: spec.yLabel || "", size: 60, values: (u, ticks) => ticks.map((t) => num(t, 3))}],
    series: [{label: spec.xLabel || "step", value: (u, v) => (v === null ? "" : num(v, 6))},
      ...series.map((s) => ({label: s.label, stroke: s.color, width: 1.6, dash: s.dash, spanGaps: true, points: {show: s.points.length < 60, size: 4}, value: (u, v) => (v === null ? "—" : num(v, 6))}))],
    cursor: {drag: {x: true, y: false, setScale: true}, points: {size: 6}},
    legend: {live: true},
    hooks: {setScale: [(u, key) => { if (key === "x") describe(chart, u, data, series); }]},
  }, data, holder);
  figure.dataset.series = String(series.length);
  figure.dataset.log = String(log);
  describe(chart, chart.plot, data, series);
}

// The text alternative, for the visible step range: a sentence and a table of the values.
function describe(chart, u, data, series) {
  const {figure, spec} = chart;
  const [xs, ...cols] = data;
  const lo = u.scales.x.min ?? xs[0], hi = u.scales.x.max ?? xs[xs.length - 1];
  figure.dataset.xMin = String(lo);
  figure.dataset.xMax = String(hi);
  const rows = xs.map((x, i) => [x, i]).filter(([x]) => x >= lo && x <= hi);
  const every = Math.max(1, Math.ceil(rows.length / TABLE_ROWS));
  const shown = rows.filter((_, i) => i % every === 0 || i === rows.length - 1);
  figure.querySelector("table.values").innerHTML = `<thead><tr><th scope="col">${esc(spec.xLabel || "step")}</th>${series.map((s) => `<th scope="col">${esc(s.label)}</th>`).join("")}</tr></thead>
    <tbody>${shown.map(([x, i]) => `<tr><th scope="row">${num(x, 6)}</th>${cols.map((c) => `<td>${c[i] === null ? "" : num(c[i], 6)}</td>`).join("")}</tr>`).join("")}</tbody>`;
  const words = series.map((s, k) => {
    const pts = rows.map(([x, i]) => [x, cols[k][i]]).filter(([, y]) => y !== null);
    if (!pts.length) return `${s.label}: no values in this range`;
    const [a, b] = [pts[0], pts[pts.length - 1]];
    return `${s.label} from ${num(a[1])} at ${num(a[0])} to ${num(b[1])} at ${num(b[0])}`;
  });
  figure.querySelector(".sr-only").textContent = `${spec.title}, ${spec.xLabel || "step"} ${num(lo)} to ${num(hi)}: ${words.join("; ")}.`;
}

// The controls above a page's charts; `onChange` redraws them.
export function controls(extra = "") {
  return `<div class="chart-controls" role="group" aria-label="Chart settings">
    <label>Smoothing <input type="range" id="smoothing" min="0" max="0.99" step="0.01" value="${view.smoothing}"> <output id="smoothing-value">${view.smoothing}</output></label>
    <label><input type="checkbox" id="logscale" ${view.log ? "checked" : ""}> Log scale</label>
    <label>From <input type="number" id="x-from" inputmode="numeric" size="6" value="${view.from ?? ""}"></label>
    <label>to <input type="number" id="x-to" inputmode="numeric" size="6" value="${view.to ?? ""}"></label>
    <button type="button" id="zoom-reset">Whole run</button> ${extra}
    <small class="muted">Drag across a chart to zoom; double-click to zoom out.</small></div>`;
}

export function wireControls(root, redraw = redrawAll) {
  const q = (id) => root.querySelector("#" + id);
  q("smoothing").oninput = (e) => { view.smoothing = Number(e.target.value); q("smoothing-value").textContent = e.target.value; redraw(); };
  q("logscale").onchange = (e) => { view.log = e.target.checked; redraw(); };
  const range = () => {
    const f = q("x-from").value, t = q("x-to").value;
    view.from = f === "" ? null : Number(f); view.to = t === "" ? null : Number(t); redraw();
  };
  q("x-from").onchange = range; q("x-to").onchange = range;
  q("zoom-reset").onclick = () => { view.from = view.to = null; q("x-from").value = q("x-to").value = ""; redraw(); };
}

// Charts follow their container's width (not its height: a growing log must not redraw them).
let lastWidth = 0;
new ResizeObserver((entries) => {
  const width = Math.round(entries[0].contentRect.width);
  if (width !== lastWidth) { lastWidth = width; redrawAll(); }
}).observe(document.getElementById("view"));
