"""Apply: the one place where the operator writes to the API server.

Every write goes through a ``Writer``:

- it is made only by the leader, checked before every attempt (the Kube client refuses a write,
  retries included, once the Lease is lost or the operator is shutting down);
- children are created with the field manager ``gft-operator``; the Ingress, the one child that
  follows the spec after creation, is written with server-side apply, so the operator owns only
  the fields it sets (an ``ingressClassName`` the DefaultIngressClass admission filled in,
  another controller's annotation, stay);
- what it wrote is remembered in the cache until the watch echoes it (``CACHE.wrote``,
  ``CACHE.deleted``): the one memory of its own writes;
- a refusal of the API server (a quota, an admission webhook or policy, a 422) is raised as
  ``Refused``, with the API server's reason and message, for the status to say and the
  reconcile to retry with back-off. A 409 on create means "it exists"; 429 and 5xx were
  already retried by the client (``ApiUnavailable``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Any

from gft_api import API_VERSION, KIND

from gft_operator import children, monitoring
from gft_operator.cache import CACHE, version
from gft_operator.kube import (
    ApiError,
    ApiUnavailable,
    Conflict,
    Kube,
    Manifest,
    NamespaceTerminating,
    NotFound,
)

log = logging.getLogger("gft_operator")

APPLIED_ANNOTATION = "finetune.gemma.dev/applied"
"""On an applied child: a digest of what the operator last applied, so a change of what it
wants (an annotation it no longer sets) is applied even when the rest still matches."""
CONFIRMED_SECONDS = 30.0
"""How long a fine-tune read to exist (``Writer.confirm``) is taken to exist without a new read."""


class Refused(Exception):
    """The API server refused a write: a quota, an admission webhook or policy, an invalid
    object, a missing permission. ``reason`` is CamelCase for a condition."""

    def __init__(self, kind: str, name: str, verb: str, error: ApiError) -> None:
        self.kind, self.name = kind, name
        message = error.message
        if "exceeded quota" in message:
            self.reason = "QuotaExceeded"
        elif error.reason.isalpha() and error.reason[:1].isupper():
            self.reason = error.reason
        else:
            self.reason = "Refused"
        self.message = (
            f"{kind} refused: the API server would not {verb} the {kind} {name} "
            f"({error.status}): {message}"
        )
        super().__init__(self.message)


class Gone(Exception):
    """The API server says the fine-tune is not there (404) while the cache still shows it:
    its watch is behind. It is hidden from the cache until the watch catches up."""


class StatusConflict(Exception):
    """The object changed between the read a status was computed from and its write (made
    from the version ``seen``; 0 when something else than the status changed under it)."""

    def __init__(self, message: str = "", seen: int = 0) -> None:
        super().__init__(message)
        self.seen = seen


def _refusal(error: ApiError) -> bool:
    """A "no" to act on, rather than "not now" (retried) or "gone"/"exists" (handled)."""
    return 400 <= error.status < 500 and not isinstance(
        error, NotFound | Conflict | NamespaceTerminating | ApiUnavailable
    )


def digest(obj: Manifest) -> str:
    """What an applied child says, in 16 hex digits (its digest annotation left out)."""
    meta = dict(obj.get("metadata") or {})
    annotations = {
        k: v for k, v in (meta.get("annotations") or {}).items() if k != APPLIED_ANNOTATION
    }
    meta["annotations"] = annotations
    text = json.dumps({**obj, "metadata": meta}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def contains(live: Any, want: Any) -> bool:
    """Whether ``live`` holds every field of ``want`` with the same value (what another
    manager or a default added to it does not count)."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(
            k in live and contains(live[k], v) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(live, list)
            and len(live) == len(want)
            and all(contains(a, b) for a, b in zip(live, want, strict=True))
        )
    return bool(live == want)


class Writer:
    def __init__(self, kube: Kube, component: str, instance: str) -> None:
        self.kube = kube
        self.component = component
        self.instance = instance
        self._confirmed: dict[tuple[str, str, str], float] = {}  # (ns, name, uid) -> when
        self._confirmed_guard = threading.Lock()

    def create(self, desired: Manifest, who: str) -> Manifest | None:
        """Create a child; ``None`` when one of that name exists already (409)."""
        kind, name = desired["kind"], desired["metadata"]["name"]
        try:
            created = self.kube.create(desired)
        except Conflict:
            return None
        except ApiError as e:
            if _refusal(e):
                raise Refused(kind, name, "create", e) from e
            raise
        CACHE.wrote({**created, "kind": kind})
        extra = f" (suspend={desired['spec']['suspend']})" if kind == "Job" else ""
        log.info("%s: created %s %s%s", who, kind, name, extra)
        return created

    def applied(self, desired: Manifest, live: Manifest | None) -> bool:
        """Whether ``live`` already is what applying ``desired`` would make it."""
        if live is None:
            return False
        annotations = live["metadata"].get("annotations") or {}
        return annotations.get(APPLIED_ANNOTATION) == digest(desired) and contains(
            {"spec": live.get("spec")}, {"spec": desired.get("spec")}
        )

    def apply(self, desired: Manifest, who: str) -> Manifest:
        """Server-side apply of a child: owns the fields it sets, and only those."""
        kind, name = desired["kind"], desired["metadata"]["name"]
        body = {
            **desired,
            "metadata": {
                **desired["metadata"],
                "annotations": {
                    **(desired["metadata"].get("annotations") or {}),
                    APPLIED_ANNOTATION: digest(desired),
                },
            },
        }
        try:
            stored = self.kube.apply(body)
        except ApiError as e:
            if _refusal(e):
                raise Refused(kind, name, "apply", e) from e
            raise
        CACHE.wrote({**stored, "kind": kind})
        log.info("%s: applied %s %s", who, kind, name)
        return stored

    def exists_elsewhere(self, kind: str, namespace: str, name: str) -> Manifest | None:
        """Read an object the watch does not show (not labelled as this operator's): before
        a child is first applied, so that someone else's object of its name is never taken
        over. The one read the operator makes for a child, once per Ingress."""
        return self.kube.get(kind, namespace, name)

    def patch(self, kind: str, namespace: str, name: str, patch: Manifest, who: str) -> Manifest:
        """A merge patch of a field the operator owns on an object that is not its child
        (a Kueue Workload's ``spec.active``) or a Job's ``suspend``."""
        try:
            stored = self.kube.merge_patch(kind, namespace, name, patch)
        except ApiError as e:
            if _refusal(e):
                raise Refused(kind, name, "patch", e) from e
            raise
        CACHE.wrote({**stored, "kind": kind})
        log.info("%s: patched %s %s: %s", who, kind, name, patch.get("spec"))
        return stored

    def status(self, body: Manifest, new_status: Manifest, kind: str) -> Manifest:
        """Merge-patch the status, on condition that the object is still the one it was
        computed from; returns the object as stored. ``StatusConflict`` when it changed."""
        meta = body["metadata"]
        try:
            stored = self.kube.request(
                "PATCH",
                self.kube.custom_path(meta["namespace"], meta["name"], "status"),
                body={
                    "metadata": {"resourceVersion": meta["resourceVersion"]},
                    "status": new_status,
                },
                content_type="application/merge-patch+json",
            )
        except Conflict as e:
            raise StatusConflict(str(e), version(body)) from e
        except NotFound:
            self.confirm(body, again=True)  # Gone if it is; else the 404 was about something else
            raise
        monitoring.STATUS_WRITES.labels(kind).inc()
        CACHE.wrote({**stored, "kind": KIND})
        return {**stored, "kind": KIND}

    def confirm(self, body: Manifest, again: bool = False) -> None:
        """Before a known run's child or Job is made again: one read (a list by name, as
        the operator's role allows) says whether the fine-tune is still there, or only in a
        cache whose watch is behind (``Gone``; hidden from the cache until the watch says so).
        A run confirmed within ``CONFIRMED_SECONDS`` is not read again (a child refused and
        retried with back-off, a name conflict looked at every resync), unless ``again``."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"], meta["uid"])
        now = time.monotonic()
        with self._confirmed_guard:
            at = self._confirmed.get(key)
            if not again and at is not None and now - at < CONFIRMED_SECONDS:
                return
        found = self.kube.request(
            "GET",
            self.kube.custom_path(meta["namespace"]),
            query={"fieldSelector": f"metadata.name={meta['name']}"},
        ).get("items")
        if not any(f["metadata"].get("uid") == meta["uid"] for f in found or []):
            CACHE.deleted({**body, "kind": KIND})
            raise Gone(f"{meta['namespace']}/{meta['name']} is no longer there")
        with self._confirmed_guard:  # the old ones go when a new one comes: bounded by reads
            kept = {k: t for k, t in self._confirmed.items() if now - t < CONFIRMED_SECONDS}
            self._confirmed = {**kept, key: now}

    def release(self, obj: Manifest, who: str) -> None:
        """Take the operator's outcome finalizer off a Job or pod."""
        if children.OUTCOME_FINALIZER not in (obj["metadata"].get("finalizers") or []):
            return
        kind = obj.get("kind") or "Pod"
        stored = self.kube.remove_finalizer({**obj, "kind": kind}, children.OUTCOME_FINALIZER)
        if stored is not None:
            CACHE.wrote({**stored, "kind": kind})
        log.debug("%s: released %s %s", who, kind, obj["metadata"]["name"])

    def delete(self, obj: Manifest, who: str, why: str = "") -> None:
        meta = obj["metadata"]
        self.kube.delete(obj["kind"], meta["namespace"], meta["name"], uid=meta["uid"])
        CACHE.deleted(obj)
        if why:
            log.info("%s: %s", who, why)

    def event(self, body: Manifest, type_: str, reason: str, message: str, at: str) -> None:
        """Record an Event on the fine-tune (``kubectl describe`` shows it)."""
        meta = body["metadata"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message,
            "firstTimestamp": at,
            "lastTimestamp": at,
            "count": 1,
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "reportingInstance": self.instance[:128],
        }
        try:
            self.kube.create(event)
        except Exception as e:  # an event that cannot be recorded must not stop the reconcile
            log.warning("could not record event %s on %s: %s", reason, meta["name"], e)
