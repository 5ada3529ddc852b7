"""The kopf handlers: thin. Every trigger (the GemmaFineTune changed, one of its Jobs or pods
changed, the periodic resync) runs the same level-based ``reconcile``: read what exists, let
``children`` and ``status`` decide, create what is missing, patch the status, record an Event.

Idempotent and restart-safe by construction: children have fixed names (a second create is a
409, never a second Job), the status lives on the object (nothing is kept in memory between
reconciles), and a live Job's pod template is never patched.
"""

from __future__ import annotations

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

from gft_operator import children, monitoring, status, trainer_metrics
from gft_operator.kube import Conflict, Kube, Manifest, NamespaceTerminating, NotFound
from gft_operator.scraper import Problem, Scraper, Target

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
    scraper: Scraper | None = None
    metrics_startup_grace: float = 600.0
    """Seconds a trainer may take to open its metrics endpoint before that is a problem."""


class LiveState:
    """What the status writers know between reconciles: the status as last read or written
    (every status write of this operator happens under the object's lock, so this is current),
    and which pods have served their metrics."""

    def __init__(self) -> None:
        self.status: dict[tuple[str, str], Manifest] = {}
        self.served: set[tuple[str, str, str]] = set()  # (namespace, name, pod)

    def forget(self, namespace: str, name: str) -> None:
        self.status.pop((namespace, name), None)
        self.served = {s for s in self.served if s[:2] != (namespace, name)}


RUNTIME = Runtime()
LIVE = LiveState()
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_locks_guard = threading.Lock()


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks[(namespace, name)]


def now() -> str:
    return status.timestamp(time.time())


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
            _stop_reading(namespace, name)
            return
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            _stop_reading(namespace, name)
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
        if url and new_status.get("phase") in TERMINAL_PHASES:
            url = _tensorboard_after_run(kube, owner, spec, new_status, who)
        if url:
            new_status["tensorboardURL"] = url
        elif old_status.get("tensorboardURL"):
            new_status["tensorboardURL"] = None  # merge patch: remove it
        written = old_status
        if new_status != old_status:
            written = _patch_status(kube, namespace, name, new_status, "phase")
        key = (namespace, name)
        LIVE.status[key] = written
        monitoring.PHASES.set(namespace, name, new_status.get("phase"))
        _track_trainer(namespace, name, new_status, pods, int(meta.get("generation") or 0))
        if decision.transition is not None:
            t = decision.transition
            log.info("%s: %s (%s): %s", who, new_status["phase"], t.reason, t.message)
            record_event(kube, body, t.type, t.reason, t.message, at)


def _patch_status(kube: Kube, namespace: str, name: str, patch: Manifest, kind: str) -> Manifest:
    """Merge-patch the status; returns the status as stored."""
    stored = kube.request(
        "PATCH",
        kube.custom_path(namespace, name, "status"),
        body={"status": patch},
        content_type="application/merge-patch+json",
    )
    monitoring.STATUS_WRITES.labels(kind).inc()
    return stored.get("status") or {}


def _track_trainer(
    namespace: str, name: str, new_status: Manifest, pods: list[Manifest], generation: int
) -> None:
    """Read the metrics of a running trainer; stop reading one that is not running."""
    scraper = RUNTIME.scraper
    if scraper is None:
        return
    pod = status.newest_pod([p for p in pods if not p["metadata"].get("deletionTimestamp")])
    started = status.trainer_started_at(pod) if pod is not None else None
    pod_ip = (pod or {}).get("status", {}).get("podIP")
    if new_status.get("phase") != Phase.RUNNING.value or started is None or not pod_ip:
        scraper.forget(namespace, name)
        return
    assert pod is not None
    scraper.track(
        Target(
            namespace=namespace,
            name=name,
            pod=pod["metadata"]["name"],
            pod_ip=pod_ip,
            port=children.METRICS_PORT,
            generation=generation,
            started_at=started,
        )
    )


def write_live_status(
    target: Target, reading: trainer_metrics.Reading | None, problem: Problem | None
) -> bool:
    """The scraper's sink: put a reading (or why there is none) into the status, when it says
    something new. Returns whether it wrote."""
    kube = RUNTIME.kube
    assert kube is not None
    namespace, name = target.key
    with _lock(namespace, name):
        current = LIVE.status.get(target.key)
        if current is None or current.get("phase") != Phase.RUNNING.value:
            return False  # not (or no longer) running: the reconcile owns the status now
        if current.get("podName") not in (None, target.pod):
            return False  # a reading of a pod that is no longer the current one
        patch: Manifest = {}
        at = now()
        if reading is not None:
            LIVE.served.add((namespace, name, target.pod))
            live = trainer_metrics.live_status(reading)
            if trainer_metrics.changed(current, live):
                live["progress"]["updatedAt"] = at
                patch.update(live)
        state = trainer_metrics.read_state(
            (problem.reason, problem.message) if problem else None,
            served_before=(namespace, name, target.pod) in LIVE.served,
            seconds_running=time.time() - target.started_at,
            grace=RUNTIME.metrics_startup_grace,
        )
        conditions = trainer_metrics.metrics_condition(
            current.get("conditions") or [], state, target.generation, at
        )
        if conditions is not None:
            patch["conditions"] = conditions
            level = logging.WARNING if state[0] == "False" else logging.INFO
            log.log(level, "%s/%s: metrics %s: %s", namespace, name, state[1], state[2])
        if not patch:
            return False
        stored = _patch_status(kube, namespace, name, patch, "metrics")
        LIVE.status[target.key] = stored
        if reading is not None and reading.logged_at and "progress" in patch:
            monitoring.STATUS_LAG.observe(max(0.0, time.time() - reading.logged_at))
        return True


def _tensorboard_after_run(
    kube: Kube, owner: children.Owner, spec: GemmaFineTuneSpec, new_status: Manifest, who: str
) -> str | None:
    """Keep TensorBoard answering after the run for ``keepAfterFinishSeconds`` (a Deployment
    behind the same Service), then remove it. Returns its URL while it is kept."""
    name = children.child_names(owner.name)["tensorboard"]
    keep_until = status.tensorboard_kept_until(
        new_status.get("completionTime"), spec.tensorboard.keep_after_finish_seconds
    )
    live = kube.get("Deployment", owner.namespace, name)
    if keep_until is not None and time.time() < keep_until:
        if live is None:
            desired = children.tensorboard_deployment(owner, spec, RUNTIME.defaults)
            if _create(kube, desired, who) is not None:
                log.info(
                    "%s: TensorBoard stays up after the run for %ds",
                    who,
                    spec.tensorboard.keep_after_finish_seconds,
                )
        return children.tensorboard_url(owner, spec)
    if live is not None and _owned_by(live, owner.uid):
        kube.delete("Deployment", owner.namespace, name, uid=live["metadata"]["uid"])
        log.info(
            "%s: removed TensorBoard (kept %ds after the run)",
            who,
            spec.tensorboard.keep_after_finish_seconds,
        )
    return None


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
    monitoring.RECONCILES.inc()
    try:
        with monitoring.RECONCILE_SECONDS.time():
            reconcile(namespace, name)
    except NamespaceTerminating:
        # Its fine-tunes go with the namespace: nothing to create, nothing wrong.
        log.info("%s/%s: the namespace is being deleted; not reconciling", namespace, name)
    except Exception:
        monitoring.RECONCILE_ERRORS.inc()
        log.exception("%s/%s: reconcile failed; the next event or resync retries", namespace, name)


# ---------------------------------------------------------------------------------------------
# Triggers
# ---------------------------------------------------------------------------------------------
@kopf.on.event(GROUP, VERSION, PLURAL)
def on_finetune(event: dict[str, Any], namespace: str, name: str, **_: Any) -> None:
    if event.get("type") == "DELETED":
        _forget(namespace, name)
        return
    _safely(namespace, name)


def _forget(namespace: str, name: str) -> None:
    with _lock(namespace, name):
        _stop_reading(namespace, name)


def _stop_reading(namespace: str, name: str) -> None:
    """The fine-tune is gone or going: no more metrics reads or live status for it."""
    if RUNTIME.scraper is not None:
        RUNTIME.scraper.forget(namespace, name)
    LIVE.forget(namespace, name)
    monitoring.PHASES.set(namespace, name, None)


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
                st = item.get("status") or {}
                if st.get("phase") in TERMINAL_PHASES and not st.get("tensorboardURL"):
                    continue  # finished, and no TensorBoard left to take down
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
    if RUNTIME.scraper is not None:
        threading.Thread(
            target=RUNTIME.scraper.run, args=(_stop_resync,), daemon=True, name="gft-scraper"
        ).start()


@kopf.on.cleanup()
def cleanup(**_: Any) -> None:
    _stop_resync.set()


@kopf.on.probe(id="ready")
def ready(**_: Any) -> float:
    """The liveness/readiness endpoint answers once the operator has started; this adds the
    time of the last probe so that a stuck event loop shows."""
    return time.time()
