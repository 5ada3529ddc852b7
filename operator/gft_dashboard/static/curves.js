// A run's curves, from start to now, read from its TensorBoard through the ticket the
// dashboard mints for this user (the sandboxed frame's address; no cookie is sent). What
// TensorBoard answers is the pod's: only what reads as numbers is kept.

import {api, enc, runPath} from "./util.js";

export const TAGS = {
  loss: ["train/loss", "eval/loss"],
  accuracy: ["train/token_accuracy", "eval/token_accuracy"],
  exactMatch: ["eval/exact_match"],
  learningRate: ["train/learning_rate"],
  throughput: ["train/tokens_per_second"],
};

// TensorBoard's address for a run, for this user (null when they may not, or it is not up).
export async function ticket(ns, name) {
  try { return (await api(`${runPath(ns, name)}/tensorboard`)).url; } catch { return null; }
}

// {tag: [[wallTime, step, value], ...]} for the tags that have points.
export async function scalars(base, ns, name, tags) {
  const run = enc(`${ns}/${name}`);
  const out = {};
  await Promise.all(tags.map(async (tag) => {
    try {
      const r = await fetch(`${base}data/plugin/scalars/scalars?run=${run}&tag=${enc(tag)}`, {credentials: "omit"});
      if (!r.ok) return;
      const got = await r.json();
      if (!Array.isArray(got)) return;
      const points = got.map((p) => (Array.isArray(p) ? [Number(p[0]), Number(p[1]), Number(p[2])] : []))
        .filter((p) => p.length === 3 && p.every(Number.isFinite));
      if (points.length) out[tag] = points;
    } catch { /* TensorBoard not up (yet, or any more) */ }
  }));
  return out;
}

// [[x, y]] on the step axis, or minutes since the run's first point on the time axis.
export function along(points, axis, start) {
  return axis === "time" ? points.map(([w, , v]) => [(w - start) / 60, v]) : points.map(([, s, v]) => [s, v]);
}

export function firstWallTime(byTag) {
  // A loop, not Math.min(...all): a long run's points spread as arguments throw a RangeError.
  let first = Infinity;
  for (const pts of Object.values(byTag)) for (const p of pts) first = Math.min(first, p[0]);
  return Number.isFinite(first) ? first : 0;
}
