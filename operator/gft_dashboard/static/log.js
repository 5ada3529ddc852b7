// The log view: it opens at the tail and follows (lines come on the run page's one stream),
// keeps at most MAX_LINES in the page (appending is a fragment per batch, never a rewrite of
// everything), loads earlier lines on demand, and offers a pod (each rank, each attempt), the
// previous container after a crash, search, wrap, pause and a download. Lines are text.

import {api, esc, PREFIX, runPath} from "./util.js";

const MAX_LINES = 5000;
const EARLIER = 500;

export class LogView {
  constructor(root, ns, name, onChoice) {
    this.root = root; this.ns = ns; this.name = name; this.onChoice = onChoice;
    this.pod = null; this.container = "trainer"; this.previous = false; this.pinned = false;
    this.paused = false; this.held = []; this.query = "";
    root.innerHTML = `<div class="log-tools" role="group" aria-label="Log">
        <label>Pod <select id="log-pod"></select></label>
        <label><input type="checkbox" id="log-previous"> Previous container</label>
        <label>Search <input type="search" id="log-search" placeholder="text in a line"></label>
        <label><input type="checkbox" id="log-wrap" checked> Wrap</label>
        <button type="button" id="log-pause" aria-pressed="false">Pause</button>
        <a id="log-download" download>Download</a>
        <span id="log-count" class="muted" aria-live="polite"></span>
      </div>
      <button type="button" id="log-earlier" class="link" hidden>Load earlier lines</button>
      <div class="log wrap" id="log" tabindex="0" role="log" aria-label="Training log"></div>
      <p id="log-state" class="muted"></p>`;
    this.el = root.querySelector("#log");
    const q = (id) => root.querySelector("#" + id);
    q("log-search").oninput = (e) => { this.query = e.target.value; this.filter(); };
    q("log-wrap").onchange = (e) => this.el.classList.toggle("wrap", e.target.checked);
    q("log-pause").onclick = (e) => {
      this.paused = !this.paused;
      e.target.setAttribute("aria-pressed", String(this.paused));
      e.target.textContent = this.paused ? `Resume (${this.held.length} new)` : "Pause";
      if (!this.paused) { const held = this.held; this.held = []; this.append(held); }
    };
    q("log-earlier").onclick = () => this.earlier();
    q("log-pod").onchange = (e) => this.choose(e.target.value, this.previous);
    q("log-previous").onchange = (e) => this.choose(this.pod, e.target.checked);
  }

  // The pods of the run, newest first (from the page's `run` event).
  pods(rows) {
    this.rows = rows;
    const select = this.root.querySelector("#log-pod");
    const current = this.pod;
    select.innerHTML = rows.map((p) => `<option value="${esc(p.name)}">${esc(p.name)} (${esc(p.role)}, ${esc(p.phase)}${p.containers.some((c) => c.restarts) ? ", restarted" : ""})</option>`).join("")
      || `<option value="">no pod yet</option>`;
    if (current) select.value = current;
    this.previousAllowed();
  }

  previousAllowed() {
    const row = (this.rows || []).find((p) => p.name === this.pod);
    const box = this.root.querySelector("#log-previous");
    const c = row && row.containers.find((x) => x.name === this.container);
    box.disabled = !(c && (c.restarts || c.lastReason)) && !this.previous;
  }

  choose(pod, previous) {
    const row = (this.rows || []).find((p) => p.name === pod);
    const container = row ? (row.role === "try" ? "try" : row.role === "tensorboard" ? "tensorboard" : "trainer") : "trainer";
    this.onChoice({pod, container, previous});
  }

  params() {
    const p = new URLSearchParams({container: this.container, previous: this.previous ? "1" : "0"});
    if (this.pod) p.set("pod", this.pod);
    return p;
  }

  // A new log follows (a new attempt, another pod): what was shown is cleared.
  start({pod, container, previous, pinned}) {
    Object.assign(this, {pod, container, previous, pinned, held: []});
    this.el.replaceChildren();
    this.root.querySelector("#log-pod").value = pod;
    this.root.querySelector("#log-previous").checked = previous;
    this.previousAllowed();
    this.root.querySelector("#log-earlier").hidden = true;
    this.root.querySelector("#log-state").textContent = `${pod}, container ${container}${previous ? " (previous)" : ""}: from its last lines`;
    this.root.querySelector("#log-download").href = `${PREFIX}${runPath(this.ns, this.name)}/log?download=1&${this.params()}`;
    this.first = null;
  }

  lines(batch) {
    if (this.paused) {
      this.held.push(...batch);
      this.root.querySelector("#log-pause").textContent = `Resume (${this.held.length} new)`;
      return;
    }
    this.append(batch);
  }

  node([ts, text]) {
    const line = document.createElement("div");
    line.textContent = text;
    if (ts) { line.dataset.ts = ts; line.title = ts; }
    if (this.query && !text.includes(this.query)) line.hidden = true;
    return line;
  }

  append(batch) {
    if (!batch.length) return;
    const stick = this.el.scrollTop + this.el.clientHeight >= this.el.scrollHeight - 4;
    const fragment = document.createDocumentFragment();
    for (const l of batch) fragment.append(this.node(l));
    this.el.append(fragment);
    if (this.first === null && batch[0][0]) this.first = batch[0][0];
    let extra = this.el.childElementCount - MAX_LINES;
    while (extra-- > 0) this.el.firstElementChild.remove();
    if (this.el.firstElementChild?.dataset.ts) {
      this.first = this.el.firstElementChild.dataset.ts;
      this.root.querySelector("#log-earlier").hidden = false;
    }
    if (stick) this.el.scrollTop = this.el.scrollHeight;
    this.count();
  }

  async earlier() {
    if (!this.first) return;
    const button = this.root.querySelector("#log-earlier");
    button.disabled = true;
    try {
      const p = this.params(); p.set("before", this.first); p.set("lines", String(EARLIER));
      const got = await api(`${runPath(this.ns, this.name)}/log/earlier?${p}`);
      const height = this.el.scrollHeight;
      const fragment = document.createDocumentFragment();
      for (const l of got.lines) fragment.append(this.node(l));
      this.el.prepend(fragment);
      if (got.lines.length) this.first = got.lines[0][0];
      this.el.scrollTop += this.el.scrollHeight - height;  // keep the reader's place
      button.hidden = !got.more;
      this.count();
    } catch (e) { this.root.querySelector("#log-state").textContent = e.message; }
    button.disabled = false;
  }

  filter() {
    for (const line of this.el.children) line.hidden = !!this.query && !line.textContent.includes(this.query);
    this.count();
  }

  count() {
    const all = this.el.childElementCount;
    const text = this.query ? `${[...this.el.children].filter((l) => !l.hidden).length} of ${all} lines match` : `${all} lines`;
    this.root.querySelector("#log-count").textContent = text;
  }

  end(reason) { this.root.querySelector("#log-state").textContent = reason; }
}
