"""The kopf handlers: thin. Every trigger (the GemmaFineTune changed, one of its Jobs or pods
changed, the periodic resync) runs the same level-based ``reconcile``: read what exists, let
``children`` and ``status`` decide, create what is missing, patch the status, record an Event.

Idempotent and restart-safe by construction: children have fixed names (a second create is a
409, never a second Job), the status lives on the object (nothing is kept in memory between
reconciles), and a live Job's pod template is never patched.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from collections import defaultdict
from typing import Any

import kopf
from gft_api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from gft_api.contract import format_validation_error
from gft_api.v1alpha1 import TERMINAL_PHASES, GemmaFineTuneSpec, Phase
from pydantic import ValidationError

from gft_operator import children, status
from gft_operator.kube import Conflict, Kube, Manifest, NotFound

log = logging.getLogger("gft_operator")

MANAGED = {"app.kubernetes.io/managed-by": children.MANAGED_BY}


class Runtime:
    """What the handlers share: the API client and the operator-wide defaults."""

    kube: Kube | None = None
    defaults: children.Defaults = children.Defaults()
    namespaces: list[str] = []  # empty: all namespaces
    resync_seconds: float = 10.0
    component: str = "gft-operator"
    instance: str = socket.gethostname()


RUNTIME = Runtime()
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_locks_guard = threading.Lock()


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks[(namespace, name)]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# Reconcile
# ---------------------------------------------------------------------------------------------
def _owned_by(obj: Manifest, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def _create(kube: Kube, desired: Manifest, who: str) -> Manifest | None:
    """Create a child; ``None`` when one of that name exists already (409)."""
    try:
        created = kube.create(desired)
    except Conflict:
        return None
    extra = f" (suspend={desired['spec']['suspend']})" if desired["kind"] == "Job" else ""
    log.info("%s: created %s %s%s", who, desired["kind"], desired["metadata"]["name"], extra)
    return created


def _sync_child(
    kube: Kube, desired: Manifest, owner_uid: str, finished: bool, fresh: bool, who: str
) -> None:
    """Create a missing child (not after the run finished); keep an Ingress's spec current.
    On a fresh run the children are created without looking first (a 409 says one exists)."""
    if fresh and _create(kube, desired, who) is not None:
        return
    meta = desired["metadata"]
    live = kube.get(desired["kind"], meta["namespace"], meta["name"])
    if live is None:
        if not finished:
            _create(kube, desired, who)
        return
    if desired["kind"] != "Ingress" or not _owned_by(live, owner_uid):
        return  # other children are fixed at creation, like the spec they come from
    if live.get("spec") != desired["spec"] or live["metadata"].get("annotations") != meta.get(
        "annotations"
    ):
        live["spec"] = desired["spec"]
        live["metadata"]["annotations"] = meta.get("annotations") or {}
        kube.replace(live)
        log.info("%s: updated Ingress %s", who, meta["name"])


def _job_events(kube: Kube, namespace: str, names: list[str]) -> list[Manifest]:
    events: list[Manifest] = []
    for name in names:
        events += kube.list(
            "Event", namespace, fieldSelector=f"involvedObject.name={name},type=Warning"
        )
    return events


def record_event(
    kube: Kube, body: Manifest, type_: str, reason: str, message: str, at: str
) -> None:
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
        "source": {"component": RUNTIME.component},
        "reportingComponent": RUNTIME.component,
        "reportingInstance": RUNTIME.instance[:128],
    }
    try:
        kube.create(event)
    except Exception as e:  # an event that cannot be recorded must not stop the reconcile
        log.warning("could not record event %s on %s: %s", reason, meta["name"], e)


def reconcile(namespace: str, name: str) -> None:
    """Bring one GemmaFineTune's children and status in line with what exists."""
    kube = RUNTIME.kube
    assert kube is not None, "the operator's startup handler sets the client"
    with _lock(namespace, name):
        try:
            body = kube.request("GET", kube.custom_path(namespace, name))
        except NotFound:
            return
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return  # garbage collection removes the children
        who = f"{namespace}/{name}"
        old_status: Manifest = body.get("status") or {}
        try:
            spec = GemmaFineTuneSpec.model_validate(body.get("spec") or {})
        except ValidationError as e:
            _invalid_spec(kube, body, format_validation_error(e), who)
            return
        owner = children.Owner.from_body(body)
        finished = old_status.get("phase") in TERMINAL_PHASES
        desired = children.desired_children(owner, spec, RUNTIME.defaults)
        desired_job = desired[-1]
        # Fresh: no Job was ever recorded for this run; create without looking first.
        fresh = not finished and not old_status.get("jobName")
        for child in desired[:-1]:
            _sync_child(kube, child, owner.uid, finished, fresh, who)
        _drop_unwanted_ingress(kube, owner, desired, who)

        conflict = None
        job = _create(kube, desired_job, who) if fresh else None
        if job is not None:
            pass  # just created from this spec: nothing to patch
        elif (job := kube.get("Job", namespace, name)) is not None and not _owned_by(
            job, owner.uid
        ):
            conflict = (
                f"a Job named {job['metadata']['name']} exists and does not belong to this "
                "GemmaFineTune; delete it or rename the GemmaFineTune"
            )
        elif job is not None and job["metadata"].get("deletionTimestamp"):
            job = None  # being deleted: a new one is created once it is gone
        elif job is None and not finished:
            log.info("%s: Job %s is gone while the run is live; recreating it", who, name)
            job = _create(kube, desired_job, who) or kube.get("Job", namespace, name)
        elif job is not None:
            patch = children.job_patch(spec, job, status.job_finished(job))
            if patch:
                job = kube.merge_patch("Job", namespace, name, patch)
                log.info("%s: patched Job %s: %s", who, name, patch["spec"])

        pods: list[Manifest] = []
        events: list[Manifest] = []
        if job is not None and not conflict:
            uid = job["metadata"]["uid"]
            pods = kube.list(
                "Pod", namespace, labelSelector=f"batch.kubernetes.io/controller-uid={uid}"
            )
            running = any(p.get("status", {}).get("phase") == "Running" for p in pods)
            if not running and not status.job_finished(job):
                not_running = [
                    p["metadata"]["name"]
                    for p in pods
                    if p.get("status", {}).get("phase") == "Pending"
                ]
                events = _job_events(kube, namespace, [name, *not_running])

        at = now()
        decision = status.decide(
            status.Observed(
                generation=int(meta.get("generation") or 0),
                suspend=spec.suspend,
                queue_name=spec.queue_name,
                old_status=old_status,
                job=job,
                pods=pods,
                events=events,
                job_conflict=conflict,
            ),
            now=at,
        )
        new_status = decision.status
        new_status["outputClaim"] = children.output_claim_name(owner, spec)
        url = children.tensorboard_url(owner, spec)
        if url:
            new_status["tensorboardURL"] = url
        if new_status != old_status:
            kube.request(
                "PATCH",
                kube.custom_path(namespace, name, "status"),
                body={"status": new_status},
                content_type="application/merge-patch+json",
            )
        if decision.transition is not None:
            t = decision.transition
            log.info("%s: %s (%s): %s", who, new_status["phase"], t.reason, t.message)
            record_event(kube, body, t.type, t.reason, t.message, at)


def _drop_unwanted_ingress(kube: Kube, owner: children.Owner, desired: list[Manifest], who: str):
    if any(d["kind"] == "Ingress" for d in desired):
        return
    name = children.child_names(owner.name)["ingress"]
    live = kube.get("Ingress", owner.namespace, name)
    if live is not None and _owned_by(live, owner.uid):
        kube.delete("Ingress", owner.namespace, name, uid=live["metadata"]["uid"])
        log.info("%s: deleted Ingress %s (no longer asked for)", who, name)


def _invalid_spec(kube: Kube, body: Manifest, problem: str, who: str) -> None:
    """A spec the CRD admitted but the model refuses (the CRD is older than the operator)."""
    old = body.get("status") or {}
    if old.get("reason") == "InvalidSpec" and old.get("message") == problem:
        return
    at = now()
    kube.request(
        "PATCH",
        kube.custom_path(body["metadata"]["namespace"], body["metadata"]["name"], "status"),
        body={"status": {"phase": Phase.FAILED.value, "reason": "InvalidSpec", "message": problem}},
        content_type="application/merge-patch+json",
    )
    log.warning("%s: invalid spec: %s", who, problem)
    record_event(kube, body, "Warning", "InvalidSpec", problem, at)


def _safely(namespace: str, name: str) -> None:
    try:
        reconcile(namespace, name)
    except Exception:
        log.exception("%s/%s: reconcile failed; the next event or resync retries", namespace, name)


# ---------------------------------------------------------------------------------------------
# Triggers
# ---------------------------------------------------------------------------------------------
@kopf.on.event(GROUP, VERSION, PLURAL)
def on_finetune(event: dict[str, Any], namespace: str, name: str, **_: Any) -> None:
    if event.get("type") == "DELETED":
        return
    _safely(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
def on_job(labels: dict[str, str], namespace: str, **_: Any) -> None:
    owner = labels.get(children.NAME_LABEL)
    if owner:
        _safely(namespace, owner)


@kopf.on.event("", "v1", "pods", labels=MANAGED)
def on_pod(labels: dict[str, str], namespace: str, **_: Any) -> None:
    owner = labels.get(children.NAME_LABEL)
    if owner:
        _safely(namespace, owner)


def resync_forever(stop: threading.Event) -> None:
    """Reconcile every unfinished GemmaFineTune periodically: catches what no watch event
    announces (a FailedCreate on the Job, a child deleted while the operator was down)."""
    while not stop.wait(RUNTIME.resync_seconds):
        kube = RUNTIME.kube
        if kube is None:
            continue
        scopes = RUNTIME.namespaces or [None]
        for ns in scopes:
            try:
                items = kube.request("GET", kube.custom_path(ns)).get("items") or []
            except Exception as e:
                log.warning("resync: cannot list GemmaFineTunes: %s", e)
                continue
            for item in items:
                if (item.get("status") or {}).get("phase") in TERMINAL_PHASES:
                    continue
                _safely(item["metadata"]["namespace"], item["metadata"]["name"])


_stop_resync = threading.Event()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's own bookkeeping in annotations: the structural schema would prune status.kopf.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.enabled = False  # the operator records its own Events, one per transition
    settings.execution.max_workers = int(os.environ.get("GFT_OPERATOR_WORKERS", "8"))
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    threading.Thread(
        target=resync_forever, args=(_stop_resync,), daemon=True, name="gft-resync"
    ).start()


@kopf.on.cleanup()
def cleanup(**_: Any) -> None:
    _stop_resync.set()


@kopf.on.probe(id="ready")
def ready(**_: Any) -> float:
    """The liveness/readiness endpoint answers once the operator has started; this adds the
    time of the last probe so that a stuck event loop shows."""
    return time.time()
