"""Comparing runs: two to ``MAX_RUNS`` fine-tunes (in any namespaces the user may read), each
read as the user, side by side: the settings that differ (and those that do not), what each
run achieved and cost, and their sample answers to the same prompts. The curves are drawn by
the page from each run's TensorBoard (by ticket, as on the run page).

``GET /api/compare?run=NS/NAME&run=NS/NAME...``; the page's own URL (``#/compare?runs=...``)
is the shareable one. The comparing is pure (``spec_diff``, ``outcome``, ``sample_table``)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from gft_dashboard import names
from gft_dashboard.apiserver import ApiError, Manifest
from gft_dashboard.context import dash_of
from gft_dashboard.hub import summarize

MAX_RUNS = 8
# What a run achieved, from its status: (key in the answer, where in the status).
OUTCOME = (
    ("phase", ("phase",)),
    ("reason", ("reason",)),
    ("steps", ("result", "globalStep")),
    ("trainLoss", ("result", "trainLoss")),
    ("evalLoss", ("result", "evalLoss")),
    ("bestStep", ("result", "bestStep")),
    ("bestEvalLoss", ("result", "bestEvalLoss")),
    ("evalTokenAccuracy", ("result", "evalTokenAccuracy")),
    ("evalExactMatch", ("result", "evalExactMatch")),
    ("tokensPerSecond", ("result", "tokensPerSecond")),
    ("runtimeSeconds", ("result", "runtimeSeconds")),
    ("gpuSeconds", ("result", "cost", "gpuSeconds")),
    ("gpuHours", ("result", "cost", "gpuHours")),
    ("energyWh", ("result", "cost", "energyWh")),
)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths to leaves (``training.learningRate``); a list is one leaf, shown as JSON."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key in sorted(value):
            out.update(flatten(value[key], f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(value, list | dict):
        return {prefix: json.dumps(value, sort_keys=True)}
    return {prefix: value}


def spec_diff(specs: list[Manifest]) -> dict[str, list[dict[str, Any]]]:
    """The settings that differ between the specs (each run's value, None where a run has no
    such field) and those every run shares."""
    flat = [flatten(s) for s in specs]
    paths = sorted({p for f in flat for p in f})
    differs, same = [], []
    for path in paths:
        values = [f.get(path) for f in flat]
        if all(v == values[0] for v in values):
            same.append({"path": path, "value": values[0]})
        else:
            differs.append({"path": path, "values": values})
    return {"differs": differs, "same": same}


def outcome(obj: Manifest) -> dict[str, Any]:
    status = obj.get("status") or {}
    out: dict[str, Any] = {}
    for key, path in OUTCOME:
        value: Any = status
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        out[key] = value
    return out


def sample_table(objs: list[Manifest]) -> list[dict[str, Any]]:
    """Each prompt any run answered, with every run's answer to it (None: not asked)."""
    prompts: dict[str, dict[str, Any]] = {}
    for i, obj in enumerate(objs):
        result = (obj.get("status") or {}).get("result") or {}
        for sample in result.get("samples") or []:
            row = prompts.setdefault(
                sample.get("prompt", ""),
                {"prompt": sample.get("prompt", ""), "reference": sample.get("reference"),
                 "answers": [None] * len(objs)},
            )  # fmt: skip
            row["answers"][i] = {
                "answer": sample.get("answer", ""), "truncated": sample.get("truncated")
            }  # fmt: skip
    return list(prompts.values())


def runs_of(query: Any) -> list[tuple[str, str]]:
    """The ``run`` parameters, checked as Kubernetes names."""
    runs = query.getall("run", [])
    if not 2 <= len(runs) <= MAX_RUNS:
        raise web.HTTPBadRequest(text=f"name 2 to {MAX_RUNS} runs: ?run=NAMESPACE/NAME&run=...")
    out = []
    for run in runs:
        ns, _, name = run.partition("/")
        try:
            out.append((names.namespace(ns, "run namespace"), names.name(name, "run name")))
        except names.BadName as e:
            raise web.HTTPBadRequest(text=str(e)) from None
    if len(set(out)) != len(out):
        raise web.HTTPBadRequest(text="a run is named twice")
    return out


async def compare(request: web.Request) -> web.Response:
    dash = dash_of(request)
    who = dash.caller(request).identity
    runs = runs_of(request.query)

    async def read(ns: str, name: str) -> Manifest:
        try:
            return await dash.api.request("GET", dash.api.finetunes_path(ns, name), who)
        except ApiError as e:
            raise ApiError(e.status, f"{ns}/{name}: {e}", e.body) from None

    objs = await asyncio.gather(*(read(ns, name) for ns, name in runs))
    return web.json_response({
        "runs": [{"summary": summarize(o), "spec": o.get("spec") or {}, "outcome": outcome(o)}
                 for o in objs],
        "settings": spec_diff([o.get("spec") or {} for o in objs]),
        "samples": sample_table(objs),
    })  # fmt: skip
