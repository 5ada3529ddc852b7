// Try it: on a finished run, start (as you) a short-lived pod that serves the run's model, ask
// it questions and read its answer beside the base model's, as they come. The pod ends by
// itself after a while without a question. The answers are the model's: shown as text.

import {api, esc, ndjson, PREFIX, csrf, runPath, say} from "./util.js";

export class TryPanel {
  constructor(root, ns, name) {
    this.root = root; this.ns = ns; this.name = name; this.timer = null; this.state = null; this.drawn = false;
  }

  update(summary, can, pods) {
    const offered = summary.phase === "Succeeded" && can.tryStart;
    this.root.hidden = !offered;
    if (!offered) return;
    if (this.drawn) return;  // from here on, the panel asks for its pod itself
    this.draw(can);
    const own = pods.filter((p) => p.role === "try");
    this.show(own.length ? {pod: own[0], ready: own[0].ready && own[0].phase === "Running", phase: own[0].phase} : {pod: null, ready: false, phase: null});
  }

  draw(can) {
    this.drawn = true;
    this.root.innerHTML = `<h3 id="h-try">Try it</h3>
      <p class="muted">Ask this run's model, its answer beside the base model's. A pod serves it in the run's namespace, started as you, on the run's kind of node; it stops by itself after a while without a question.</p>
      <p><button type="button" id="try-start">Start</button> <button type="button" id="try-stop" hidden>Stop</button> <span id="try-state" role="status"></span></p>
      <form id="try-form" hidden>
        <label for="try-prompt">Question</label>
        <textarea id="try-prompt" rows="3" required></textarea>
        <p><button type="submit" id="try-ask" class="primary">Ask</button></p>
      </form>
      <div class="grid" id="try-answers" hidden>
        <div class="card"><h4>This run</h4><pre id="try-tuned" aria-live="polite"></pre><p class="muted" id="try-tuned-note"></p></div>
        <div class="card"><h4>Base model</h4><pre id="try-base" aria-live="polite"></pre><p class="muted" id="try-base-note"></p></div>
      </div>`;
    const q = (id) => this.root.querySelector("#" + id);
    q("try-start").onclick = async () => {
      q("try-start").disabled = true;
      try { this.show(await api(`${runPath(this.ns, this.name)}/try`, {method: "POST"})); this.poll(); }
      catch (e) { q("try-state").textContent = e.message; q("try-start").disabled = false; }
    };
    q("try-stop").onclick = async () => {
      try { await api(`${runPath(this.ns, this.name)}/try`, {method: "DELETE"}); say("Try-it pod stopping"); this.poll(); }
      catch (e) { q("try-state").textContent = e.message; }
    };
    q("try-form").onsubmit = (e) => { e.preventDefault(); this.ask(q("try-prompt").value); };
    if (!can.tryAsk) q("try-state").textContent = "You may start the pod but not talk to it (create pods/proxy).";
  }

  show(state) {
    this.state = state;
    const q = (id) => this.root.querySelector("#" + id);
    if (!q("try-state")) return;
    const live = state.pod && ["Pending", "Running"].includes(state.phase) && !state.pod.deleting;
    q("try-start").hidden = !!live;
    q("try-start").disabled = false;
    q("try-stop").hidden = !live;
    q("try-form").hidden = !state.ready;
    q("try-state").textContent = !state.pod ? "Not running."
      : state.ready ? `Ready (pod ${state.pod.name}).`
      : live ? `Starting (pod ${state.pod.name}, ${state.phase}): loading the model…`
      : `Stopped (pod ${state.pod.name}, ${state.phase}). Start it again to ask more.`;
    if (live && !state.ready) this.poll();
  }

  // Asked again every 2 s while the pod starts, and only while the tab is visible.
  poll() {
    clearTimeout(this.timer);
    this.timer = setTimeout(async () => {
      if (document.hidden) { this.poll(); return; }
      try { this.show(await api(`${runPath(this.ns, this.name)}/try`)); } catch { this.poll(); }
    }, 2000);
  }

  async ask(prompt) {
    const q = (id) => this.root.querySelector("#" + id);
    q("try-answers").hidden = false;
    for (const m of ["tuned", "base"]) { q(`try-${m}`).textContent = ""; q(`try-${m}-note`).textContent = "…"; }
    q("try-ask").disabled = true;
    try {
      const r = await fetch(`${PREFIX}${runPath(this.ns, this.name)}/try/ask`, {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf()}, body: JSON.stringify({prompt}),
      });
      if (!r.ok) {
        if (r.status === 409) this.poll();  // it stopped meanwhile (idle): say so
        throw new Error((await r.text()) || r.statusText);
      }
      for await (const line of ndjson(r)) {
        if (line.error) q("try-state").textContent = line.error;
        if (line.model && line.text) q(`try-${line.model}`).append(document.createTextNode(line.text));
        if (line.model && line.done) q(`try-${line.model}-note`).textContent = `${line.tokens ?? "?"} tokens${line.truncated ? ", cut at the answer length limit" : ""}`;
        if (line.end) say("Both answers are in");
      }
    } catch (e) { q("try-state").textContent = e.message; }
    q("try-ask").disabled = false;
  }

  close() { clearTimeout(this.timer); }
}
