// Loaded first into TensorBoard's page, which the dashboard serves sandboxed (an opaque
// origin, so that its script can never act on the dashboard). There, reading localStorage or
// document.cookie throws and no Worker may be started from the page's address; TensorBoard
// expects all three. Give it storage that lives as long as the page, a cookie that is always
// empty, and no OffscreenCanvas, so that its charts draw on the page instead of in a worker.
"use strict";
(() => {
  const memory = () => {
    const m = new Map();
    return {
      getItem: (k) => (m.has(String(k)) ? m.get(String(k)) : null),
      setItem: (k, v) => { m.set(String(k), String(v)); },
      removeItem: (k) => { m.delete(String(k)); },
      clear: () => m.clear(),
      key: (i) => [...m.keys()][i] ?? null,
      get length() { return m.size; },
    };
  };
  for (const name of ["localStorage", "sessionStorage"]) {
    try { void window[name]; } catch { Object.defineProperty(window, name, {value: memory(), configurable: true}); }
  }
  try { void document.cookie; } catch {
    Object.defineProperty(document, "cookie", {get: () => "", set: () => {}, configurable: true});
  }
  delete window.OffscreenCanvas;
})();
