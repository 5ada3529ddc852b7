// The run page, fed by its one live stream (`.../live`): every part (phase, conditions,
// events, pods, result, checkpoints, samples, the buttons) is drawn again when the run
// changes, the log follows from its tail, and the curves, GPUs and samples are read again
// only while the tab is visible and the run has not ended.

import {
  api, bar, confirmDialog, cost, duration, enc, esc, eta, light, LIGHT_WORDS, num, PREFIX, runPath, say, age,
} from "./util.js";
import {clearCharts, controls, lineChart, PALETTE, wireControls} from "./charts.js";
import {along, scalars, TAGS, ticket} from "./curves.js";
import {LogView} from "./log.js";
import {TryPanel} from "./tryit.js";

const TERMINAL = ["Succeeded", "Failed"];
const CURVES = [
  ["Loss", "loss", TAGS.loss], ["Token accuracy", "share", TAGS.accuracy], ["Exact match", "share", TAGS.exactMatch],
  ["Learning rate", "rate", TAGS.learningRate], ["Tokens per second", "tokens/s", TAGS.throughput],
];

export const KEEPS = {
  suspend: ["Suspend this run?", "The trainer saves a checkpoint and stops; the run waits with its GPUs freed. Resume continues from that checkpoint. Kept: the run, its checkpoints and everything on its output volume.", "Suspend"],
  stop: ["Stop this run for good?", "The trainer saves a checkpoint and the run ends as finished (Succeeded, reason Stopped). Kept: the run's record and result, its curves, and its output volume with that checkpoint, whose adapter you can try and use. It cannot be resumed; a new fine-tune can start from the checkpoint (resumeFrom).", "Stop"],
  delete: ["Delete this fine-tune?", "The trainer saves a checkpoint, then the fine-tune is deleted with its Job, TensorBoard and record (status, result, events). Kept: only its output volume (checkpoints, adapter), unless output.pvc.reclaimPolicy is Delete.", "Delete"],
};

export function showRun(view, ns, name, ctx) {
  view.innerHTML = `<p><a href="#/">← all fine-tunes</a></p>
    <h2 id="run-title" tabindex="-1"><span id="run-light"></span>${esc(ns)}/${esc(name)} <small class="muted" id="phase">…</small></h2>
    <p id="why" class="muted"></p>
    <p id="progress"></p>
    <div class="controls" id="controls" role="group" aria-label="Actions"></div>
    <p id="action-error" class="error" role="alert"></p>
    <div class="grid">
      <section class="card" aria-labelledby="h-result"><h3 id="h-result">Result</h3><div id="result" class="muted">not finished</div></section>
      <section class="card" aria-labelledby="h-gpus"><h3 id="h-gpus">GPUs</h3><div id="gpus" class="muted">…</div></section>
      <section class="card" aria-labelledby="h-samples"><h3 id="h-samples">Samples</h3><div id="samples" class="muted">…</div></section>
    </div>
    <section id="try" class="card" aria-labelledby="h-try" hidden></section>
    <section aria-labelledby="h-curves"><h3 id="h-curves">Curves</h3>${controls()}<div class="grid charts" id="curves"><p class="muted">Loading curves…</p></div></section>
    <section aria-labelledby="h-log"><h3 id="h-log">Log</h3><div id="logview"></div></section>
    <section aria-labelledby="h-trouble"><h3 id="h-trouble">Troubleshooting</h3>
      <div class="grid">
        <div class="card"><h4>Conditions</h4><div class="scroll" id="conditions"></div></div>
        <div class="card"><h4>Pods</h4><div class="scroll" id="pods"></div></div>
      </div>
      <div class="card"><h4>Events of the fine-tune, its Job and its pods</h4><div class="scroll" id="events"></div></div>
      <div class="card"><h4>The same from a terminal</h4><ul id="kubectl" class="commands"></ul><p id="grafana"></p><p id="notes" class="muted"></p></div>
    </section>
    <section aria-labelledby="h-tb"><h3 id="h-tb">TensorBoard</h3><div id="tb-frame"><p class="muted">Loading TensorBoard…</p></div></section>
    <details><summary>Spec</summary><pre id="spec"></pre></details>`;
  document.getElementById("run-title").focus();
  wireControls(view, () => drawCurves());

  let page = null, source = null, shownControls = "", tb = null, series = null, lastStep = null, finishedLoaded = false;
  let refreshDue = true, renew = null;
  const log = new LogView(document.getElementById("logview"), ns, name, (choice) => connect(choice));
  const tryPanel = new TryPanel(document.getElementById("try"), ns, name);

  function connect(choice = {}) {
    if (source) source.close();
    const p = new URLSearchParams({tailLines: "500"});
    if (choice.pod) p.set("pod", choice.pod);
    if (choice.container) p.set("container", choice.container);
    if (choice.previous) p.set("previous", "1");
    source = new EventSource(`${PREFIX}${runPath(ns, name)}/live?${p}`);
    source.addEventListener("run", (e) => render(JSON.parse(e.data)));
    source.addEventListener("log-start", (e) => log.start(JSON.parse(e.data)));
    source.addEventListener("log", (e) => log.lines(JSON.parse(e.data).lines));
    source.addEventListener("log-end", (e) => log.end(JSON.parse(e.data).reason));
    source.addEventListener("gone", (e) => { say(JSON.parse(e.data).reason); document.getElementById("why").textContent = JSON.parse(e.data).reason; document.getElementById("why").className = "error"; source.close(); });
    source.addEventListener("expired", () => ctx.expired());
    source.onerror = () => { if (source.readyState === EventSource.CLOSED) document.getElementById("why").textContent = "The live connection ended: reload to follow again."; };
  }

  function render(next) {
    const first = page === null;
    page = next;
    const o = page.object, s = page.summary, st = o.status || {};
    document.getElementById("run-light").innerHTML = light(s.light);
    document.getElementById("phase").textContent = `${s.phase}${s.reason ? " · " + s.reason : ""}${s.deleting ? " (deleting)" : ""} — ${LIGHT_WORDS[s.light] || s.light}`;
    const why = document.getElementById("why");
    why.textContent = s.message || "";
    why.className = s.light === "failed" || s.light === "warning" ? "error" : "muted";
    document.getElementById("progress").innerHTML = `${bar(s.percent)} step ${esc(s.step ?? "")} / ${esc(s.totalSteps ?? "")} · loss ${num(s.loss)}${s.evalLoss !== null && s.evalLoss !== undefined ? ` · eval loss ${num(s.evalLoss)}` : ""}${TERMINAL.includes(s.phase) ? "" : ` · ETA ${eta(s.etaSeconds)}`}`;
    renderControls(o, s, page.can);
    renderResult(st);
    renderTrouble();
    log.pods(page.pods);
    tryPanel.update(s, page.can, page.pods);
    document.getElementById("spec").textContent = JSON.stringify(o.spec, null, 2);
    if (first) startTensorBoard();
    if (s.step !== lastStep) { lastStep = s.step; refreshDue = true; }
    if (TERMINAL.includes(s.phase) && !finishedLoaded) refreshDue = true;
    refresh();
  }

  function renderControls(o, s, can) {
    const ended = TERMINAL.includes(s.phase) || s.deleting;
    const key = JSON.stringify([s.phase, s.suspend, s.stop, s.deleting, can]);
    if (key === shownControls) return;
    shownControls = key;
    const b = [];
    if (can.patch && !ended) {
      if (s.stop) b.push(`<span class="muted">Stopping: the trainer saves a checkpoint, then the run ends.</span>`);
      else {
        b.push(s.suspend ? `<button id="resume">Resume</button>` : `<button id="suspend">Suspend</button>`);
        b.push(`<button id="stop">Stop</button>`);
      }
    }
    if (can.delete && !s.deleting) b.push(`<button id="delete" class="danger">Delete</button>`);
    if (can.create) b.push(`<button id="clone">Clone with changes</button>`);
    if (!can.patch && !can.delete) b.push(`<span class="muted">You may watch this fine-tune, not change it.</span>`);
    const el = document.getElementById("controls");
    el.innerHTML = b.join(" ");
    const base = runPath(ns, name);
    const act = async (what, path, method) => {
      const [title, text, ok] = KEEPS[what] || [];
      if (title && !(await confirmDialog(title, text, ok))) return;
      try {
        await api(path, {method});
        say(`${what} asked for`);
        if (method === "DELETE") location.hash = "#/";
      } catch (e) { document.getElementById("action-error").textContent = e.message; }
    };
    const on = (id, f) => { const x = document.getElementById(id); if (x) x.onclick = f; };
    on("suspend", () => act("suspend", base + "/suspend", "POST"));
    on("resume", () => act("resume", base + "/resume", "POST"));
    on("stop", () => act("stop", base + "/stop", "POST"));
    on("delete", () => act("delete", base, "DELETE"));
    on("clone", () => ctx.clone(o));
  }

  function renderResult(st) {
    const r = st.result;
    const el = document.getElementById("result");
    const checkpoint = st.lastCheckpoint ? `<p>Last checkpoint: step ${esc(st.lastCheckpoint.step)}${st.lastCheckpoint.path ? ` <code>${esc(st.lastCheckpoint.path)}</code>` : ""}</p>` : "";
    if (!r) { el.innerHTML = `<p class="muted">not finished</p>${checkpoint}`; return; }
    const rows = [
      ["Outcome", `${r.outcome} (${r.reason})`], ["Steps", `${r.globalStep}${r.totalSteps ? " of " + r.totalSteps : ""}`],
      ["Train loss", num(r.trainLoss)], ["Eval loss", num(r.evalLoss)],
      ["Best step", r.bestStep ?? ""], ["Best eval loss", num(r.bestEvalLoss)],
      ["Eval token accuracy", num(r.evalTokenAccuracy)], ["Exact match", num(r.evalExactMatch)],
      ["Tokens per second", num(r.tokensPerSecond)], ["Run time", duration(r.runtimeSeconds)],
      ["Cost", cost(r.cost)], ["Exported", r.exportedStep !== undefined ? `step ${r.exportedStep}` : ""],
    ].filter(([, v]) => v !== "" && v !== undefined && v !== null);
    el.className = "";
    el.innerHTML = `<p>${esc(r.message || "")}</p><table class="kv">${rows.map(([k, v]) => `<tr><th scope="row">${esc(k)}</th><td>${esc(v)}</td></tr>`).join("")}</table>${checkpoint}
      ${Object.entries(r.artifacts || {}).map(([k, v]) => `<p>${esc(k)}: <code>${esc(v)}</code></p>`).join("")}`;
  }

  function renderTrouble() {
    const st = page.object.status || {};
    document.getElementById("conditions").innerHTML = `<table><thead><tr><th scope="col">Type</th><th scope="col">Status</th><th scope="col">Reason</th><th scope="col">Message</th><th scope="col">Since</th></tr></thead><tbody>${
      (st.conditions || []).map((c) => `<tr data-type="${esc(c.type)}"><td>${esc(c.type)}</td><td>${esc(c.status)}</td><td>${esc(c.reason)}</td><td class="msg">${esc(c.message)}</td><td>${age(c.lastTransitionTime)}</td></tr>`).join("")
      || `<tr><td colspan="5" class="muted">none yet</td></tr>`}</tbody></table>`;
    document.getElementById("pods").innerHTML = page.pods.length ? `<table><thead><tr><th scope="col">Pod</th><th scope="col">Role</th><th scope="col">Phase</th><th scope="col">Containers</th></tr></thead><tbody>${
      page.pods.map((p) => `<tr><td>${esc(p.name)}</td><td>${esc(p.role)}</td><td>${esc(p.phase)}${p.ready ? ", ready" : ""}${p.deleting ? ", stopping" : ""}</td><td class="msg">${
        p.containers.map((c) => `${esc(c.name)}: ${esc(c.state)}${c.reason ? " " + esc(c.reason) : ""}${c.exitCode !== null && c.exitCode !== undefined ? ` (exit ${esc(c.exitCode)})` : ""}${c.restarts ? `, ${esc(c.restarts)} restarts` : ""}${c.lastReason ? `, last ended ${esc(c.lastReason)}` : ""}`).join("<br>")}</td></tr>`).join("")}</tbody></table>`
      : `<p class="muted">no pods</p>`;
    document.getElementById("events").innerHTML = page.events.length ? `<table><thead><tr><th scope="col">When</th><th scope="col">Type</th><th scope="col">Object</th><th scope="col">Reason</th><th scope="col">Message</th><th scope="col">kubectl</th></tr></thead><tbody>${
      page.events.map((e) => `<tr class="${e.type === "Warning" ? "warn" : ""}"><td>${age(e.time)}${e.count > 1 ? ` ×${esc(e.count)}` : ""}</td><td>${e.type === "Warning" ? "⚠ Warning" : esc(e.type)}</td><td>${esc(e.kind)}/${esc(e.name)}</td><td>${esc(e.reason)}</td><td class="msg">${esc(e.message)}</td><td><code>${esc(e.kubectl)}</code></td></tr>`).join("")}</tbody></table>`
      : `<p class="muted">no events</p>`;
    document.getElementById("kubectl").innerHTML = page.kubectl.map((c) => `<li><code>${esc(c)}</code></li>`).join("");
    document.getElementById("grafana").innerHTML = page.grafana ? `<a href="${esc(page.grafana)}" target="_blank" rel="noopener noreferrer">This run in Grafana</a>` : "";
    document.getElementById("notes").textContent = (page.notes || []).join(" ");
  }

  async function startTensorBoard() {
    tb = await ticket(ns, name);
    const holder = document.getElementById("tb-frame");
    if (!holder) return;
    if (tb) {
      // Sandboxed without allow-same-origin: TensorBoard is the fine-tune author's content.
      // SVG charts: in a sandbox TensorBoard cannot start its chart worker.
      const frame = document.createElement("iframe");
      frame.id = "tb"; frame.title = "TensorBoard"; frame.referrerPolicy = "no-referrer";
      frame.setAttribute("sandbox", "allow-scripts");
      frame.src = tb + "?forceSVG=true";
      holder.replaceChildren(frame);
    } else holder.innerHTML = `<p class="muted">TensorBoard is not available to you for this run.</p>`;
    refreshDue = true;
    refresh();
    // TensorBoard's ticket lives minutes: asking again while the page is open renews it.
    if (tb) renew = setInterval(() => ticket(ns, name), 60000);
  }

  // Curves, GPUs and samples, read again only while someone looks and the run is not over
  // (after it ends, once more).
  let loading = false;
  async function refresh() {
    if (!page || !refreshDue || document.hidden || loading) return;
    refreshDue = false;
    loading = true;  // one round at a time: a slow TensorBoard never piles requests up
    const ended = TERMINAL.includes(page.summary.phase);
    if (ended) finishedLoaded = true;
    try {
      await Promise.all([loadCurves(), loadSamples(),
        ended ? (document.getElementById("gpus").innerHTML = `<p class="muted">The run has ended: no GPU in use.</p>`) : loadGpus()]);
    } finally { loading = false; }
    if (refreshDue) refresh();
  }
  const onVisible = () => { if (!document.hidden) refresh(); };
  document.addEventListener("visibilitychange", onVisible);

  // TensorBoard may not answer yet (a new trainer, or the one the operator starts after the
  // run): asked again every 5 s, a while, while the tab is visible.
  let curveTries = 0, retry = null;
  async function loadCurves() {
    if (!tb) return;
    const got = await scalars(tb, ns, name, Object.values(TAGS).flat());
    const answered = Object.keys(got).length > 0;
    if (answered || !series) { series = got; drawCurves(); }  // what was drawn stays meanwhile
    clearTimeout(retry);
    if (!answered && curveTries++ < 60) {
      retry = setTimeout(() => { refreshDue = true; refresh(); }, 5000);
    }
  }

  function drawCurves() {
    const el = document.getElementById("curves");
    if (!el || !series) return;
    clearCharts(el);
    el.replaceChildren();
    for (const [title, unit, tags] of CURVES) {
      const lines = tags.filter((t) => series[t]).map((t, i) => ({label: t, points: along(series[t], "step"), color: PALETTE[i], dash: t.startsWith("eval/") ? [6, 4] : undefined}));
      if (lines.length) lineChart(el, {title, xLabel: "step", yLabel: unit, series: lines});
    }
    if (!el.childElementCount) el.innerHTML = `<p class="muted">Curves appear once TensorBoard answers.</p>`;
  }

  async function loadSamples() {
    const el = document.getElementById("samples");
    const r = (page.object.status || {}).result;
    let shown = [];
    if (r && r.samples && r.samples.length) {
      shown = r.samples.map((x) => ({step: r.globalStep, prompt: x.prompt, answer: x.answer, reference: x.reference, truncated: x.truncated}));
    } else if (tb) {
      const base = `${tb}data/plugin/text/`, run = `${ns}/${name}`;
      try {
        const tags = ((await (await fetch(base + "tags", {credentials: "omit"})).json())[run] || []).filter((t) => t.startsWith("samples/")).sort();
        for (const tag of tags) {
          const r2 = await fetch(`${base}text?run=${enc(run)}&tag=${enc(tag)}`, {credentials: "omit"});
          const points = r2.ok ? await r2.json() : [];
          const last = points[points.length - 1];
          // TensorBoard renders the markdown to HTML: its text only, never its markup.
          if (last) shown.push({step: last.step, text: new DOMParser().parseFromString(String(last.text), "text/html").body.textContent});
        }
      } catch { /* TensorBoard not up (yet, or any more) */ }
    }
    el.className = "";
    el.innerHTML = shown.length ? shown.map((x) => `<div class="sample"><small class="muted">step ${esc(x.step)}</small>${x.text !== undefined ? `<pre>${esc(x.text.trim())}</pre>` : `
        <p><b>Prompt</b></p><pre>${esc(x.prompt)}</pre><p><b>Answer</b>${x.truncated ? ` <span class="tag" title="the answer was cut">cut: ${x.truncated === "maxNewTokens" ? "reached maxNewTokens" : "time budget"}</span>` : ""}</p><pre>${esc(x.answer)}</pre>${x.reference ? `<p><b>Reference</b></p><pre>${esc(x.reference)}</pre>` : ""}`}</div>`).join("")
      : `<p class="muted">Sample answers appear after the first evaluation.</p>`;
  }

  async function loadGpus() {
    const el = document.getElementById("gpus");
    try {
      const g = await api(`${runPath(ns, name)}/gpus`);
      const perPod = (g.pods || 1) > 1;
      el.className = "";
      el.innerHTML = (g.gpus.length ? `<div class="scroll"><table><thead><tr>${perPod ? "<th scope=\"col\">pod</th>" : ""}<th scope="col">GPU</th><th scope="col">util</th><th scope="col">memory</th><th scope="col">power</th><th scope="col">temp</th></tr></thead><tbody>${g.gpus.map((x) =>
        `<tr>${perPod ? `<td title="${esc(x.pod)}">${esc(x.index)}</td>` : ""}<td>${esc(x.gpu)}</td><td>${num((x.utilization || 0) * 100, 3)}%</td><td>${num((x.memoryUsedBytes || 0) / 2 ** 30, 3)} / ${num((x.memoryTotalBytes || 0) / 2 ** 30, 3)} GiB</td><td>${num(x.powerWatts, 3)} W</td><td>${num(x.temperatureCelsius, 3)} °C</td></tr>`).join("")}</tbody></table></div>`
        : `<p class="muted">${esc(g.error || "No GPU readings (no trainer running, or it runs without a GPU).")}</p>`)
        + (g.gpus.length && g.error ? `<p class="muted">${esc(g.error)}</p>` : "");
    } catch (e) { el.innerHTML = `<p class="error">${esc(e.message)}</p>`; }
  }

  connect();
  return () => {
    clearTimeout(retry);
    clearInterval(renew);
    if (source) source.close();
    tryPanel.close();
    document.removeEventListener("visibilitychange", onVisible);
    clearCharts(view);
  };
}

