// Start a fine-tune: a form that writes YAML, and the YAML itself, validated by the API
// server's own dry run (strict field validation names a typo) before it is created as you.

import {api, esc, runHash} from "./util.js";

export function cloneOf(o) {
  const spec = JSON.parse(JSON.stringify(o.spec));
  delete spec.stop;
  return {apiVersion: o.apiVersion, kind: o.kind, metadata: {name: o.metadata.name + "-2", namespace: o.metadata.namespace}, spec};
}

export function toYaml(v, indent = "") {
  if (Array.isArray(v)) return v.length ? v.map((x) => `\n${indent}- ${toYaml(x, indent + "  ").trimStart()}`).join("") : " []";
  if (v && typeof v === "object") return Object.keys(v).length ? Object.entries(v).map(([k, x]) => `\n${indent}${k}:${typeof x === "object" && x !== null ? toYaml(x, indent + "  ") : " " + JSON.stringify(x)}`).join("") : " {}";
  return " " + JSON.stringify(v);
}

export function fillEditor(obj) { const t = document.getElementById("yaml"); if (t) t.value = toYaml(obj).trimStart() + "\n"; }

// `createIn`: "*" (anywhere) or the namespaces where the user may create fine-tunes.
export function showNew(view, createIn, template = null) {
  const namespaces = createIn === "*" ? null : createIn;
  const field = (id, label, input) => `<div><label for="${id}">${label}</label>${input}</div>`;
  // Where the user may create (a namespace with no fine-tune yet can be typed).
  const nsInput = `<input id="f-ns" list="f-ns-list" value="${esc(namespaces && namespaces.length ? namespaces[0] : "default")}" autocomplete="off">
    <datalist id="f-ns-list">${(namespaces || []).map((n) => `<option value="${esc(n)}"></option>`).join("")}</datalist>`;
  view.innerHTML = `<p><a href="#/">← all fine-tunes</a></p><h2 id="new-title" tabindex="-1">New fine-tune</h2>
    <div class="card"><div class="form">
      ${field("f-name", "Name", `<input id="f-name" value="my-finetune" autocomplete="off">`)}
      ${field("f-ns", "Namespace", nsInput)}
      ${field("f-model", "Base model (hub id)", `<input id="f-model" value="google/gemma-3-1b-it">`)}
      ${field("f-method", "Method", `<select id="f-method"><option>lora</option><option>qlora</option><option>full</option></select>`)}
      ${field("f-data", "Dataset (hub id)", `<input id="f-data" value="HuggingFaceH4/no_robots">`)}
      ${field("f-secret", "Hub token Secret", `<input id="f-secret" value="hf">`)}
      ${field("f-steps", "Max steps", `<input id="f-steps" type="number" value="500">`)}
      ${field("f-lr", "Learning rate", `<input id="f-lr" value="0.0002">`)}
      ${field("f-gpus", "GPUs", `<input id="f-gpus" type="number" value="1">`)}
    </div><p><button type="button" id="to-yaml">Write the YAML below from these fields</button></p>
    <label for="yaml">The GemmaFineTune (edit freely; Validate asks the API server for a dry run)</label>
    <textarea id="yaml" spellcheck="false"></textarea>
    <p><button type="button" id="validate">Validate</button> <button type="button" id="create" class="primary">Create</button></p>
    <pre id="result" class="muted" role="status"></pre></div>`;
  document.getElementById("new-title").focus();
  const v = (id) => document.getElementById(id).value;
  const fromForm = () => fillEditor({apiVersion: "finetune.gemma.dev/v1alpha1", kind: "GemmaFineTune",
    metadata: {name: v("f-name"), namespace: v("f-ns")},
    spec: {model: {name: v("f-model"), hfTokenSecretRef: {name: v("f-secret"), key: "token"}},
      dataset: {hub: {id: v("f-data")}, format: "auto"}, method: {type: v("f-method")},
      training: {maxSteps: Number(v("f-steps")), learningRate: Number(v("f-lr"))}, resources: {gpus: Number(v("f-gpus"))}}});
  document.getElementById("to-yaml").onclick = fromForm;
  if (template) fillEditor(template); else fromForm();
  const submit = async (dryRun) => {
    const out = document.getElementById("result");
    try {
      const r = await api("/api/finetunes", {method: "POST", body: JSON.stringify({yaml: v("yaml"), dryRun})});
      const m = r.object.metadata;
      if (dryRun) { out.className = "muted"; out.textContent = "The API server accepts it (dry run)."; }
      else location.hash = runHash(m.namespace, m.name);
    } catch (e) { out.className = "error"; out.textContent = e.message; }
  };
  document.getElementById("validate").onclick = () => submit(true);
  document.getElementById("create").onclick = () => submit(false);
}
