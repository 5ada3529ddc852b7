"""The live list: one watch on every GemmaFineTune (the dashboard's own rights), kept in
memory and fanned out to every open page; who may see which namespace of it (asked of the
API server as each user, cached and bounded); and the pure summaries the pages show."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from gft_api.conventions import WARNING_REASONS

from gft_dashboard.apiserver import AnswerTooLarge, ApiError, ApiServer, Identity, Manifest

log = logging.getLogger("gft_dashboard.hub")
PAGE_SIZE = 50  # objects per page of the list (each may carry up to 256 KiB of annotations)
QUEUE_SIZE = 1000  # changes a page may fall behind before it is sent a fresh snapshot
# The API server sends a bookmark on a watch about once a minute (and the watch ends after
# timeoutSeconds): a watch silent this long is a connection that died without a word.
WATCH_IDLE_SECONDS = 150.0
# Conditions whose reason is trouble worth a warning light: the operator's own list.
TROUBLE_REASONS = WARNING_REASONS


def summarize(obj: Manifest) -> dict[str, Any]:
    """One row of the list: what ``kubectl get gft`` shows, plus the status light."""
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status") or {}
    progress, metrics = status.get("progress") or {}, status.get("metrics") or {}
    result = status.get("result") or {}
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
        "evalLoss": metrics.get("evalLoss", result.get("evalLoss")),
        "gpuUtilization": metrics.get("gpuUtilization"),
        "lastCheckpoint": status.get("lastCheckpoint"),
        "tensorboardURL": status.get("tensorboardURL"),
        "stop": bool(spec.get("stop")),
        "cost": result.get("cost"),
        "bestEvalLoss": result.get("bestEvalLoss"),
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
    """Every GemmaFineTune, from one list-then-watch; subscribers get each change.

    The list is read in pages of ``page_size`` (halved while a page is too large an answer);
    a relist (at start, and after the watch failed or its resourceVersion expired) publishes
    only what differs from what subscribers already have. A watch that simply ended, or was
    silent for ``idle_seconds`` (a connection that died without closing), is started again
    from the last resourceVersion it saw (bookmarks keep that current), without a relist.
    ``synced`` is False from a failed watch or list until a list succeeds again (/healthz).

    A subscriber that falls ``QUEUE_SIZE`` changes behind (a page that stopped reading) is
    not dropped: its queue is emptied and given one ("resync", None), on which its stream
    sends a fresh snapshot."""

    def __init__(
        self, api: ApiServer, page_size: int = PAGE_SIZE, idle_seconds: float = WATCH_IDLE_SECONDS
    ) -> None:
        self.api = api
        self.page_size = page_size
        self.idle_seconds = idle_seconds
        self._objects: dict[str, Manifest] = {}
        self._subscribers: set[asyncio.Queue] = set()
        self.synced = False

    def objects(self) -> list[Manifest]:
        return sorted(
            self._objects.values(),
            key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]),
        )

    def namespaces(self) -> set[str]:
        """The namespaces that hold a fine-tune (the only ones worth asking about)."""
        return {o["metadata"].get("namespace", "") for o in self._objects.values()}

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_SIZE)
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
            except asyncio.QueueFull:  # a page that fell behind: one fresh snapshot instead
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(("resync", None))

    async def run(self) -> None:
        """List, then watch; watch again from where it ended; relist on 410 Gone or any error,
        with a back-off, so the hub never stops."""
        backoff = 1.0
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self.relist()
                began = time.monotonic()
                version = await self._watch(version)
                backoff = 1.0
                if time.monotonic() - began < 1:  # ended at once: never a busy loop
                    await asyncio.sleep(1)
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                # Silent for idle_seconds: watch again from where it was (a relist if the API
                # server cannot say, which marks the list stale until it succeeds).
                log.warning("watch of gemmafinetunes silent for %.0fs: again", self.idle_seconds)
            except (ApiError, OSError, ValueError) as e:
                version, self.synced = None, False
                log.warning("watch of gemmafinetunes ended (%s); again in %.0fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)
            except Exception:
                version, self.synced = None, False
                log.exception("watch of gemmafinetunes failed; again in %.0fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)

    async def relist(self) -> str:
        """Every fine-tune, page by page; publish what changed since the last list. Returns
        the list's resourceVersion."""
        fresh: dict[str, Manifest] = {}
        size, going_on = self.page_size, None
        while True:
            params = {"limit": str(size), **({"continue": going_on} if going_on else {})}
            try:
                page = await self.api.request("GET", self.api.finetunes_path(), None, params=params)
            except AnswerTooLarge:
                if size == 1:
                    raise
                size = max(1, size // 2)  # large objects: smaller pages, from the same place
                continue
            for obj in page.get("items") or []:
                fresh[obj["metadata"]["uid"]] = _trimmed(obj)
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                break
            going_on = meta["continue"]
        changes = [("deleted", obj) for uid, obj in self._objects.items() if uid not in fresh]
        changes += [
            ("changed", obj)
            for uid, obj in fresh.items()
            if (known := self._objects.get(uid)) is None or _version(known) != _version(obj)
        ]
        for i, (kind, obj) in enumerate(changes):
            self._publish(kind, obj)
            if i % 100 == 99:
                await asyncio.sleep(0)  # let the streams send what is queued
        self._objects = fresh
        self.synced = True
        return meta.get("resourceVersion", "")

    async def _watch(self, version: str) -> str:
        """Watch from ``version`` until the server ends the watch; the last version seen."""
        params = {
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "300",
        }
        buffer = b""
        chunks = self.api.stream(
            self.api.finetunes_path(), None, params, idle_timeout=self.idle_seconds
        )
        async for chunk in chunks:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    raise ApiError(obj.get("code", 500), obj.get("message", "watch error"))
                version = _version(obj) or version
                if kind == "BOOKMARK":
                    continue
                uid = obj["metadata"]["uid"]
                if kind == "DELETED":
                    self._objects.pop(uid, None)
                    self._publish("deleted", obj)
                else:
                    self._objects[uid] = _trimmed(obj)
                    self._publish("changed", self._objects[uid])
        return version


def _version(obj: Manifest) -> str:
    return (obj.get("metadata") or {}).get("resourceVersion", "")


_KEPT_METADATA = (
    "name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
    "deletionTimestamp", "labels",
)  # fmt: skip


def _trimmed(obj: Manifest) -> Manifest:
    """What the list needs of an object: its spec and status (bounded by the CRD's schema) and
    the metadata that names it, without annotations (up to 256 KiB each, kubectl's copy of the
    applied manifest among them) or managedFields."""
    meta = obj.get("metadata") or {}
    kept = {k: meta[k] for k in _KEPT_METADATA if k in meta}
    return {**{k: v for k, v in obj.items() if k != "metadata"}, "metadata": kept}


@dataclass
class _Seen:
    at: float
    everywhere: bool | None = None
    namespaces: dict[str, bool] = field(default_factory=dict)


class Visibility:
    """Where each user may list fine-tunes, asked of the API server as them.

    First whether they may list them everywhere (one review); if not, one review per
    namespace that holds a fine-tune (never per namespace of the cluster), at most
    ``concurrency`` at a time. Answers are kept ``ttl`` seconds, for at most ``max_users``
    identities (the least recently asked go first). A ``fresh`` answer is one at most
    ``fresh_within`` seconds old: however many streams of one identity ask again each
    recheck, the API server is asked once, and while it is being asked the others wait for
    that answer."""

    def __init__(
        self,
        api: ApiServer,
        ttl: float = 30.0,
        max_users: int = 1000,
        concurrency: int = 8,
        fresh_within: float = 0.0,
    ) -> None:
        self.api, self.ttl, self.max_users = api, ttl, max_users
        self.fresh_within = fresh_within
        self._concurrency = concurrency
        self._seen: OrderedDict[str, _Seen] = OrderedDict()
        self._asking: dict[tuple[str, frozenset[str]], asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._seen)

    async def namespaces(
        self, who: Identity, candidates: set[str], fresh: bool = False
    ) -> set[str] | None:
        """Of ``candidates``, where ``who`` may list fine-tunes; None for everywhere. A 401
        (the token no longer works) raises ApiError."""
        now = time.monotonic()
        seen = self._seen.get(who.key)
        if seen is None or now - seen.at > (self.fresh_within if fresh else self.ttl):
            seen = None
        elif seen.everywhere or (seen.everywhere is False and candidates <= seen.namespaces.keys()):
            self._seen.move_to_end(who.key)
            return None if seen.everywhere else {n for n in candidates if seen.namespaces.get(n)}
        key = (who.key, frozenset(candidates))
        asking = self._asking.get(key)
        if asking is None:
            asking = asyncio.ensure_future(self._ask(who, candidates, seen))
            self._asking[key] = asking
            asking.add_done_callback(lambda _: self._asking.pop(key, None))
        return await asyncio.shield(asking)

    async def _ask(
        self, who: Identity, candidates: set[str], seen: _Seen | None
    ) -> set[str] | None:
        if seen is None:
            seen = _Seen(time.monotonic())
        self._seen[who.key] = seen
        self._seen.move_to_end(who.key)
        while len(self._seen) > self.max_users:
            self._seen.popitem(last=False)
        if seen.everywhere is None:
            seen.everywhere = await self.api.may(who, "list", None)
        if seen.everywhere:
            return None
        unknown = sorted(candidates - seen.namespaces.keys())
        turns = asyncio.Semaphore(self._concurrency)

        async def ask(ns: str) -> bool:
            async with turns:
                return await self.api.may(who, "list", ns)

        for ns, ok in zip(unknown, await asyncio.gather(*map(ask, unknown)), strict=True):
            seen.namespaces[ns] = ok
        return {ns for ns in candidates if seen.namespaces.get(ns)}
