"""What the watches have delivered, kept in memory: the GemmaFineTunes, their Jobs, pods and
other children, and the Warning events about them. A reconcile reads from here, never from
the API server, as a controller-runtime operator reads from its informers.

kopf keeps the objects in its indexes (``@kopf.index`` in ``handlers``), fed by its watches with
server-side selectors, and holds every handler back until the initial list of each indexed
resource is in: a reconcile never sees a half-filled cache.

A watch echoes a write a moment after it succeeded. So that a reconcile right after a create
does not take the child for missing, what this operator wrote is kept too (``wrote``) until the
watch delivers that version or a newer one, and what it deleted is hidden (``deleted``) until
the watch says it is gone; each for ``WRITE_MEMORY_SECONDS`` at most.
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
WARNINGS_INDEX = "gft_warnings"  # (namespace, involved object's name) -> Warning events
WORKLOADS_INDEX = "gft_workloads"  # (namespace, owning Job uid) -> Kueue Workloads (--kueue)


def version(obj: Manifest | None) -> int:
    """The resourceVersion as a number: etcd's revision, so a larger one is newer."""
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


class Cache:
    def __init__(self) -> None:
        self._indices: Mapping[str, Any] = {}
        self._written: dict[Key, tuple[float, Manifest]] = {}
        self._deleted: dict[Key, tuple[float, str]] = {}  # -> (when, uid)
        self._changed = threading.Condition()

    def attach(self, indices: Mapping[str, Any]) -> None:
        """Take kopf's indexes (the startup handler gets them among its kwargs)."""
        names = (*INDEX_OF_KIND.values(), PODS_INDEX, WARNINGS_INDEX, WORKLOADS_INDEX)
        self._indices = {n: indices[n] for n in names if n in indices}

    @property
    def attached(self) -> bool:
        return bool(self._indices)

    def _values(self, index: str, key: tuple[str, str]) -> list[Manifest]:
        store = self._indices.get(index, {}).get(key)
        # kopf fills its indexes on its event loop; list() copies the store in one go.
        return list(store) if store is not None else []

    def get(self, kind: str, namespace: str, name: str) -> Manifest | None:
        """The object as last seen or written (whichever is newer), a copy to change freely."""
        seen = self._values(INDEX_OF_KIND[kind], (namespace, name))
        found = seen[0] if seen else None
        key = (kind, namespace, name)
        with self._changed:
            gone = self._deleted.get(key)
            if gone is not None:
                uid = ((found or {}).get("metadata") or {}).get("uid")
                if uid != gone[1] or time.monotonic() - gone[0] > WRITE_MEMORY_SECONDS:
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
            at, obj = written
            if version(seen) >= version(obj) or time.monotonic() - at > WRITE_MEMORY_SECONDS:
                del self._written[key]  # the watch caught up (or never will: it was deleted)
                return None
            return obj

    def warnings(self, namespace: str, involved: Iterable[str]) -> list[Manifest]:
        """Warning events about the objects of these names in the namespace."""
        events: list[Manifest] = []
        for name in involved:
            events += self._values(WARNINGS_INDEX, (namespace, name))
        return copy.deepcopy(events)

    def wrote(self, obj: Manifest) -> None:
        """Remember an object as the API server returned it after this operator's write."""
        meta = obj["metadata"]
        with self._changed:
            self._written[(obj["kind"], meta["namespace"], meta["name"])] = (time.monotonic(), obj)

    def deleted(self, obj: Manifest) -> None:
        """Remember that this operator deleted the object (uid and all)."""
        meta = obj["metadata"]
        key = (obj["kind"], meta["namespace"], meta["name"])
        with self._changed:
            self._written.pop(key, None)
            self._deleted[key] = (time.monotonic(), meta["uid"])

    def saw(self) -> None:
        """Called by the index handlers: wake whoever waits for a newer version."""
        with self._changed:
            self._changed.notify_all()

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
