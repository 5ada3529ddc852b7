// Small helpers every view shares: escaping (everything a pod or a user wrote is shown as
// text), numbers, the JSON API (with the CSRF header), the confirmation dialog.

export const PREFIX = document.body.dataset.prefix || "";

export const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
// Significant digits without trailing zeros after the point (100 stays 100).
export const num = (v, d = 4) => (v === null || v === undefined || v === "" || !Number.isFinite(Number(v)) ? "" : String(Number(Number(v).toPrecision(d))));
export const csrf = () => (document.cookie.match(/(?:^|; )gft_csrf=([^;]+)/) || [])[1] || "";
export const enc = encodeURIComponent;
export const runPath = (ns, name) => `/api/finetunes/${enc(ns)}/${enc(name)}`;
export const runHash = (ns, name) => `#/ft/${enc(ns)}/${enc(name)}`;

let onUnauthorized = () => {};
export function whenUnauthorized(f) { onUnauthorized = f; }

export async function api(path, options = {}) {
  const headers = {"X-CSRF-Token": csrf(), ...(options.body ? {"Content-Type": "application/json"} : {})};
  const r = await fetch(PREFIX + path, {credentials: "same-origin", ...options, headers});
  const text = await r.text();
  let body; try { body = JSON.parse(text); } catch { body = {error: text}; }
  if (!r.ok) {
    const e = new Error(body.error || text || r.statusText); e.status = r.status;
    if (r.status === 401) onUnauthorized();
    throw e;
  }
  return body;
}

export function age(ts) {
  if (!ts) return "";
  const s = Math.max(0, (Date.now() - Date.parse(ts)) / 1000);
  return s < 120 ? `${Math.round(s)}s` : s < 7200 ? `${Math.round(s / 60)}m` : s < 172800 ? `${Math.round(s / 3600)}h` : `${Math.round(s / 86400)}d`;
}
export function eta(s) { return s === null || s === undefined ? "" : s < 90 ? `${s}s` : `${Math.round(s / 60)}m`; }
export function duration(s) {
  if (s === null || s === undefined) return "";
  return s < 90 ? `${num(s, 3)} s` : s < 5400 ? `${num(s / 60, 3)} min` : `${num(s / 3600, 3)} h`;
}

// A run's cost in words: GPU-hours (GPU-seconds below a minute's worth) and energy.
export function cost(c) {
  if (!c) return "";
  const gpu = c.gpuSeconds < 60 ? `${num(c.gpuSeconds, 3)} GPU·s` : `${num(c.gpuHours, 3)} GPU·h`;
  return c.energyWh === null || c.energyWh === undefined ? gpu : `${gpu}, ${num(c.energyWh, 3)} Wh`;
}

// Progress as a bar with its number beside it (the bar alone would be colour and length only).
export function bar(p) {
  const v = p === null || p === undefined ? null : Math.min(100, Number(p));
  return `<span class="bar" role="progressbar" aria-valuemin="0" aria-valuemax="100"${v === null ? "" : ` aria-valuenow="${v}"`}><span style="width:${v || 0}%"></span></span> ${v === null ? "" : num(v, 3) + "%"}`;
}

// The status light always comes with its word: colour is never the only sign.
export const LIGHT_WORDS = {running: "running", done: "done", failed: "failed", warning: "needs attention", waiting: "waiting"};
export function light(l) { return `<span class="light ${esc(l)}" aria-hidden="true"></span>`; }

export function confirmDialog(title, text, ok = "Confirm") {
  const d = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-ok").textContent = ok;
  return new Promise((resolve) => { d.onclose = () => resolve(d.returnValue === "ok"); d.returnValue = ""; d.showModal(); });
}

// Announce something to screen readers (and show it in the status line).
export function say(text) {
  const el = document.getElementById("announce");
  if (el) el.textContent = text;
}

// Newline-delimited JSON from a fetch response, object by object.
export async function* ndjson(response) {
  const reader = response.body.getReader(), dec = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    buffer += dec.decode(value, {stream: true});
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines) if (line.trim()) yield JSON.parse(line);
  }
  if (buffer.trim()) yield JSON.parse(buffer);
}
