// The dashboard's page: plain ES modules, no build step. Routes: the list (#/), a run
// (#/ft/NS/NAME), a comparison (#/compare?runs=NS/A,NS/B), a new fine-tune (#/new).
// A tab holds one long connection at a time: the list's stream on the list, the run's on a
// run page (the list's is closed meanwhile).

import {api, esc, PREFIX, say, whenUnauthorized} from "./util.js";
import {renderList} from "./list.js";
import {showRun} from "./run.js";
import {showCompare} from "./compare.js";
import {cloneOf, showNew} from "./newft.js";

const view = document.getElementById("view");
let rows = new Map();  // "ns/name" -> summary
let stream = null;     // the list's EventSource
let leave = () => {};  // ends the current page's stream and timers
let mode = "token";    // how this dashboard authenticates (from /api/whoami)
let createIn = [];     // where the user may create fine-tunes ("*": anywhere)
let signedIn = false;
let cloned = null;

whenUnauthorized(() => { if (signedIn) expired(); });

// The session is over (signed out elsewhere, token expired or revoked): stop everything live
// and say so, instead of a page that silently stops moving.
function expired() {
  signedIn = false;
  closeList();
  leave();
  const banner = document.getElementById("expired");
  banner.hidden = false;
  banner.querySelector("span").textContent = "Your session expired: nothing here updates any more.";
  document.getElementById("signout").hidden = true;
}

async function signOut() {
  closeList();
  leave();
  signedIn = false;
  document.getElementById("signout").hidden = true;
  document.getElementById("who").textContent = "";
  document.getElementById("new-link").hidden = true;
  try { await api("/api/logout", {method: "POST"}); } catch { /* signed out either way */ }
  // Behind oauth2-proxy, its sign-out ends the session (ours ended this browser's tickets).
  if (mode === "proxy") { location.href = PREFIX + "/oauth2/sign_out?rd=" + encodeURIComponent(PREFIX + "/"); return; }
  signIn("Signed out.");
}

function signIn(message) {
  leave();
  document.getElementById("expired").hidden = true;
  view.innerHTML = `<div class="card narrow"><h2>Sign in</h2>
    <p class="muted">Paste a Kubernetes bearer token (for example <code>kubectl create token NAME</code>).
    Everything you do here is done as you: the API server's RBAC decides.</p>
    <label for="token">Bearer token</label><textarea id="token" rows="4" autocomplete="off"></textarea>
    <p><button class="primary" id="signin">Sign in</button> <span class="error" id="err" role="alert">${esc(message || "")}</span></p></div>`;
  document.getElementById("signin").onclick = async () => {
    try { await api("/api/login", {method: "POST", body: JSON.stringify({token: document.getElementById("token").value})}); start(); }
    catch (e) { document.getElementById("err").textContent = e.message; }
  };
}

// -- the list's stream ------------------------------------------------------------------------

function openList() {
  if (stream) return;
  stream = new EventSource(PREFIX + "/api/stream");
  stream.addEventListener("snapshot", (e) => { rows = new Map(JSON.parse(e.data).map((r) => [`${r.namespace}/${r.name}`, r])); onList(); });
  stream.addEventListener("changed", (e) => { const r = JSON.parse(e.data); rows.set(`${r.namespace}/${r.name}`, r); onList(); });
  stream.addEventListener("deleted", (e) => { const r = JSON.parse(e.data); rows.delete(`${r.namespace}/${r.name}`); onList(); });
  stream.addEventListener("expired", () => expired());
}
function closeList() { if (stream) { stream.close(); stream = null; } }
function onList() { if (isList()) renderList(view, rows); }
function isList() { return !location.hash || location.hash === "#/" || location.hash === "#"; }

// -- routing ----------------------------------------------------------------------------------

async function route() {
  leave();
  leave = () => {};
  const h = location.hash || "#/";
  const run = h.match(/^#\/ft\/([^/]+)\/([^/?]+)$/);
  if (run) {
    closeList();  // the run page's own stream is this tab's one connection
    const ns = decodeURIComponent(run[1]), name = decodeURIComponent(run[2]);
    document.title = `${ns}/${name} · Gemma fine-tunes`;
    leave = showRun(view, ns, name, {expired, clone: (o) => { cloned = cloneOf(o); location.hash = "#/new"; }});
    return;
  }
  if (h.startsWith("#/compare")) {
    closeList();
    document.title = "Comparing runs · Gemma fine-tunes";
    const done = showCompare(view, h);
    leave = () => { done.then((f) => f && f()); };
    return;
  }
  if (h === "#/new") {
    closeList();
    document.title = "New fine-tune · Gemma fine-tunes";
    showNew(view, createIn, cloned);
    cloned = null;
    return;
  }
  document.title = "Gemma fine-tunes";
  view.replaceChildren();
  renderList(view, rows);
  document.getElementById("list-title")?.focus();
  openList();
}

async function start() {
  try {
    const me = await api("/api/whoami");
    mode = me.auth;
    createIn = me.createIn;
    signedIn = true;
    document.getElementById("expired").hidden = true;
    document.getElementById("who").textContent = me.user;
    // Start a fine-tune: offered only to whoever may create one somewhere.
    document.getElementById("new-link").hidden = !(createIn === "*" || createIn.length);
    document.getElementById("signout").hidden = mode === "kubeconfig";
  } catch (e) {
    if (e.status === 401) return signIn();
    view.innerHTML = `<p class="error">${esc(e.message)}</p>`;
    return;
  }
  window.onhashchange = route;
  route();
  say("Signed in");
}

document.getElementById("signout").onclick = signOut;
document.getElementById("sign-in-again").onclick = () => (mode === "proxy" ? location.reload() : signIn());
start();
