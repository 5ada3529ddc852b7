"""The live list: one watch on every GemmaFineTune (the dashboard's own rights), kept in
memory and fanned out to every open page; and the pure summaries the pages show."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from gft_api.conventions import WARNING_REASONS

from gft_dashboard.apiserver import ApiError, ApiServer, Manifest

log = logging.getLogger("gft_dashboard.hub")
# Conditions whose reason is trouble worth a warning light: the operator's own list.
TROUBLE_REASONS = WARNING_REASONS


def summarize(obj: Manifest) -> dict[str, Any]:
    """One row of the list: what ``kubectl get gft`` shows, plus the status light."""
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status") or {}
    progress, metrics = status.get("progress") or {}, status.get("metrics") or {}
    phase = status.get("phase") or "Pending"
    trouble = next(
        (
            c
            for c in status.get("conditions") or []
            if c.get("reason") in TROUBLE_REASONS
            and not (c.get("type") == "MetricsAvailable" and c.get("status") == "True")
        ),
        None,
    )
    if phase == "Failed":
        light = "failed"
    elif trouble is not None or status.get("reason") in TROUBLE_REASONS:
        light = "warning"
    elif phase == "Succeeded":
        light = "done"
    elif phase in ("Running",):
        light = "running"
    else:
        light = "waiting"
    return {
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "created": meta.get("creationTimestamp"),
        "deleting": bool(meta.get("deletionTimestamp")),
        "model": (spec.get("model") or {}).get("name"),
        "method": (spec.get("method") or {}).get("type", "lora"),
        "suspend": bool(spec.get("suspend")),
        "phase": phase,
        "reason": status.get("reason") or (trouble or {}).get("reason"),
        "message": status.get("message") or (trouble or {}).get("message"),
        "light": light,
        "step": progress.get("step"),
        "totalSteps": progress.get("totalSteps"),
        "percent": 100.0 if phase == "Succeeded" else progress.get("percent"),
        "etaSeconds": progress.get("etaSeconds"),
        "loss": metrics.get("loss"),
        "evalLoss": metrics.get("evalLoss"),
        "gpuUtilization": metrics.get("gpuUtilization"),
        "lastCheckpoint": status.get("lastCheckpoint"),
        "tensorboardURL": status.get("tensorboardURL"),
    }


def gpu_series(metrics_text: str) -> list[dict[str, Any]]:
    """Per-GPU utilisation, memory, power and temperature from the trainer's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    gpus: dict[str, dict[str, Any]] = {}
    wanted = {
        "gft_gpu_utilization_ratio": "utilization",
        "gft_gpu_memory_used_bytes": "memoryUsedBytes",
        "gft_gpu_memory_total_bytes": "memoryTotalBytes",
        "gft_gpu_power_watts": "powerWatts",
        "gft_gpu_temperature_celsius": "temperatureCelsius",
    }
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key:
                gpu = sample.labels.get("gpu", "0")
                gpus.setdefault(gpu, {"gpu": gpu})[key] = sample.value
    return [gpus[k] for k in sorted(gpus)]


class FineTuneHub:
    """Every GemmaFineTune, from one list-then-watch; subscribers get each change."""

    def __init__(self, api: ApiServer) -> None:
        self.api = api
        self._objects: dict[str, Manifest] = {}
        self._subscribers: set[asyncio.Queue] = set()
        self.synced = False

    def objects(self) -> list[Manifest]:
        return sorted(
            self._objects.values(),
            key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]),
        )

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=1000)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

    def close(self) -> None:
        """Tell every open stream to end (the server is shutting down)."""
        for queue in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait((None, None))

    def _publish(self, kind: str, obj: Manifest) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait((kind, obj))
            except asyncio.QueueFull:  # a page that stopped reading: it reloads the list
                self._subscribers.discard(queue)

    async def run(self) -> None:
        """List, then watch from that resourceVersion; relist on 410 Gone or any error, with
        a back-off, so the hub never stops."""
        backoff = 1.0
        while True:
            try:
                version = await self._relist()
                backoff = 1.0
                await self._watch(version)
            except asyncio.CancelledError:
                raise
            except (TimeoutError, ApiError, OSError, ValueError) as e:
                log.warning("watch of gemmafinetunes ended (%s); again in %.0fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)
            except Exception:
                log.exception("watch of gemmafinetunes failed; again in %.0fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)

    async def _relist(self) -> str:
        listed = await self.api.request("GET", self.api.finetunes_path(), None)
        fresh = {o["metadata"]["uid"]: o for o in listed.get("items", [])}
        for uid, obj in self._objects.items():
            if uid not in fresh:
                self._publish("deleted", obj)
        for obj in fresh.values():
            self._publish("changed", obj)
        self._objects = fresh
        self.synced = True
        return listed.get("metadata", {}).get("resourceVersion", "")

    async def _watch(self, version: str) -> None:
        params = {
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "300",
        }
        buffer = b""
        async for chunk in self.api.stream(self.api.finetunes_path(), None, params):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    raise ApiError(obj.get("code", 500), obj.get("message", "watch error"))
                if kind == "BOOKMARK":
                    continue
                uid = obj["metadata"]["uid"]
                if kind == "DELETED":
                    self._objects.pop(uid, None)
                    self._publish("deleted", obj)
                else:
                    self._objects[uid] = obj
                    self._publish("changed", obj)
