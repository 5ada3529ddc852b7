// The dashboard's page: a list fed by server-sent events, a run page with curves (from
// TensorBoard's own scalars, so a page opened mid-run has the whole curve), the followed log,
// TensorBoard in a sandboxed frame (its own script can never act on this page), and the
// controls the signed-in user may use.
"use strict";

const PREFIX = document.body.dataset.prefix || "";
const view = document.getElementById("view");
let rows = new Map();       // "ns/name" -> summary
let stream = null;          // the list's EventSource
let leaveRun = () => {};    // stops the run page's timers and log stream
let mode = "token";         // how this dashboard authenticates (from /api/whoami)

const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
// Significant digits without trailing zeros after the point (100 stays 100).
const num = (v, d = 4) => (v === null || v === undefined ? "" : String(Number(Number(v).toPrecision(d))));
const csrf = () => (document.cookie.match(/(?:^|; )gft_csrf=([^;]+)/) || [])[1] || "";

async function api(path, options = {}) {
  const headers = {"X-CSRF-Token": csrf(), ...(options.body ? {"Content-Type": "application/json"} : {})};
  const r = await fetch(PREFIX + path, {credentials: "same-origin", ...options, headers});
  const text = await r.text();
  let body; try { body = JSON.parse(text); } catch { body = {error: text}; }
  if (!r.ok) {
    const e = new Error(body.error || text || r.statusText); e.status = r.status;
    if (r.status === 401 && signedIn) expired();
    throw e;
  }
  return body;
}

// -- the session ----------------------------------------------------------------------------

let signedIn = false;

// The session is over (signed out elsewhere, token expired or revoked): stop everything live
// and say so, instead of a page that silently stops moving.
function expired() {
  signedIn = false;
  if (stream) { stream.close(); stream = null; }
  leaveRun();
  const banner = document.getElementById("expired");
  banner.hidden = false;
  banner.querySelector("span").textContent = "Your session expired: nothing here updates any more.";
  document.getElementById("signout").hidden = true;
}

async function signOut() {
  if (stream) { stream.close(); stream = null; }
  leaveRun();
  signedIn = false;
  document.getElementById("signout").hidden = true;
  document.getElementById("who").textContent = "";
  document.getElementById("new-link").hidden = true;
  try { await api("/api/logout", {method: "POST"}); } catch { /* signed out either way */ }
  // Behind oauth2-proxy, its sign-out ends the session (ours ended this browser's tickets).
  if (mode === "proxy") { location.href = PREFIX + "/oauth2/sign_out?rd=" + encodeURIComponent(PREFIX + "/"); return; }
  signIn("Signed out.");
}

function age(ts) {
  if (!ts) return "";
  const s = Math.max(0, (Date.now() - Date.parse(ts)) / 1000);
  return s < 120 ? `${Math.round(s)}s` : s < 7200 ? `${Math.round(s / 60)}m` : s < 172800 ? `${Math.round(s / 3600)}h` : `${Math.round(s / 86400)}d`;
}
function eta(s) { return s === null || s === undefined ? "" : s < 90 ? `${s}s` : `${Math.round(s / 60)}m`; }
function bar(p) { return `<span class="bar"><span style="width:${Math.min(100, p || 0)}%"></span></span> ${p === null || p === undefined ? "" : num(p, 3) + "%"}`; }

function confirmDialog(title, text) {
  const d = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  return new Promise((resolve) => { d.onclose = () => resolve(d.returnValue === "ok"); d.showModal(); });
}

// -- sign-in -------------------------------------------------------------------------------

function signIn(message) {
  leaveRun();
  document.getElementById("expired").hidden = true;
  view.innerHTML = `<div class="card" style="max-width:520px"><h3>Sign in</h3>
    <p class="muted">Paste a Kubernetes bearer token (for example <code>kubectl create token NAME</code>).
    Everything you do here is done as you: the API server's RBAC decides.</p>
    <textarea id="token" style="min-height:80px"></textarea>
    <p><button class="primary" id="signin">Sign in</button> <span class="error" id="err">${esc(message || "")}</span></p></div>`;
  document.getElementById("signin").onclick = async () => {
    try { await api("/api/login", {method: "POST", body: JSON.stringify({token: document.getElementById("token").value})}); start(); }
    catch (e) { document.getElementById("err").textContent = e.message; }
  };
}

// -- the list -------------------------------------------------------------------------------

function renderList() {
  if (location.hash && location.hash !== "#/") return;
  const items = [...rows.values()].sort((a, b) => (a.namespace + a.name).localeCompare(b.namespace + b.name));
  view.innerHTML = `<table id="list"><thead><tr><th>Fine-tune</th><th>Phase</th><th>Progress</th><th>Loss</th>
    <th class="hide-narrow">GPU</th><th class="hide-narrow">ETA</th><th class="hide-narrow">Age</th><th class="hide-narrow">Why</th></tr></thead><tbody>
    ${items.map((r) => `<tr class="row" data-key="${esc(r.namespace)}/${esc(r.name)}">
      <td><span class="light ${esc(r.light)}" title="${esc(r.light)}"></span>${esc(r.namespace)}/<b>${esc(r.name)}</b></td>
      <td>${esc(r.phase)}${r.deleting ? " (stopping)" : ""}</td><td>${bar(r.percent)}</td><td>${num(r.loss)}</td>
      <td class="hide-narrow">${r.gpuUtilization === null || r.gpuUtilization === undefined ? "" : num(r.gpuUtilization * 100, 3) + "%"}</td>
      <td class="hide-narrow">${eta(r.etaSeconds)}</td><td class="hide-narrow">${age(r.created)}</td>
      <td class="msg hide-narrow">${r.light === "warning" || r.light === "failed" ? `<b>${esc(r.reason)}</b> ${esc(r.message)}` : ""}</td></tr>`).join("")
      || `<tr><td colspan="8" class="muted">No fine-tunes you may see yet.</td></tr>`}
    </tbody></table>`;
  for (const tr of view.querySelectorAll("tr.row")) tr.onclick = () => { location.hash = "#/ft/" + tr.dataset.key; };
}

function listen() {
  if (stream) stream.close();
  stream = new EventSource(PREFIX + "/api/stream");
  stream.addEventListener("snapshot", (e) => { rows = new Map(JSON.parse(e.data).map((r) => [`${r.namespace}/${r.name}`, r])); renderList(); });
  stream.addEventListener("changed", (e) => { const r = JSON.parse(e.data); rows.set(`${r.namespace}/${r.name}`, r); renderList(); onRunChanged(r); });
  stream.addEventListener("deleted", (e) => { const r = JSON.parse(e.data); rows.delete(`${r.namespace}/${r.name}`); renderList(); onRunChanged(null, r); });
  stream.addEventListener("expired", () => expired());
}

// -- the run page ---------------------------------------------------------------------------

const CURVES = [["loss", ["train/loss", "eval/loss"]], ["token accuracy", ["train/token_accuracy", "eval/token_accuracy"]],
  ["exact match", ["eval/exact_match"]], ["learning rate", ["train/learning_rate"]], ["tokens/s", ["train/tokens_per_second"]], ["samples/s", ["train/samples_per_second"]]];
let current = null; // {ns, name}

function chart(series) {
  if (!series.some((s) => s.points.length)) return `<p class="muted">no points yet</p>`;
  // Extents in a loop (a long series spread into Math.min throws: too many arguments), and at
  // most about 1000 points of each series drawn (TensorBoard's own sampling).
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const s of series) for (const [x, y] of s.points) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  series = series.map((s) => ({...s, points: s.points.filter((_, i) => i % Math.ceil(s.points.length / 1000) === 0)}));
  const sx = (x) => 40 + ((x - x0) / (x1 - x0 || 1)) * 550, sy = (y) => 140 - ((y - y0) / (y1 - y0 || 1)) * 125;
  const colours = ["#0969da", "#cf222e"];
  const lines = series.map((s, i) => `<polyline fill="none" stroke="${colours[i]}" stroke-width="1.6" points="${s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ")}"/>`
    + s.points.map((p) => `<circle cx="${sx(p[0]).toFixed(1)}" cy="${sy(p[1]).toFixed(1)}" r="1.8" fill="${colours[i]}"><title>${esc(s.tag)} step ${p[0]}: ${num(p[1])}</title></circle>`).join("")).join("");
  const legend = series.map((s, i) => `<tspan fill="${colours[i]}">■ ${esc(s.tag)} </tspan>`).join("");
  return `<svg class="chart" viewBox="0 0 600 160"><text x="40" y="10" font-size="10">${legend}</text>
    <text x="2" y="20" font-size="9">${num(y1)}</text><text x="2" y="140" font-size="9">${num(y0)}</text>
    <text x="40" y="156" font-size="9">step ${x0}</text><text x="560" y="156" font-size="9">${x1}</text>
    <line x1="40" y1="140" x2="590" y2="140" stroke="#d0d7de"/>${lines}</svg>`;
}

// TensorBoard's address for this run: a path with a ticket for this user (the sandboxed frame
// sends no cookie, and the page's own reads use the same path).
async function tensorboardBase(ns, name) {
  try { return (await api(`/api/finetunes/${encodeURIComponent(ns)}/${encodeURIComponent(name)}/tensorboard`)).url; }
  catch { return null; }
}

async function loadCurves(ns, name, tb) {
  if (!tb) return;
  const run = encodeURIComponent(`${ns}/${name}`);
  const base = `${tb}data/plugin/scalars/scalars?run=${run}&tag=`;
  const out = [];
  for (const [title, tags] of CURVES) {
    const series = [];
    for (const tag of tags) {
      try {
        const r = await fetch(base + encodeURIComponent(tag), {credentials: "omit"});
        // TensorBoard's answer is the pod's: only what reads as two numbers is drawn.
        const points = r.ok ? (await r.json()).map((p) => [Number(p[1]), Number(p[2])]) : [];
        if (r.ok) series.push({tag, points: points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y))});
      } catch { /* TensorBoard not up yet */ }
    }
    if (series.some((s) => s.points.length)) out.push(`<div class="card"><h3>${esc(title)}</h3>${chart(series.filter((s) => s.points.length))}</div>`);
  }
  const el = document.getElementById("curves");
  if (el) el.innerHTML = out.join("") || `<p class="muted">Curves appear once TensorBoard answers.</p>`;
}

// The latest sample answers, from TensorBoard's text tab (live); after the run, from its result.
async function loadSamples(ns, name, result, base) {
  const el = document.getElementById("samples");
  if (!el) return;
  const tb = `${base}data/plugin/text/`;
  const run = `${ns}/${name}`;
  const shown = [];
  try {
    if (!base) throw new Error("no TensorBoard");
    const tags = ((await (await fetch(tb + "tags", {credentials: "omit"})).json())[run] || [])
      .filter((t) => t.startsWith("samples/")).sort();
    for (const tag of tags) {
      const r = await fetch(`${tb}text?run=${encodeURIComponent(run)}&tag=${encodeURIComponent(tag)}`, {credentials: "omit"});
      const points = r.ok ? await r.json() : [];
      const last = points[points.length - 1];
      // TensorBoard renders the markdown to HTML; show its text only, never its markup.
      if (last) shown.push({step: last.step, text: new DOMParser().parseFromString(last.text, "text/html").body.textContent});
    }
  } catch { /* TensorBoard not up (yet, or any more) */ }
  if (!shown.length && result && result.samples) {
    for (const x of result.samples) shown.push({step: result.globalStep, text: `prompt\n${x.prompt}\nanswer\n${x.answer}` + (x.reference ? `\nreference\n${x.reference}` : "")});
  }
  el.innerHTML = shown.length ? shown.map((x) => `<div class="sample"><small class="muted">step ${esc(x.step)}</small><pre>${esc(x.text.trim())}</pre></div>`).join("")
    : `<p class="muted">Sample answers appear after the first evaluation.</p>`;
}

async function loadGpus(ns, name) {
  const el = document.getElementById("gpus");
  if (!el) return;
  try {
    const g = await api(`/api/finetunes/${ns}/${name}/gpus`);
    // A multi-node run shows each pod's GPUs, pod 0 first.
    const perPod = (g.pods || 1) > 1;
    el.innerHTML = (g.gpus.length ? `<table><tr>${perPod ? "<th>pod</th>" : ""}<th>GPU</th><th>util</th><th>memory</th><th>power</th><th>temp</th></tr>${g.gpus.map((x) =>
      `<tr>${perPod ? `<td title="${esc(x.pod)}">${esc(x.index)}</td>` : ""}<td>${esc(x.gpu)}</td><td>${num((x.utilization || 0) * 100, 3)}%</td><td>${num((x.memoryUsedBytes || 0) / 2 ** 30, 3)} / ${num((x.memoryTotalBytes || 0) / 2 ** 30, 3)} GiB</td><td>${num(x.powerWatts, 3)} W</td><td>${num(x.temperatureCelsius, 3)} °C</td></tr>`).join("")}</table>`
      : `<p class="muted">${esc(g.error || "No GPU readings (no trainer running, or it runs without a GPU).")}</p>`)
      + (g.gpus.length && g.error ? `<p class="muted">${esc(g.error)}</p>` : "");
  } catch (e) { el.innerHTML = `<p class="error">${esc(e.message)}</p>`; }
}

function followLog(ns, name) {
  const el = document.getElementById("log");
  const ctrl = new AbortController();
  (async () => {
    try {
      const r = await fetch(`${PREFIX}/api/finetunes/${ns}/${name}/log`, {credentials: "same-origin", signal: ctrl.signal});
      if (!r.ok) { el.textContent = (await r.text()) || r.statusText; return; }
      const reader = r.body.getReader(), dec = new TextDecoder();
      el.textContent = "";
      for (;;) {
        const {done, value} = await reader.read();
        if (done) break;
        const stick = el.scrollTop + el.clientHeight >= el.scrollHeight - 4;
        el.textContent += dec.decode(value, {stream: true});
        if (stick) el.scrollTop = el.scrollHeight;
      }
    } catch (e) { if (e.name !== "AbortError") el.textContent += `\n[log ended: ${e.message}]`; }
    if (/\[session expired/.test(el.textContent.slice(-200))) expired();
  })();
  return () => ctrl.abort();
}

async function showRun(ns, name) {
  leaveRun();
  current = {ns, name};
  let d;
  try { d = await api(`/api/finetunes/${ns}/${name}`); }
  catch (e) { view.innerHTML = `<p class="error">${esc(e.message)}</p>`; return; }
  const o = d.object, s = d.summary, st = o.status || {};
  const can = d.can;
  view.innerHTML = `<p><a href="#/">← all fine-tunes</a></p>
    <h2><span class="light ${esc(s.light)}"></span>${esc(ns)}/${esc(name)} <small class="muted" id="phase">${esc(s.phase)} ${esc(s.reason || "")}</small></h2>
    <p id="why" class="${s.light === "failed" || s.light === "warning" ? "error" : "muted"}">${esc(s.message || "")}</p>
    <p id="progress">${bar(s.percent)} step ${esc(s.step ?? "")} / ${esc(s.totalSteps ?? "")} · loss ${num(s.loss)} · ETA ${eta(s.etaSeconds)}</p>
    <div class="controls">
      ${can.patch && !["Succeeded", "Failed"].includes(s.phase) ? (s.suspend ? `<button id="resume">Resume</button>` : `<button id="suspend">Suspend</button>`) : ""}
      ${can.delete ? `<button id="stop" class="danger">Stop and delete</button>` : ""}
      ${can.create ? `<button id="clone">Clone with changes</button>` : ""}
      ${!can.patch && !can.delete ? `<span class="muted">You may watch this fine-tune, not change it.</span>` : ""}
    </div>
    <h3>Curves</h3><div class="grid" id="curves"><p class="muted">Loading curves…</p></div>
    <div class="grid" style="margin-top:12px">
      <div class="card"><h3>GPUs</h3><div id="gpus" class="muted">…</div></div>
      <div class="card"><h3>Samples</h3><div id="samples" class="muted">…</div></div>
      <div class="card"><h3>Result</h3><pre>${esc(st.result ? JSON.stringify(st.result, null, 2) : "not finished")}</pre>
        <h3>Last checkpoint</h3><pre>${esc(st.lastCheckpoint ? JSON.stringify(st.lastCheckpoint) : "none yet")}</pre></div>
    </div>
    <h3>Training log</h3><pre class="log" id="log">…</pre>
    <h3>TensorBoard</h3><div id="tb-frame"><p class="muted">Loading TensorBoard…</p></div>
    <div class="grid" style="margin-top:12px">
      <div class="card"><h3>Conditions</h3><table>${(st.conditions || []).map((c) => `<tr><td>${esc(c.type)}</td><td>${esc(c.status)}</td><td>${esc(c.reason)}</td><td class="msg">${esc(c.message)}</td></tr>`).join("")}</table></div>
      <div class="card"><h3>Events</h3><table>${d.events.map((e) => `<tr><td>${esc(e.type)}</td><td>${esc(e.reason)}</td><td class="msg">${esc(e.message)}</td><td>${age(e.time)}</td></tr>`).join("") || "<tr><td class='muted'>none</td></tr>"}</table></div>
      <div class="card"><h3>Spec</h3><pre>${esc(JSON.stringify(o.spec, null, 2))}</pre></div>
    </div>`;
  const action = async (path, method, title, text) => {
    if (text && !(await confirmDialog(title, text))) return;
    try { await api(path, {method}); if (method !== "DELETE") showRun(ns, name); else location.hash = "#/"; }
    catch (e) { document.getElementById("why").textContent = e.message; document.getElementById("why").className = "error"; }
  };
  const base = `/api/finetunes/${encodeURIComponent(ns)}/${encodeURIComponent(name)}`;
  const on = (id, f) => { const b = document.getElementById(id); if (b) b.onclick = f; };
  on("suspend", () => action(base + "/suspend", "POST", "Suspend this run?", "The trainer saves a checkpoint and stops; Resume continues from that checkpoint. Steps since the last checkpoint are saved first, nothing is lost."));
  on("resume", () => action(base + "/resume", "POST"));
  on("stop", () => action(base, "DELETE", "Stop and delete this fine-tune?", "The trainer saves a checkpoint, then the Job, TensorBoard and the other children are removed. The output claim (checkpoints, adapter) is kept."));
  on("clone", () => { location.hash = "#/new"; setTimeout(() => fillEditor(cloneOf(o)), 0); });
  const tb = await tensorboardBase(ns, name);
  const holder = document.getElementById("tb-frame");
  if (tb && holder) {
    // Sandboxed without allow-same-origin: TensorBoard is the fine-tune author's content.
    // SVG charts: in a sandbox TensorBoard cannot start its chart worker.
    const frame = document.createElement("iframe");
    frame.id = "tb"; frame.title = "TensorBoard"; frame.referrerPolicy = "no-referrer";
    frame.setAttribute("sandbox", "allow-scripts");
    frame.src = tb + "?forceSVG=true";
    holder.replaceChildren(frame);
  } else if (holder) holder.innerHTML = `<p class="muted">TensorBoard is not available to you for this run.</p>`;
  loadCurves(ns, name, tb); loadGpus(ns, name); loadSamples(ns, name, st.result, tb);
  const stopLog = followLog(ns, name);
  const timer = setInterval(() => { loadCurves(ns, name, tb); loadGpus(ns, name); loadSamples(ns, name, st.result, tb); }, 10000);
  // TensorBoard's ticket lives minutes: asking again while the page is open renews it.
  const renew = setInterval(() => tensorboardBase(ns, name), 60000);
  leaveRun = () => { stopLog(); clearInterval(timer); clearInterval(renew); current = null; leaveRun = () => {}; };
}

function onRunChanged(r, gone) {
  if (!current) return;
  if (gone && gone.namespace === current.ns && gone.name === current.name) { document.getElementById("phase").textContent = "deleted"; return; }
  if (!r || r.namespace !== current.ns || r.name !== current.name) return;
  const phase = document.getElementById("phase"), progress = document.getElementById("progress"), why = document.getElementById("why");
  if (phase) phase.textContent = `${r.phase} ${r.reason || ""}`;
  if (progress) progress.innerHTML = `${bar(r.percent)} step ${esc(r.step ?? "")} / ${esc(r.totalSteps ?? "")} · loss ${num(r.loss)} · ETA ${eta(r.etaSeconds)}`;
  if (why) { why.textContent = r.message || ""; why.className = r.light === "failed" || r.light === "warning" ? "error" : "muted"; }
}

// -- start a fine-tune ----------------------------------------------------------------------

function cloneOf(o) {
  const spec = JSON.parse(JSON.stringify(o.spec));
  return {apiVersion: o.apiVersion, kind: o.kind, metadata: {name: o.metadata.name + "-2", namespace: o.metadata.namespace}, spec};
}

function toYaml(v, indent = "") {
  if (Array.isArray(v)) return v.length ? v.map((x) => `\n${indent}- ${toYaml(x, indent + "  ").trimStart()}`).join("") : " []";
  if (v && typeof v === "object") return Object.keys(v).length ? Object.entries(v).map(([k, x]) => `\n${indent}${k}:${typeof x === "object" && x !== null ? toYaml(x, indent + "  ") : " " + JSON.stringify(x)}`).join("") : " {}";
  return " " + JSON.stringify(v);
}
function fillEditor(obj) { const t = document.getElementById("yaml"); if (t) t.value = toYaml(obj).trimStart() + "\n"; }

function showNew() {
  leaveRun();
  view.innerHTML = `<p><a href="#/">← all fine-tunes</a></p><h2>New fine-tune</h2>
    <div class="card"><div class="form">
      <div><label>Name</label><input id="f-name" value="my-finetune"></div>
      <div><label>Namespace</label><input id="f-ns" value="default"></div>
      <div><label>Base model (hub id)</label><input id="f-model" value="google/gemma-3-1b-it"></div>
      <div><label>Method</label><select id="f-method"><option>lora</option><option>qlora</option><option>full</option></select></div>
      <div><label>Dataset (hub id)</label><input id="f-data" value="HuggingFaceH4/no_robots"></div>
      <div><label>Hub token Secret</label><input id="f-secret" value="hf"></div>
      <div><label>Max steps</label><input id="f-steps" type="number" value="500"></div>
      <div><label>Learning rate</label><input id="f-lr" value="0.0002"></div>
      <div><label>GPUs</label><input id="f-gpus" type="number" value="1"></div>
    </div><p><button id="to-yaml">Write the YAML below from these fields</button></p>
    <label>The GemmaFineTune (edit freely; Validate asks the API server for a dry run)</label>
    <textarea id="yaml" spellcheck="false"></textarea>
    <p><button id="validate">Validate</button> <button id="create" class="primary">Create</button></p>
    <pre id="result" class="muted"></pre></div>`;
  const v = (id) => document.getElementById(id).value;
  const fromForm = () => fillEditor({apiVersion: "finetune.gemma.dev/v1alpha1", kind: "GemmaFineTune",
    metadata: {name: v("f-name"), namespace: v("f-ns")},
    spec: {model: {name: v("f-model"), hfTokenSecretRef: {name: v("f-secret"), key: "token"}},
      dataset: {hub: {id: v("f-data")}, format: "auto"}, method: {type: v("f-method")},
      training: {maxSteps: Number(v("f-steps")), learningRate: Number(v("f-lr"))}, resources: {gpus: Number(v("f-gpus"))}}});
  document.getElementById("to-yaml").onclick = fromForm;
  fromForm();
  const submit = async (dryRun) => {
    const out = document.getElementById("result");
    try {
      const r = await api("/api/finetunes", {method: "POST", body: JSON.stringify({yaml: v("yaml"), dryRun})});
      const m = r.object.metadata;
      if (dryRun) { out.className = "muted"; out.textContent = "The API server accepts it (dry run)."; }
      else location.hash = `#/ft/${m.namespace}/${m.name}`;
    } catch (e) { out.className = "error"; out.textContent = e.message; }
  };
  document.getElementById("validate").onclick = () => submit(true);
  document.getElementById("create").onclick = () => submit(false);
}

// -- routing --------------------------------------------------------------------------------

function route() {
  const h = location.hash || "#/";
  const m = h.match(/^#\/ft\/([^/]+)\/([^/]+)$/);
  if (m) return showRun(decodeURIComponent(m[1]), decodeURIComponent(m[2]));
  if (h === "#/new") return showNew();
  leaveRun();
  renderList();
}

async function start() {
  try {
    const me = await api("/api/whoami");
    mode = me.auth;
    signedIn = true;
    document.getElementById("expired").hidden = true;
    document.getElementById("who").textContent = me.user;
    document.getElementById("new-link").hidden = false;
    document.getElementById("signout").hidden = mode === "kubeconfig";
  } catch (e) {
    if (e.status === 401) return signIn();
    view.innerHTML = `<p class="error">${esc(e.message)}</p>`;
    return;
  }
  listen();
  window.onhashchange = route;
  route();
}

document.getElementById("signout").onclick = signOut;
document.getElementById("sign-in-again").onclick = () => (mode === "proxy" ? location.reload() : signIn());
start();
