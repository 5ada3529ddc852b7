// The list as a workbench: every fine-tune the user may see, live (the list's stream), searched
// and filtered, sorted by any column, each row a link to its run page (a new tab, the
// keyboard), and a choice of runs to compare.

import {age, bar, cost, enc, esc, eta, light, LIGHT_WORDS, num, runHash} from "./util.js";

const COLUMNS = [
  // [key, heading, value for sorting, cell, narrow screens hide it]
  ["name", "Fine-tune", (r) => `${r.namespace}/${r.name}`, null, false],
  ["model", "Model", (r) => r.model || "", (r) => esc(r.model), true],
  ["method", "Method", (r) => r.method || "", (r) => esc(r.method), true],
  ["phase", "Phase", (r) => r.phase, (r) => `${light(r.light)}${esc(r.phase)}${r.deleting ? " (deleting)" : r.stop && r.phase !== "Succeeded" ? " (stopping)" : ""}<span class="sr-only">, ${esc(LIGHT_WORDS[r.light] || r.light)}</span>`, false],
  ["percent", "Progress", (r) => r.percent ?? -1, (r) => bar(r.percent), false],
  ["loss", "Loss", (r) => r.loss ?? Infinity, (r) => num(r.loss), false],
  ["evalLoss", "Eval loss", (r) => r.evalLoss ?? Infinity, (r) => num(r.evalLoss), true],
  ["cost", "Cost", (r) => (r.cost ? r.cost.gpuSeconds : -1), (r) => esc(cost(r.cost)), true],
  ["gpu", "GPU", (r) => r.gpuUtilization ?? -1, (r) => (r.gpuUtilization === null || r.gpuUtilization === undefined ? "" : num(r.gpuUtilization * 100, 3) + "%"), true],
  ["eta", "ETA", (r) => r.etaSeconds ?? Infinity, (r) => eta(r.etaSeconds), true],
  ["age", "Age", (r) => -Date.parse(r.created || 0), (r) => age(r.created), true],
  ["why", "Why", (r) => r.reason || "", (r) => (r.light === "warning" || r.light === "failed" ? `<b>${esc(r.reason)}</b> ${esc(r.message)}` : ""), true],
];

const state = {q: "", namespace: "", phase: "", model: "", method: "", sort: "name", dir: 1, selected: new Set()};

let current = new Map();  // the rows last given (the stream replaces the map on a snapshot)

export function renderList(view, rows = current) {
  current = rows;
  let table = view.querySelector("#list");
  if (!table) {
    view.innerHTML = `<h2 id="list-title" tabindex="-1">Fine-tunes</h2>
      <form class="filters" role="search" aria-label="Filter fine-tunes">
        <label>Search <input type="search" id="f-q" placeholder="name or model"></label>
        <label>Namespace <select id="f-namespace"></select></label>
        <label>Phase <select id="f-phase"></select></label>
        <label>Model <select id="f-model"></select></label>
        <label>Method <select id="f-method"></select></label>
      </form>
      <p class="compare-bar"><button type="button" id="compare" disabled>Compare selected</button> <span id="shown" class="muted" aria-live="polite"></span></p>
      <div class="scroll"><table id="list"><caption class="sr-only">Fine-tunes you may see; choose a column heading to sort</caption>
        <thead><tr><th scope="col"><span class="sr-only">Compare</span></th>${COLUMNS.map(([key, heading, , , narrow]) =>
          `<th scope="col" class="${narrow ? "hide-narrow" : ""}" aria-sort="none" data-key="${key}"><button type="button" class="sort">${heading}</button></th>`).join("")}</tr></thead>
        <tbody></tbody></table></div>`;
    table = view.querySelector("#list");
    view.querySelector("form.filters").onsubmit = (e) => e.preventDefault();
    for (const key of ["q", "namespace", "phase", "model", "method"]) {
      const input = view.querySelector(`#f-${key}`);
      input.value = state[key];
      input.addEventListener(key === "q" ? "input" : "change", (e) => { state[key] = e.target.value; renderList(view); });
    }
    for (const th of table.querySelectorAll("th[data-key]")) {
      th.querySelector("button").onclick = () => {
        const key = th.dataset.key;
        state.dir = state.sort === key ? -state.dir : 1;
        state.sort = key;
        renderList(view);
      };
    }
    view.querySelector("#compare").onclick = () => {
      location.hash = `#/compare?runs=${[...state.selected].map(enc).join(",")}`;
    };
  }
  const all = [...rows.values()];
  options(view, "namespace", all.map((r) => r.namespace));
  options(view, "phase", all.map((r) => r.phase));
  options(view, "model", all.map((r) => r.model));
  options(view, "method", all.map((r) => r.method));
  const q = state.q.toLowerCase();
  const shown = all.filter((r) => (!q || `${r.namespace}/${r.name} ${r.model || ""}`.toLowerCase().includes(q))
    && (!state.namespace || r.namespace === state.namespace) && (!state.phase || r.phase === state.phase)
    && (!state.model || r.model === state.model) && (!state.method || r.method === state.method));
  const [, , sortValue] = COLUMNS.find((c) => c[0] === state.sort);
  shown.sort((a, b) => {
    const x = sortValue(a), y = sortValue(b);
    return (x < y ? -1 : x > y ? 1 : `${a.namespace}/${a.name}`.localeCompare(`${b.namespace}/${b.name}`)) * state.dir;
  });
  for (const th of table.querySelectorAll("th[data-key]")) {
    th.setAttribute("aria-sort", th.dataset.key === state.sort ? (state.dir > 0 ? "ascending" : "descending") : "none");
  }
  // Rows are kept and updated in place: a live change must not take the keyboard's place.
  const body = table.tBodies[0];
  const existing = new Map([...body.querySelectorAll("tr.row")].map((tr) => [tr.dataset.key, tr]));
  const wanted = [];
  for (const r of shown) {
    const key = `${r.namespace}/${r.name}`;
    let tr = existing.get(key);
    if (!tr) {
      tr = document.createElement("tr");
      tr.className = "row";
      tr.dataset.key = key;
      tr.innerHTML = `<td><input type="checkbox" aria-label="compare ${esc(key)}"></td>` + COLUMNS.map(([k, , , , narrow]) => `<td class="${narrow ? "hide-narrow" : ""} c-${k}"></td>`).join("");
      tr.querySelector("input").onchange = (e) => { if (e.target.checked) state.selected.add(key); else state.selected.delete(key); compareButton(view); };
      // The whole row opens the run (the name is the link: a new tab, the keyboard).
      tr.onclick = (e) => { if (!e.target.closest("a, input, button")) location.hash = tr.querySelector("a").getAttribute("href"); };
    }
    tr.querySelector("input").checked = state.selected.has(key);
    tr.className = `row ${r.light}`;
    for (const [k, , , cell] of COLUMNS) {
      const html = k === "name" ? `<a href="${runHash(r.namespace, r.name)}">${esc(r.namespace)}/<b>${esc(r.name)}</b></a>` : cell(r);
      const td = tr.querySelector(`.c-${k}`);
      if (td.dataset.html !== html) { td.innerHTML = html; td.dataset.html = html; }
    }
    wanted.push(tr);
    existing.delete(key);
  }
  for (const tr of existing.values()) tr.remove();
  const order = [...body.querySelectorAll("tr.row")];
  if (order.length !== wanted.length || order.some((tr, i) => tr !== wanted[i])) body.append(...wanted);
  let empty = body.querySelector("tr.empty");
  if (!wanted.length && !empty) {
    empty = document.createElement("tr");
    empty.className = "empty";
    empty.innerHTML = `<td colspan="${COLUMNS.length + 1}" class="muted">No fine-tunes you may see${all.length ? " match these filters" : " yet"}.</td>`;
    body.append(empty);
  } else if (wanted.length && empty) empty.remove();
  view.querySelector("#shown").textContent = `${shown.length} of ${all.length} fine-tunes`;
  for (const key of [...state.selected]) if (!rows.has(key)) state.selected.delete(key);
  compareButton(view);
}

function options(view, key, values) {
  const select = view.querySelector(`#f-${key}`);
  const list = [...new Set(values.filter(Boolean))].sort();
  const html = `<option value="">any</option>` + list.map((v) => `<option>${esc(v)}</option>`).join("");
  if (select.dataset.html !== html) { select.innerHTML = html; select.dataset.html = html; select.value = state[key]; }
}

function compareButton(view) {
  const button = view.querySelector("#compare");
  const n = state.selected.size;
  button.disabled = n < 2 || n > 8;
  button.textContent = n ? `Compare selected (${n})` : "Compare selected";
}
