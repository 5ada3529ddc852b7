"""Observe: what the watches have delivered, kept in memory — the GemmaFineTunes, their Jobs,
pods and other children, and the Warning events about them. A reconcile reads from here, never
from the API server, as a controller-runtime operator reads from its informers.

kopf keeps the objects in its indexes (``@kopf.index`` in ``handlers``), fed by its watches with
server-side selectors. Until every index has its initial list, ``synced`` is not set, and
nothing reconciles (a half-filled cache would show a run's own Job as missing).

Only what the operator needs is kept (``slim``): no ``managedFields``, no Job template, no
ConfigMap data; the Warning events of the operator's own Jobs and pods, not the cluster's.

A watch echoes a write a moment after it succeeded. So that a reconcile right after a write
does not act on the older version, what this operator wrote is kept (``wrote``) until the watch
delivers that version or a newer one (``seen``), and what it deleted, or found deleted (a 404),
is hidden (``deleted``) while the watch still shows that object at that version or an older one:
a watch minutes behind must not bring a deleted fine-tune back. A write whose object the watch
no longer shows is forgotten after ``WRITE_MEMORY_SECONDS`` (``expire``). This is the one memory
of the operator's own writes: one entry per object at most, none once the watch has caught up.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

Manifest = dict[str, Any]
Key = tuple[str, str, str]  # (kind, namespace, name)

WRITE_MEMORY_SECONDS = 30.0

INDEX_OF_KIND = {
    "GemmaFineTune": "gft_finetunes",
    "Job": "gft_jobs",
    "ConfigMap": "gft_configmaps",
    "Service": "gft_services",
    "PersistentVolumeClaim": "gft_persistentvolumeclaims",
    "Ingress": "gft_ingresses",
    "NetworkPolicy": "gft_networkpolicies",
    "Deployment": "gft_deployments",
}
"""Objects cached one per (namespace, name), by the name of the kopf index holding them."""
PODS_INDEX = "gft_pods"  # (namespace, fine-tune name) -> its pods
WORKLOADS_INDEX = "gft_workloads"  # (namespace, owning Job uid) -> Kueue Workloads (--kueue)

_METADATA_KEPT = (
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "labels",
    "ownerReferences",
    "finalizers",
)
_SPEC_KEPT: dict[str, tuple[str, ...] | None] = {
    # kind -> the spec fields the operator reads (None: the whole spec)
    "GemmaFineTune": None,
    "Job": ("suspend", "ttlSecondsAfterFinished", "completions", "parallelism"),
    "Pod": ("nodeName",),
    "Ingress": None,
    "Workload": ("active",),
}
_ANNOTATIONS_KEPT = frozenset({"GemmaFineTune", "Ingress"})


def slim(kind: str, body: Mapping[str, Any]) -> Manifest:
    """What the operator needs of an object: its identity, labels, owners and finalizers, the
    spec fields it reads (the whole spec of a fine-tune and an Ingress; none of a ConfigMap,
    Service, claim or Deployment, whose existence and owner are all that matter) and its
    status. A Job's pod template, a ConfigMap's data and every ``managedFields`` stay out."""
    meta = body.get("metadata") or {}
    kept_meta = {k: meta[k] for k in _METADATA_KEPT if k in meta}
    if kind in _ANNOTATIONS_KEPT and meta.get("annotations"):
        kept_meta["annotations"] = dict(meta["annotations"])
    out: Manifest = {"kind": kind, "metadata": kept_meta}
    if kind in _SPEC_KEPT and "spec" in body:
        fields = _SPEC_KEPT[kind]
        spec = body["spec"] or {}
        out["spec"] = dict(spec) if fields is None else {f: spec[f] for f in fields if f in spec}
    if "status" in body:
        out["status"] = body["status"]
    return out


def version(obj: Manifest | None) -> int:
    """The resourceVersion as a number: etcd's revision, so a larger one is newer."""
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _deletion_seen(shown: Manifest | None, gone: tuple[float, str, int]) -> bool:
    """Whether the watch has caught up with a deletion: it no longer shows the object, shows
    another of that name (a new uid), or a newer version of it (its deletionTimestamp set)."""
    meta = (shown or {}).get("metadata") or {}
    return shown is None or meta.get("uid") != gone[1] or version(shown) > gone[2]


class Cache:
    def __init__(self) -> None:
        self._indices: Mapping[str, Any] = {}
        self._written: dict[Key, tuple[float, Manifest]] = {}
        self._deleted: dict[Key, tuple[float, str, int]] = {}  # -> (when, uid, version)
        self._echoed: dict[tuple[str, str], int] = {}  # fine-tune -> version of its own write
        self._events: dict[tuple[str, str], dict[str, Manifest]] = {}
        self._changed = threading.Condition()
        self.synced = threading.Event()
        """Set once every watch has delivered its initial list: nothing reconciles before."""

    def attach(self, indices: Mapping[str, Any]) -> None:
        """Take kopf's indexes (the startup handler gets them among its kwargs)."""
        names = (*INDEX_OF_KIND.values(), PODS_INDEX, WORKLOADS_INDEX)
        self._indices = {n: indices[n] for n in names if n in indices}

    @property
    def attached(self) -> bool:
        return bool(self._indices)

    def _values(self, index: str, key: tuple[str, str]) -> list[Manifest]:
        store = self._indices.get(index, {}).get(key)
        # kopf fills its indexes on its event loop; list() copies the store in one go.
        return list(store) if store is not None else []

    # -- reading ------------------------------------------------------------------------------
    def get(self, kind: str, namespace: str, name: str) -> Manifest | None:
        """The object as last seen or written (whichever is newer), a copy to change freely."""
        seen = self._values(INDEX_OF_KIND[kind], (namespace, name))
        found = seen[0] if seen else None
        key = (kind, namespace, name)
        with self._changed:
            gone = self._deleted.get(key)
            if gone is not None:
                if _deletion_seen(found, gone):
                    del self._deleted[key]  # the watch caught up (or a new one of that name)
                else:
                    found = None
        found = self._newer_written(key, found) or found
        if found is None:
            return None
        found = copy.deepcopy(found)
        found.setdefault("kind", kind)
        return found

    def has(self, kind: str, namespace: str, name: str) -> bool:
        """Whether the object exists as far as the watch and this operator's writes say."""
        key = (kind, namespace, name)
        with self._changed:
            if key in self._written or key in self._deleted:
                return self.get(kind, namespace, name) is not None
        return bool(self._values(INDEX_OF_KIND[kind], (namespace, name)))

    def finetune(self, namespace: str, name: str) -> Manifest | None:
        return self.get("GemmaFineTune", namespace, name)

    def finetunes(self) -> list[tuple[str, str, Manifest]]:
        """(namespace, name, status) of every fine-tune seen."""
        index = self._indices.get(INDEX_OF_KIND["GemmaFineTune"], {})
        out = []
        for key in list(index):
            objs = self._values(INDEX_OF_KIND["GemmaFineTune"], key)
            if objs:
                out.append((key[0], key[1], objs[0].get("status") or {}))
        return out

    def pods(self, namespace: str, finetune: str) -> list[Manifest]:
        """The pods labelled for the fine-tune of that name (any run of it), each as last
        seen or written."""
        pods = []
        for seen in self._values(PODS_INDEX, (namespace, finetune)):
            key = ("Pod", namespace, seen["metadata"]["name"])
            pod = copy.deepcopy(self._newer_written(key, seen) or seen)
            pod.setdefault("kind", "Pod")
            pods.append(pod)
        return pods

    def labelled(self, kind: str) -> list[Manifest]:
        """Every cached object of ``kind`` (``Job`` or ``Pod``): the takeover's sweep."""
        index = self._indices.get(PODS_INDEX if kind == "Pod" else INDEX_OF_KIND[kind], {})
        out: list[Manifest] = []
        for key in list(index):
            for obj in self._values(PODS_INDEX if kind == "Pod" else INDEX_OF_KIND[kind], key):
                out.append({**obj, "kind": kind})
        return out

    def watches_workloads(self) -> bool:
        """Whether Kueue's Workloads are watched (the operator runs with ``--kueue``)."""
        return WORKLOADS_INDEX in self._indices

    def workload(self, namespace: str, job_uid: str) -> Manifest | None:
        """Kueue's Workload of the Job with that uid (owned by it), as last seen or written."""
        seen = [
            w
            for w in self._values(WORKLOADS_INDEX, (namespace, job_uid))
            if not w["metadata"].get("deletionTimestamp")
        ]
        if not seen:
            return None
        newest = max(seen, key=version)
        key = ("Workload", namespace, newest["metadata"]["name"])
        found = copy.deepcopy(self._newer_written(key, newest) or newest)
        found.setdefault("kind", "Workload")
        return found

    def _newer_written(self, key: Key, seen: Manifest | None) -> Manifest | None:
        """What this operator wrote of the object, while the watch has not delivered it."""
        with self._changed:
            written = self._written.get(key)
            if written is None:
                return None
            _, obj = written
            if version(seen) >= version(obj):
                del self._written[key]  # the watch caught up
                return None
            return obj

    # -- the Warning events of the operator's own Jobs and pods ---------------------------------
    def is_ours(self, event: Manifest) -> bool:
        """Whether a Warning event is about a Job of this operator or one of its pods (named
        after the Job: ``<job>-<suffix>``, or ``<job>-<index>-<suffix>``)."""
        involved = event.get("involvedObject") or {}
        namespace, name = involved.get("namespace") or "", involved.get("name") or ""
        if involved.get("kind") == "Job":
            return self.has("Job", namespace, name)
        if involved.get("kind") == "Pod":
            parts = name.split("-")
            return any(self.has("Job", namespace, "-".join(parts[:-n])) for n in (1, 2))
        return False

    def event(self, event: Manifest, deleted: bool = False) -> None:
        """Keep (or drop) a Warning event about one of the operator's Jobs or pods."""
        meta = event.get("metadata") or {}
        involved = event.get("involvedObject") or {}
        key = (meta.get("namespace") or "", involved.get("name") or "")
        with self._changed:
            if deleted or not self.is_ours(event):
                kept = self._events.get(key)
                if kept is not None:
                    kept.pop(meta.get("uid") or "", None)
                    if not kept:
                        del self._events[key]
                return
            self._events.setdefault(key, {})[meta.get("uid") or ""] = {
                "metadata": {k: meta[k] for k in ("uid", "resourceVersion") if k in meta},
                **{
                    k: event[k]
                    for k in (
                        "involvedObject",
                        "reason",
                        "message",
                        "type",
                        "firstTimestamp",
                        "lastTimestamp",
                        "eventTime",
                    )
                    if k in event
                },
            }

    def forget_events(self, namespace: str, names: Iterable[str]) -> None:
        """Drop the events about objects that are gone (a finished or deleted run's)."""
        with self._changed:
            for name in names:
                self._events.pop((namespace, name), None)

    def warnings(self, namespace: str, involved: Iterable[str]) -> list[Manifest]:
        """Warning events about the objects of these names in the namespace."""
        with self._changed:
            events = [
                e for name in involved for e in self._events.get((namespace, name), {}).values()
            ]
            return copy.deepcopy(events)

    # -- the operator's own writes ------------------------------------------------------------
    def wrote(self, obj: Manifest) -> None:
        """Remember an object as the API server returned it after this operator's write."""
        kind = obj["kind"]
        meta = obj["metadata"]
        with self._changed:
            self._written[(kind, meta["namespace"], meta["name"])] = (
                time.monotonic(),
                slim(kind, obj),
            )

    def deleted(self, obj: Manifest) -> None:
        """Remember that the object is gone (this operator deleted it, or the API server said
        404): hidden while the watch shows that uid at this version or an older one."""
        meta = obj["metadata"]
        key = (obj["kind"], meta["namespace"], meta["name"])
        with self._changed:
            # The operator's own last write of it (a finalizer taken off just before) is a
            # version the watch delivers before the deletion: that one must not show it again.
            written = self._written.pop(key, None)
            known = max(version(obj), version(written[1]) if written is not None else 0)
            self._deleted[key] = (time.monotonic(), meta["uid"], known)

    def seen(self, kind: str, body: Mapping[str, Any]) -> None:
        """Called by the index handlers for every object a watch delivers: the echo of an own
        write ends its memory; whoever waits for a newer version is woken."""
        meta = body.get("metadata") or {}
        key = (kind, meta.get("namespace") or "", meta.get("name") or "")
        delivered = version(dict(body))
        with self._changed:
            written = self._written.get(key)
            if written is not None and delivered >= version(written[1]):
                del self._written[key]
                if kind == "GemmaFineTune" and delivered == version(written[1]):
                    self._echoed[key[1:]] = delivered
            self._changed.notify_all()

    def own_write(self, namespace: str, name: str, resource_version: str | None) -> bool:
        """Whether a fine-tune's watch event only echoes this operator's own status write
        (nothing new to react to). Each echo answers once."""
        with self._changed:
            echoed = self._echoed.pop((namespace, name), None)
        return echoed is not None and str(echoed) == str(resource_version)

    def gone(self, namespace: str, name: str) -> None:
        """A fine-tune was deleted: nothing of it is remembered any more."""
        with self._changed:
            self._echoed.pop((namespace, name), None)
            self._written.pop(("GemmaFineTune", namespace, name), None)

    def expire(self) -> None:
        """Forget the writes whose echo will never come: the object is gone from the watch
        (deleted meanwhile) for ``WRITE_MEMORY_SECONDS``. A write of an object the watch still
        shows is kept until its echo (a watch that is behind, or reconnecting after the API
        server or etcd restarted, must not make the operator act on an older version). A
        deletion is forgotten once the watch has caught up with it."""
        cutoff = time.monotonic() - WRITE_MEMORY_SECONDS
        with self._changed:
            old = [k for k, (at, _) in self._written.items() if at < cutoff]
            deletes = [(k, g) for k, g in self._deleted.items() if g[0] < cutoff]
        gone = [k for k in old if self._shown(*k) is None]
        caught_up = [k for k, g in deletes if _deletion_seen(self._shown(*k), g)]
        with self._changed:
            for key in gone:
                written = self._written.get(key)
                if written is not None and written[0] < cutoff:
                    del self._written[key]
            for key in caught_up:
                self._deleted.pop(key, None)

    def _shown(self, kind: str, namespace: str, name: str) -> Manifest | None:
        """The object as the watch shows it (a pod by its name among its fine-tune's)."""
        if kind in ("Pod", "Workload"):
            index = PODS_INDEX if kind == "Pod" else WORKLOADS_INDEX
            for found in list(self._indices.get(index, {}).values()):
                for obj in list(found):
                    meta = obj["metadata"]
                    if meta["name"] == name and meta.get("namespace") == namespace:
                        return obj
            return None
        seen = self._values(INDEX_OF_KIND[kind], (namespace, name))
        return seen[0] if seen else None

    def counts(self) -> dict[str, int]:
        """How much is held, for the operator's own metrics."""
        with self._changed:
            out = {
                "remembered_writes": len(self._written) + len(self._deleted),
                "Event": sum(len(v) for v in self._events.values()),
            }
        for kind, index in INDEX_OF_KIND.items():
            out[kind] = len(self._indices.get(index, {}))
        out["Pod"] = sum(len(v) for v in list(self._indices.get(PODS_INDEX, {}).values()))
        return out

    def wait_for(self, kind: str, namespace: str, name: str, newer_than: int, timeout: float):
        """Wait until the watch delivered a version of the object newer than ``newer_than``
        (0: any version at all); returns it, or ``None`` when none came in time."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self._values(INDEX_OF_KIND[kind], (namespace, name))
            if seen and version(seen[0]) > newer_than:
                return copy.deepcopy(seen[0])
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with self._changed:
                self._changed.wait(min(left, 0.5))


CACHE = Cache()
