// Comparing runs side by side: their curves overlaid (by step or by time since each began),
// the settings that differ (those that do not, folded), what each achieved and cost, and their
// answers to the same prompts. The address of the page is the comparison: share it.

import {api, cost, duration, enc, esc, num, runHash} from "./util.js";
import {clearCharts, controls, lineChart, PALETTE, wireControls} from "./charts.js";
import {along, firstWallTime, scalars, TAGS, ticket} from "./curves.js";

const CHARTS = [
  ["Training loss", "loss", "train/loss"], ["Evaluation loss", "loss", "eval/loss"],
  ["Evaluation token accuracy", "share", "eval/token_accuracy"], ["Training token accuracy", "share", "train/token_accuracy"],
  ["Exact match", "share", "eval/exact_match"], ["Learning rate", "rate", "train/learning_rate"],
];
// [key, label, format, which is best: -1 lower, 1 higher, 0 neither]
const OUTCOME = [
  ["phase", "Phase", String, 0], ["steps", "Steps", String, 0], ["trainLoss", "Train loss", num, -1],
  ["evalLoss", "Eval loss", num, -1], ["bestStep", "Best step", String, 0], ["bestEvalLoss", "Best eval loss", num, -1],
  ["evalTokenAccuracy", "Eval token accuracy", num, 1], ["evalExactMatch", "Exact match", num, 1],
  ["tokensPerSecond", "Tokens per second", num, 1], ["runtimeSeconds", "Run time", duration, 0],
  ["gpuHours", "GPU-hours", (v) => num(v, 4), -1], ["energyWh", "Energy (Wh)", (v) => num(v, 4), -1],
];

export function parseCompare(hash) {
  const query = new URLSearchParams(hash.split("?")[1] || "");
  const runs = (query.get("runs") || "").split(",").filter(Boolean).map(decodeURIComponent);
  return {runs, axis: query.get("x") === "time" ? "time" : "step"};
}

export function compareHash(runs, axis) {
  return `#/compare?runs=${runs.map(enc).join(",")}${axis === "time" ? "&x=time" : ""}`;
}

export async function showCompare(view, hash) {
  const {runs, axis} = parseCompare(hash);
  view.innerHTML = `<p><a href="#/">← all fine-tunes</a></p><h2 id="compare-title" tabindex="-1">Comparing ${runs.length} runs</h2>
    <p class="muted">This page's address is the comparison: <input id="share" class="share" readonly aria-label="Link to this comparison" value="${esc(location.href)}"></p>
    <div id="compare-body"><p class="muted">Loading…</p></div>`;
  document.getElementById("compare-title").focus();
  let got;
  try {
    got = await api(`/api/compare?${runs.map((r) => `run=${enc(r)}`).join("&")}`);
  } catch (e) {
    document.getElementById("compare-body").innerHTML = `<p class="error">${esc(e.message)}</p>`;
    return () => {};
  }
  const names = got.runs.map((r) => `${r.summary.namespace}/${r.summary.name}`);
  const swatch = (i) => `<span class="swatch" style="background:${PALETTE[i % PALETTE.length]}" aria-hidden="true"></span>`;
  const head = `<tr><th scope="col">Setting</th>${names.map((n, i) => `<th scope="col">${swatch(i)}<a href="${runHash(...n.split("/"))}">${esc(n)}</a></th>`).join("")}</tr>`;
  const settings = got.settings;
  const bestOf = (key, dir) => {
    const values = got.runs.map((r) => r.outcome[key]).filter((v) => typeof v === "number");
    if (!dir || values.length < 2) return null;
    return dir < 0 ? Math.min(...values) : Math.max(...values);
  };
  const outcomeRows = OUTCOME.filter(([key]) => got.runs.some((r) => r.outcome[key] !== null && r.outcome[key] !== undefined)).map(([key, label, fmt, dir]) => {
    const best = bestOf(key, dir);
    return `<tr><th scope="row">${esc(label)}</th>${got.runs.map((r) => {
      const v = r.outcome[key];
      const mark = best !== null && v === best ? ` <span class="tag">best</span>` : "";
      return `<td${mark ? ` class="best"` : ""}>${v === null || v === undefined ? "" : esc(fmt(v))}${mark}</td>`;
    }).join("")}</tr>`;
  }).join("");
  document.getElementById("compare-body").innerHTML = `
    <section aria-labelledby="h-c-curves"><h3 id="h-c-curves">Curves</h3>
      ${controls(`<label>Along <select id="axis"><option value="step">steps</option><option value="time">minutes since each began</option></select></label>`)}
      <p class="legend">${names.map((n, i) => `${swatch(i)}${esc(n)}`).join(" &nbsp; ")} <span class="muted">(evaluations dashed)</span></p>
      <div class="grid charts" id="compare-curves"><p class="muted">Loading curves…</p></div></section>
    <section aria-labelledby="h-c-settings"><h3 id="h-c-settings">Settings that differ</h3>
      <div class="scroll"><table id="differs">${head}${settings.differs.map((d) => `<tr><th scope="row"><code>${esc(d.path)}</code></th>${d.values.map((v) => `<td>${v === null || v === undefined ? `<span class="muted">(not set)</span>` : esc(v)}</td>`).join("")}</tr>`).join("")
        || `<tr><td colspan="${names.length + 1}" class="muted">none: these runs were set up the same</td></tr>`}</table></div>
      <details id="same"><summary>${settings.same.length} settings the same</summary><div class="scroll"><table>${settings.same.map((d) => `<tr><th scope="row"><code>${esc(d.path)}</code></th><td>${esc(d.value)}</td></tr>`).join("")}</table></div></details></section>
    <section aria-labelledby="h-c-results"><h3 id="h-c-results">Results</h3>
      <div class="scroll"><table id="outcomes">${head.replace("Setting", "")}${outcomeRows}
        <tr><th scope="row">Cost</th>${got.runs.map((r) => `<td>${esc(cost(r.summary.cost))}</td>`).join("")}</tr></table></div></section>
    <section aria-labelledby="h-c-samples"><h3 id="h-c-samples">Answers to the same prompts</h3>
      <div class="scroll"><table id="compare-samples"><tr><th scope="col">Prompt</th><th scope="col">Reference</th>${names.map((n, i) => `<th scope="col">${swatch(i)}${esc(n)}</th>`).join("")}</tr>
      ${got.samples.map((s) => `<tr><td><pre>${esc(s.prompt)}</pre></td><td><pre>${esc(s.reference || "")}</pre></td>${s.answers.map((a) => `<td>${a ? `<pre>${esc(a.answer)}</pre>${a.truncated ? `<span class="tag">cut: ${esc(a.truncated)}</span>` : ""}` : `<span class="muted">(not asked)</span>`}</td>`).join("")}</tr>`).join("")
        || `<tr><td colspan="${names.length + 2}" class="muted">no sample answers in these runs' results</td></tr>`}</table></div></section>`;
  const body = document.getElementById("compare-body");
  body.querySelector("#axis").value = axis;
  body.querySelector("#axis").onchange = (e) => { location.hash = compareHash(runs, e.target.value); };
  // Each run's curves from its own TensorBoard, by ticket (a TensorBoard not up yet is asked
  // again every 5 s, a while, while the tab is visible).
  const curves = got.runs.map(() => ({}));
  let closed = false, timer = null, tries = 0;
  const load = async () => {
    if (closed) return;
    if (!document.hidden) {
      await Promise.all(got.runs.map(async (r, i) => {
        if (Object.keys(curves[i]).length) return;
        const base = await ticket(r.summary.namespace, r.summary.name);
        if (base) curves[i] = await scalars(base, r.summary.namespace, r.summary.name, Object.values(TAGS).flat());
      }));
      draw();
    }
    if (curves.some((c) => !Object.keys(c).length) && tries++ < 60) timer = setTimeout(load, 5000);
  };
  const draw = () => {
    const el = document.getElementById("compare-curves");
    if (!el) return;
    clearCharts(el);
    el.replaceChildren();
    for (const [title, unit, tag] of CHARTS) {
      const lines = curves.map((c, i) => (c[tag] ? {label: names[i], points: along(c[tag], axis, firstWallTime(c)), color: PALETTE[i % PALETTE.length], dash: tag.startsWith("eval/") ? [6, 4] : undefined} : null)).filter(Boolean);
      if (lines.length) lineChart(el, {title, xLabel: axis === "time" ? "minutes" : "step", yLabel: unit, series: lines});
    }
    if (!el.childElementCount) el.innerHTML = `<p class="muted">No curves: these runs' TensorBoards do not answer (a run's TensorBoard stays up for a while after it ends).</p>`;
  };
  wireControls(body, draw);
  await load();
  return () => { closed = true; clearTimeout(timer); clearCharts(view); };
}
