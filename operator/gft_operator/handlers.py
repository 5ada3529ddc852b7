"""The kopf handlers: thin. Every trigger (the GemmaFineTune changed, one of its Jobs or pods
changed, the periodic resync, a queued retry) runs the same level-based ``reconcile``: read what
exists, let ``children`` and ``status`` decide, create what is missing, patch the status,
record an Event.

Reads come from memory (``cache``): kopf's watches, filtered by the API server to what this
operator made, keep every fine-tune, child, pod and Warning event there; the API server sees
only writes, and a reconcile writes only what changed.

Idempotent and restart-safe by construction: children have fixed names (a second create is a
409, never a second Job), the status lives on the object (the cache is only what the watches
said), and a live Job's pod template is never patched.

Safe for the run's results:
- a run that ended stays ended: the Job and the pod that prove it carry a finalizer until the
  outcome is in the status, and no Job is created for a run whose status is terminal;
- one trainer at a time: a new Job (after one was deleted by hand) waits until every trainer
  of the run has exited;
- status writes carry the resourceVersion they were computed from: a stale writer gets a
  conflict and decides again instead of overwriting;
- an API server that cannot be reached, or says "not now", puts the reconcile off with a
  per-object back-off and one line in the log; nothing is lost and nothing is created twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kopf
from gft_api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from gft_api.compat import known_fields
from gft_api.contract import format_validation_error
from gft_api.v1alpha1 import TERMINAL_PHASES, GemmaFineTuneSpec, Phase
from pydantic import ValidationError

from gft_operator import children, monitoring, policy, status, trainer_metrics
from gft_operator.cache import CACHE, INDEX_OF_KIND, WORKLOADS_INDEX, version
from gft_operator.kube import (
    ApiError,
    ApiUnavailable,
    Conflict,
    Kube,
    Manifest,
    NamespaceTerminating,
    NotLeader,
)
from gft_operator.leader import LeaderElector
from gft_operator.requeue import Requeue
from gft_operator.scraper import Problem, Scraper, Target

log = logging.getLogger("gft_operator")

MANAGED = {"app.kubernetes.io/managed-by": children.MANAGED_BY}
GONE_RETRY_SECONDS = 2.0
"""How soon to look again while a deleted run's children are still going away."""
CATCH_UP_SECONDS = 2.0
"""How long to wait for the watch to deliver an object a write says exists (or changed)."""


class Runtime:
    """What the handlers share: the API client and the operator-wide defaults."""

    kube: Kube | None = None
    defaults: children.Defaults = children.Defaults()
    resync_seconds: float = 10.0
    component: str = "gft-operator"
    instance: str = socket.gethostname()
    scraper: Scraper | None = None
    requeue: Requeue | None = None
    leader: LeaderElector | None = None
    """With leader election on, only the replica holding the Lease reconciles or writes."""
    metrics_startup_grace: float = 600.0
    """Seconds a trainer may take to open its metrics endpoint before that is a problem."""


class LiveState:
    """What the status writers know between reconciles: each object as last read or written,
    with the resourceVersion it was read at (every status write of this operator happens under
    the object's lock and carries that version, so a write from elsewhere is noticed), and which
    pods have served their metrics."""

    def __init__(self) -> None:
        self.body: dict[tuple[str, str], Manifest] = {}
        self.served: set[tuple[str, str, str]] = set()  # (namespace, name, pod)

    def remember(self, key: tuple[str, str], stored: Manifest) -> None:
        """Keep an object as the API server returned it."""
        self.body[key] = stored

    def status(self, key: tuple[str, str]) -> Manifest | None:
        body = self.body.get(key)
        return None if body is None else body.get("status") or {}

    def version(self, key: tuple[str, str]) -> str | None:
        body = self.body.get(key)
        return None if body is None else body["metadata"]["resourceVersion"]

    def forget(self, namespace: str, name: str) -> None:
        self.body.pop((namespace, name), None)
        self.served = {s for s in self.served if s[:2] != (namespace, name)}


class StatusConflict(Exception):
    """The object changed between the read a status was computed from and its write (made
    from the version ``seen``; 0 when something else than the status changed under it)."""

    def __init__(self, message: str = "", seen: int = 0) -> None:
        super().__init__(message)
        self.seen = seen


RUNTIME = Runtime()
_CHILDREN_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gft-children")
LIVE = LiveState()
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_locks_guard = threading.Lock()


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks[(namespace, name)]


def now() -> str:
    return status.timestamp(time.time())


def leading() -> bool:
    """Whether this replica may act: it holds the Lease, or runs without leader election."""
    return RUNTIME.leader is None or RUNTIME.leader.is_leader()


# ---------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------
def _owned_by(obj: Manifest, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def _owned_by_a_finetune(obj: Manifest) -> bool:
    return any(
        ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/")
        for ref in obj["metadata"].get("ownerReferences") or []
    )


def _controller_uid(obj: Manifest) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def _create(kube: Kube, desired: Manifest, who: str) -> Manifest | None:
    """Create a child; ``None`` when one of that name exists already (409)."""
    try:
        created = kube.create(desired)
    except Conflict:
        return None
    CACHE.wrote(created)
    extra = f" (suspend={desired['spec']['suspend']})" if desired["kind"] == "Job" else ""
    log.info("%s: created %s %s%s", who, desired["kind"], desired["metadata"]["name"], extra)
    return created


def _foreign(live: Manifest, desired: Manifest, owner: children.Owner) -> tuple[str, str] | None:
    """Why an existing object of a child's name cannot serve as that child, or ``None``.

    A deleted GemmaFineTune of the same name leaves children that garbage collection is about
    to remove: wait for them. Anything else of that name is the user's: a conflict to resolve.
    The retained output claim of an earlier run of the same name is reused (each run writes in
    its own folder on it)."""
    if _owned_by(live, owner.uid):
        return None
    kind, name = desired["kind"], desired["metadata"]["name"]
    labels = live["metadata"].get("labels") or {}
    ours = (
        labels.get(children.NAME_LABEL) == owner.name
        and labels.get("app.kubernetes.io/managed-by") == children.MANAGED_BY
    )
    if kind == "PersistentVolumeClaim" and ours and not live["metadata"].get("ownerReferences"):
        return None  # a retained claim of an earlier run of this name
    if _owned_by_a_finetune(live) or (ours and live["metadata"].get("deletionTimestamp")):
        return (
            "WaitingForPreviousRun",
            f"the {kind} {name} of a deleted GemmaFineTune of the same name is still going away "
            "(garbage collection removes it); this run starts once it is gone",
        )
    return _not_ours(kind, name)


def _not_ours(kind: str, name: str) -> tuple[str, str]:
    """Why a child cannot be had: an object of its name exists and is someone else's."""
    if kind == "PersistentVolumeClaim":
        return (
            "ChildConflict",
            f"a PersistentVolumeClaim named {name} exists and was not made for this fine-tune: "
            "name it in spec.output.existingClaim to write to it, or delete or rename it",
        )
    return (
        "ChildConflict",
        f"a {kind} named {name} exists and does not belong to this GemmaFineTune; delete it or "
        "rename the GemmaFineTune",
    )


def _sync_child(
    kube: Kube, desired: Manifest, owner: children.Owner, finished: bool, who: str
) -> tuple[str, str] | None:
    """Create a missing child (not after the run finished); keep an Ingress's spec current.
    Returns why the child cannot be had, when something else holds its name."""
    kind, meta = desired["kind"], desired["metadata"]
    live = CACHE.get(kind, meta["namespace"], meta["name"])
    if live is None:
        if finished or _create(kube, desired, who) is not None:
            return None
        # 409: it exists. The watches show everything labelled as this operator's children.
        live = _caught_up(kind, meta["namespace"], meta["name"])
        if live is None:
            return _not_ours(kind, meta["name"])
    problem = _foreign(live, desired, owner)
    if problem is not None or desired["kind"] != "Ingress":
        return problem  # other children are fixed at creation, like the spec they come from
    if live.get("spec") != desired["spec"] or live["metadata"].get("annotations") != meta.get(
        "annotations"
    ):
        live["spec"] = desired["spec"]
        live["metadata"]["annotations"] = meta.get("annotations") or {}
        CACHE.wrote(kube.replace(live))
        log.info("%s: updated Ingress %s", who, meta["name"])
    return None


def _release(kube: Kube, obj: Manifest, who: str) -> None:
    """Take the operator's outcome finalizer off a Job or pod."""
    if children.OUTCOME_FINALIZER in (obj["metadata"].get("finalizers") or []):
        kind = obj.get("kind") or "Pod"
        stored = kube.remove_finalizer({**obj, "kind": kind}, children.OUTCOME_FINALIZER)
        if stored is not None:
            CACHE.wrote({**stored, "kind": kind})
        log.debug("%s: released %s %s", who, obj.get("kind"), obj["metadata"]["name"])


def _caught_up(kind: str, namespace: str, name: str) -> Manifest | None:
    """The object a create was refused for (409), once the watch delivers it; ``None`` when
    none comes: then it is not labelled as one of this operator's, so it is someone else's."""
    return CACHE.wait_for(kind, namespace, name, newer_than=0, timeout=CATCH_UP_SECONDS)


@dataclass(frozen=True)
class Understood:
    """What a version of the spec says: the model (or why it is invalid), the fields of a newer
    CRD it ignores, the policy's objections, and the children it asks for."""

    spec: GemmaFineTuneSpec | None
    error: str | None
    ignored: list[str]
    refused: list[str]
    desired: list[Manifest]


_UNDERSTOOD: OrderedDict[tuple[str, str], Understood] = OrderedDict()
_UNDERSTOOD_KEPT = 4096
_understood_guard = threading.Lock()


def _understand(owner: children.Owner, body: Manifest) -> Understood:
    """Validate the spec and build its children once per spec as read: a reconcile comes many
    times between two changes. (Keyed by the spec itself, not the generation: a newer CRD's
    defaults change what is read without a new generation.)"""
    key = (owner.uid, json.dumps(body.get("spec") or {}, sort_keys=True))
    with _understood_guard:
        if key in _UNDERSTOOD:
            _UNDERSTOOD.move_to_end(key)
            return _UNDERSTOOD[key]
    # Fields of a newer CRD are ignored (and said so), never a reason to fail a run.
    known, ignored = known_fields(GemmaFineTuneSpec, body.get("spec") or {})
    spec: GemmaFineTuneSpec | None = None
    error = None
    try:
        spec = GemmaFineTuneSpec.model_validate(known)
    except ValidationError as e:
        error = format_validation_error(e)
    understood = Understood(
        spec=spec,
        error=error,
        ignored=ignored,
        refused=policy.violations(spec, RUNTIME.defaults.image, RUNTIME.defaults.policy)
        if spec
        else [],
        desired=children.desired_children(owner, spec, RUNTIME.defaults) if spec else [],
    )
    with _understood_guard:
        _UNDERSTOOD[key] = understood
        while len(_UNDERSTOOD) > _UNDERSTOOD_KEPT:
            _UNDERSTOOD.popitem(last=False)
    return understood


def _fresher(cached: Manifest | None, written: Manifest | None) -> Manifest | None:
    """The fine-tune as the watch delivered it, or as this operator's last write returned it
    when the watch has not echoed that write yet. Gone when the watch says it is gone."""
    if cached is None or written is None:
        return cached
    return written if version(written) > version(cached) else cached


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


# ---------------------------------------------------------------------------------------------
# Reconcile
# ---------------------------------------------------------------------------------------------
def reconcile(namespace: str, name: str) -> None:
    """Bring one GemmaFineTune's children and status in line with what exists."""
    kube = RUNTIME.kube
    assert kube is not None, "the operator's startup handler sets the client"
    with _lock(namespace, name):
        for _ in range(3):
            try:
                _reconcile(kube, namespace, name)
                return
            except StatusConflict as e:
                monitoring.STATUS_CONFLICTS.inc()
                log.info(
                    "%s/%s: the object changed while it was reconciled; again", namespace, name
                )
                if e.seen:  # let the watch deliver the version that won
                    CACHE.wait_for(KIND, namespace, name, e.seen, CATCH_UP_SECONDS)
        raise ApiUnavailable(409, "the object kept changing while it was being reconciled")


def _reconcile(kube: Kube, namespace: str, name: str) -> None:
    key = (namespace, name)
    body = _fresher(CACHE.finetune(namespace, name), LIVE.body.get(key))
    if body is None:
        _gone(kube, namespace, name)
        return
    meta = body["metadata"]
    if meta.get("deletionTimestamp"):
        _gone(kube, namespace, name)
        return  # garbage collection removes the children
    who = f"{namespace}/{name}"
    owner = children.Owner.from_body(body)
    old_status: Manifest = body.get("status") or {}
    raw_spec = body.get("spec") or {}
    understood = _understand(owner, body)
    spec, spec_error, ignored = understood.spec, understood.error, understood.ignored
    finished = old_status.get("phase") in TERMINAL_PHASES

    blocked: tuple[str, str] | None = None
    desired_job = None
    refused = understood.refused
    if refused and not finished and not old_status.get("jobName"):
        # Nothing is created for it (a run that started before the policy did goes on).
        blocked = ("PolicyViolation", "refused by the cluster's policy: " + "; ".join(refused))
    if spec is not None and not blocked:
        desired = understood.desired
        desired_job = desired[-1]
        missing = [
            c for c in desired[:-1] if not CACHE.has(c["kind"], namespace, c["metadata"]["name"])
        ]
        # Side by side: on a new run that is one round trip for all of them, not one each.
        run = _CHILDREN_POOL.map if len(missing) > 1 else map
        problems = list(
            run(lambda child: _sync_child(kube, child, owner, finished, who), desired[:-1])
        )
        blocked = next((p for p in problems if p is not None), None)
        _drop_unwanted_ingress(kube, owner, desired, who)

    job = CACHE.get("Job", namespace, name)
    if job is not None and not _owned_by(job, owner.uid):
        if _owned_by_a_finetune(job):
            _release(kube, job, who)  # its run was deleted: let it go
            blocked = blocked or (
                "WaitingForPreviousRun",
                f"the Job {name} of a deleted GemmaFineTune of the same name is still going "
                "away (garbage collection removes it); this run starts once it is gone",
            )
        else:
            blocked = blocked or (
                "JobConflict",
                f"a Job named {name} exists and does not belong to this GemmaFineTune; delete "
                "it or rename the GemmaFineTune",
            )
        job = None
    if (
        job is not None
        and job["metadata"].get("deletionTimestamp")
        and not status.job_finished(job)
    ):
        # Deleted before the run ended: let it go. A new Job starts once its trainer exited.
        _release(kube, job, who)
        job = None
    if job is not None and spec is not None:
        patch = children.job_patch(spec, job, status.job_finished(job))
        if patch:
            job = kube.merge_patch("Job", namespace, name, patch)
            CACHE.wrote(job)
            log.info("%s: patched Job %s: %s", who, name, patch["spec"])

    workload = None
    if job is not None and spec is not None and spec.queue_name and CACHE.watches_workloads():
        workload = CACHE.workload(namespace, job["metadata"]["uid"])
        active = children.workload_patch(spec, workload) if workload is not None else None
        if active and workload is not None and not status.job_finished(job):
            wl_name = workload["metadata"]["name"]
            workload = kube.merge_patch("Workload", namespace, wl_name, active)
            CACHE.wrote(workload)
            log.info("%s: patched Kueue Workload %s: %s", who, wl_name, active["spec"])

    # Pods of this name: the current Job's, this run's earlier ones (a Job deleted before it
    # finished), and leftovers of a deleted fine-tune of the same name.
    current: list[Manifest] = []
    earlier: list[Manifest] = []
    job_uid = job["metadata"]["uid"] if job is not None else None
    for pod in CACHE.pods(namespace, name):
        run = (pod["metadata"].get("labels") or {}).get(children.UID_LABEL)
        if job_uid is not None and _controller_uid(pod) == job_uid:
            current.append(pod)
        elif run == owner.uid:
            earlier.append(pod)
        else:
            _release(kube, pod, who)  # a deleted run's: nothing to record
    for pod in earlier:
        if status.alive(pod) and not pod["metadata"].get("deletionTimestamp"):
            # Its Job is gone: stop it (it saves a checkpoint first) before the next starts.
            kube.delete("Pod", namespace, pod["metadata"]["name"], uid=pod["metadata"]["uid"])
            log.info(
                "%s: stopping pod %s, left running by a deleted Job", who, pod["metadata"]["name"]
            )

    observed = status.Observed(
        generation=int(meta.get("generation") or 0),
        suspend=spec.suspend if spec is not None else bool(raw_spec.get("suspend")),
        stop=spec.stop if spec is not None else bool(raw_spec.get("stop")),
        queue_name=spec.queue_name if spec is not None else raw_spec.get("queueName"),
        nodes=spec.resources.nodes if spec is not None else 1,
        kueue=CACHE.watches_workloads(),
        workload=workload,
        old_status=old_status,
        job=job,
        pods=current,
        blocked=blocked,
        earlier_pods=earlier,
        ignored_fields=ignored,
        spec_error=spec_error,
    )
    if desired_job is not None and status.should_create_job(observed):
        if old_status.get("jobName"):
            log.info("%s: Job %s is gone while the run is live; recreating it", who, name)
        created = _create(kube, desired_job, who)
        if created is None and _caught_up("Job", namespace, name) is not None:
            raise StatusConflict  # one of ours exists after all: look again from the start
        if created is None:
            observed.blocked = _not_ours("Job", name)
        observed.job = created
    job = observed.job
    if job is not None and status.pods_behind_job(job, current, time.time(), CATCH_UP_SECONDS * 5):
        if RUNTIME.requeue is not None:
            RUNTIME.requeue.after(key, 0.2)
        return  # the pods' watch has not caught up with the Job's: decide once it has
    if job is not None and not blocked:
        running = any(p.get("status", {}).get("phase") == "Running" for p in current)
        if not running and not status.job_finished(job):
            pending = [
                p["metadata"]["name"]
                for p in current
                if p.get("status", {}).get("phase") == "Pending"
            ]
            observed.events = CACHE.warnings(namespace, [name, *pending])

    at = now()
    decision = status.decide(observed, now=at)
    new_status = decision.status
    if spec is not None:
        new_status["outputClaim"] = children.output_claim_name(owner, spec)
        new_status["outputPath"] = children.run_path(owner)
        url = children.tensorboard_url(owner, spec)
        if url and new_status.get("phase") in TERMINAL_PHASES:
            url = _tensorboard_after_run(kube, owner, spec, new_status, who)
        if url:
            new_status["tensorboardURL"] = url
        elif old_status.get("tensorboardURL"):
            new_status["tensorboardURL"] = None  # merge patch: remove it
    stored = body
    if new_status != old_status:
        stored = _write_status(kube, body, new_status, "phase")
    LIVE.remember(key, stored)
    if decision.transition is not None:
        t = decision.transition
        log.info("%s: %s (%s): %s", who, new_status["phase"], t.reason, t.message)
        record_event(kube, body, t.type, t.reason, t.message, at)
    for t in decision.notices:
        log.warning("%s: %s: %s", who, t.reason, t.message)
        record_event(kube, body, t.type, t.reason, t.message, at)
    ended = stored.get("status", {}).get("phase") in TERMINAL_PHASES
    _release_settled(kube, job, current + earlier, ended, who)
    if ended and spec is not None and job is not None:
        _expire(kube, body, spec, stored, job, current + earlier, who)
    if blocked and blocked[0] == "WaitingForPreviousRun" and RUNTIME.requeue is not None:
        RUNTIME.requeue.after(key, GONE_RETRY_SECONDS)
    monitoring.PHASES.set(namespace, name, new_status.get("phase"))
    _track_trainer(namespace, name, new_status, current, int(meta.get("generation") or 0))


def _write_status(kube: Kube, body: Manifest, new_status: Manifest, kind: str) -> Manifest:
    """Merge-patch the status, on condition that the object is still the one it was computed
    from; returns the object as stored. ``StatusConflict`` when it changed meanwhile."""
    meta = body["metadata"]
    try:
        stored = kube.request(
            "PATCH",
            kube.custom_path(meta["namespace"], meta["name"], "status"),
            body={"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": new_status},
            content_type="application/merge-patch+json",
        )
    except Conflict as e:
        raise StatusConflict(str(e), version(body)) from e
    monitoring.STATUS_WRITES.labels(kind).inc()
    return stored


def _release_settled(
    kube: Kube, job: Manifest | None, pods: list[Manifest], ended: bool, who: str
) -> None:
    """Release what the status written no longer needs: every ended pod once the run ended
    (with the Job), else the ended pods a newer attempt superseded and those that stopped
    cleanly (suspend, preemption). The newest ended pod otherwise keeps its finalizer while
    the run goes on: its termination message may be what ends it."""
    newest = status.newest_pod(pods)
    for pod in pods:
        if not status.alive(pod) and (ended or pod is not newest or status.clean_stop(pod)):
            _release(kube, pod, who)
    if ended and job is not None:
        _release(kube, {"kind": "Job", **job}, who)


def _expire(
    kube: Kube,
    body: Manifest,
    spec: GemmaFineTuneSpec,
    stored: Manifest,
    job: Manifest,
    pods: list[Manifest],
    who: str,
) -> None:
    """``ttlSecondsAfterFinished``: delete the finished Job (and its pods) once the outcome is
    in the status and the time has come; until then, come back when it does."""
    ttl = spec.ttl_seconds_after_finished
    completed = stored.get("status", {}).get("completionTime")
    if ttl is None or not completed or job["metadata"].get("deletionTimestamp"):
        return
    wait = status.unix_time(completed) + ttl - time.time()
    if wait > 0:
        if RUNTIME.requeue is not None:
            RUNTIME.requeue.after((body["metadata"]["namespace"], body["metadata"]["name"]), wait)
        return
    meta = job["metadata"]
    kube.delete("Job", meta["namespace"], meta["name"], uid=meta["uid"])
    CACHE.deleted(job)
    log.info(
        "%s: deleted the finished Job %s (ttlSecondsAfterFinished: %ds)", who, meta["name"], ttl
    )
    stored_meta = stored["metadata"]
    LIVE.remember(
        (stored_meta["namespace"], stored_meta["name"]),
        _write_status(kube, stored, {"jobName": None, "podName": None}, "phase"),
    )


def _gone(kube: Kube, namespace: str, name: str) -> None:
    """The fine-tune is gone or going: no more metrics reads or live status for it, and
    nothing of its run held back by the operator (garbage collection removes the rest)."""
    _stop_reading(namespace, name)
    job = CACHE.get("Job", namespace, name)
    if job is not None and (job["metadata"].get("labels") or {}).get(children.NAME_LABEL) == name:
        _release(kube, job, f"{namespace}/{name}")
    for pod in CACHE.pods(namespace, name):
        _release(kube, pod, f"{namespace}/{name}")


# ---------------------------------------------------------------------------------------------
# Live status from the trainer's metrics
# ---------------------------------------------------------------------------------------------
def _track_trainer(
    namespace: str, name: str, new_status: Manifest, pods: list[Manifest], generation: int
) -> None:
    """Read the metrics of a running trainer; stop reading one that is not running."""
    scraper = RUNTIME.scraper
    if scraper is None:
        return
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    # Pod 0 speaks for a multi-node run, even when a replaced peer is newer.
    pod = status.newest_pod(status.leaders(live))
    started = status.trainer_started_at(pod) if pod is not None else None
    pod_ip = (pod or {}).get("status", {}).get("podIP")
    if new_status.get("phase") != Phase.RUNNING.value or started is None or not pod_ip:
        scraper.forget(namespace, name)
        return
    assert pod is not None
    peers = tuple(
        (p["metadata"]["name"], p["status"]["podIP"])
        for p in status.peers(live)
        if p.get("status", {}).get("phase") == "Running" and p["status"].get("podIP")
    )
    scraper.track(
        Target(
            namespace=namespace,
            name=name,
            pod=pod["metadata"]["name"],
            pod_ip=pod_ip,
            port=children.METRICS_PORT,
            generation=generation,
            started_at=started,
            peers=peers,
        )
    )


def write_live_status(
    target: Target, reading: trainer_metrics.Reading | None, problem: Problem | None
) -> bool:
    """The scraper's sink: put a reading (or why there is none) into the status, when it says
    something new. Returns whether it wrote. The write carries the resourceVersion of the
    status it was computed from; when something else wrote meanwhile, it reads the object
    again and decides again."""
    kube = RUNTIME.kube
    assert kube is not None
    namespace, name = target.key
    if not leading():
        return False
    with _lock(namespace, name):
        for _ in range(3):
            try:
                return _write_live_status(kube, target, reading, problem)
            except StatusConflict as e:
                monitoring.STATUS_CONFLICTS.inc()
                fresh = CACHE.wait_for(KIND, namespace, name, e.seen, CATCH_UP_SECONDS)
                if fresh is None:
                    return False  # gone, or the watch is behind: the next reading tries again
                LIVE.remember(target.key, fresh)
        return False


def _write_live_status(
    kube: Kube,
    target: Target,
    reading: trainer_metrics.Reading | None,
    problem: Problem | None,
) -> bool:
    namespace, name = target.key
    current = LIVE.status(target.key)
    version = LIVE.version(target.key)
    if current is None or version is None or current.get("phase") != Phase.RUNNING.value:
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
    if not patch:
        return False
    meta = {"namespace": namespace, "name": name, "resourceVersion": version}
    stored = _write_status(kube, {"metadata": meta}, patch, "metrics")
    LIVE.remember(target.key, stored)
    if conditions is not None:
        level = logging.WARNING if state[0] == "False" else logging.INFO
        log.log(level, "%s/%s: metrics %s: %s", namespace, name, state[1], state[2])
    if reading is not None and reading.logged_at and "progress" in patch:
        monitoring.STATUS_LAG.observe(max(0.0, time.time() - reading.logged_at))
    return True


# ---------------------------------------------------------------------------------------------
# TensorBoard after the run, the Ingress
# ---------------------------------------------------------------------------------------------
def _tensorboard_after_run(
    kube: Kube, owner: children.Owner, spec: GemmaFineTuneSpec, new_status: Manifest, who: str
) -> str | None:
    """Keep TensorBoard answering after the run for ``keepAfterFinishSeconds`` (a Deployment
    behind the same Service), then remove it. Returns its URL while it is kept."""
    name = children.child_names(owner.name)["tensorboard"]
    keep_until = status.tensorboard_kept_until(
        new_status.get("completionTime"), spec.tensorboard.keep_after_finish_seconds
    )
    live = CACHE.get("Deployment", owner.namespace, name)
    if keep_until is not None and time.time() < keep_until:
        if RUNTIME.requeue is not None:
            RUNTIME.requeue.after((owner.namespace, owner.name), keep_until - time.time())
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
        CACHE.deleted(live)
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
    live = CACHE.get("Ingress", owner.namespace, name)
    if live is not None and _owned_by(live, owner.uid):
        kube.delete("Ingress", owner.namespace, name, uid=live["metadata"]["uid"])
        CACHE.deleted(live)
        log.info("%s: deleted Ingress %s (no longer asked for)", who, name)


# ---------------------------------------------------------------------------------------------
# Running reconciles: errors back off per object
# ---------------------------------------------------------------------------------------------
def _safely(namespace: str, name: str) -> None:
    if not leading():
        return  # a standby: the leader reconciles; everything is looked at again on takeover
    monitoring.RECONCILES.inc()
    key = (namespace, name)
    requeue = RUNTIME.requeue
    try:
        with monitoring.RECONCILE_SECONDS.time():
            reconcile(namespace, name)
    except NotLeader:
        log.info("%s/%s: no longer the leader; stopped reconciling", namespace, name)
    except NamespaceTerminating:
        # Its fine-tunes go with the namespace: nothing to create, nothing wrong.
        log.info("%s/%s: the namespace is being deleted; not reconciling", namespace, name)
    except ApiUnavailable as e:
        monitoring.API_UNAVAILABLE.inc()
        delay = requeue.failed(key, e.retry_after) if requeue else RUNTIME.resync_seconds
        log.warning(
            "%s/%s: the API server is unavailable (%s); trying again in %.0fs",
            namespace,
            name,
            e.message,
            delay,
        )
    except ApiError as e:
        monitoring.RECONCILE_ERRORS.inc()
        delay = requeue.failed(key) if requeue else RUNTIME.resync_seconds
        log.error(
            "%s/%s: reconcile failed: the API server said %s; trying again in %.0fs",
            namespace,
            name,
            e,
            delay,
        )
    except Exception:
        monitoring.RECONCILE_ERRORS.inc()
        delay = requeue.failed(key) if requeue else RUNTIME.resync_seconds
        log.exception("%s/%s: reconcile failed; trying again in %.0fs", namespace, name, delay)
    else:
        if requeue is not None:
            requeue.succeeded(key)


# ---------------------------------------------------------------------------------------------
# Triggers
# ---------------------------------------------------------------------------------------------
# The caches: kopf keeps what these return, per object, until the object is deleted.
WATCHED_CHILDREN = {
    "Job": ("batch", "v1", "jobs"),
    "ConfigMap": ("", "v1", "configmaps"),
    "Service": ("", "v1", "services"),
    "PersistentVolumeClaim": ("", "v1", "persistentvolumeclaims"),
    "Ingress": ("networking.k8s.io", "v1", "ingresses"),
    "NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies"),
    "Deployment": ("apps", "v1", "deployments"),
}
MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={children.MANAGED_BY}"


def _by_name(kind: str, group: str, version_: str, plural: str) -> None:
    labels = None if kind == KIND else MANAGED  # (also filtered by the API server)

    @kopf.index(group, version_, plural, labels=labels, id=INDEX_OF_KIND[kind])
    async def index(namespace: str, name: str, body: kopf.Body, **_: Any) -> Any:
        CACHE.saw()
        return {(namespace, name): dict(body)}


for _kind, _resource in WATCHED_CHILDREN.items():
    _by_name(_kind, *_resource)
_by_name(KIND, GROUP, VERSION, PLURAL)


@kopf.index("", "v1", "pods", labels=MANAGED, id="gft_pods")
async def _pods(namespace: str, labels: Any, body: kopf.Body, **_: Any) -> Any:
    owner = labels.get(children.NAME_LABEL)
    return {(namespace, owner): dict(body)} if owner else None


@kopf.index("", "v1", "events", id="gft_warnings")
async def _warnings(namespace: str, body: kopf.Body, **_: Any) -> Any:
    involved = body.get("involvedObject") or {}
    if body.get("type") != "Warning" or involved.get("kind") not in ("Job", "Pod"):
        return None
    return {(namespace, involved.get("name")): dict(body)}


KUEUE_WORKLOADS = ("kueue.x-k8s.io", "v1beta2", "workloads")


def watch_workloads() -> None:
    """With ``--kueue``: keep Kueue's Workloads in the cache and reconcile a queued fine-tune
    when its Workload changes (admitted, preempted, why it waits). Registered before kopf
    starts; without the flag the operator needs no access to Workloads at all."""

    @kopf.index(*KUEUE_WORKLOADS, id=WORKLOADS_INDEX)
    async def _workloads(namespace: str, body: kopf.Body, **_: Any) -> Any:
        CACHE.saw()
        job = _owning_job(body)
        return {(namespace, job["uid"]): dict(body)} if job else None

    @kopf.on.event(*KUEUE_WORKLOADS)
    async def on_workload(namespace: str, body: kopf.Body, **_: Any) -> None:
        job = _owning_job(body)
        # The Job has its fine-tune's name; other Jobs' Workloads are not ours to look at.
        if job and CACHE.has(KIND, namespace, job["name"]):
            _queue(namespace, job["name"])


def _owning_job(workload: Manifest) -> Manifest | None:
    for ref in (workload.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "Job" and ref.get("apiVersion") == "batch/v1":
            return ref
    return None


# The watch handlers only queue a reconcile: a burst of events for one fine-tune (its pod
# going through its states, its Job and its own status changing) becomes one reconcile, and the
# reconciles run in the queue's worker pool, one at a time per fine-tune.
def _queue(namespace: str, name: str) -> None:
    if RUNTIME.requeue is not None:
        RUNTIME.requeue.after((namespace, name), 0)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_finetune(event: dict[str, Any], namespace: str, name: str, **_: Any) -> None:
    key = (namespace, name)
    if event.get("type") == "DELETED" and RUNTIME.requeue is not None:
        RUNTIME.requeue.forget(key)
    elif _own_write(key, event.get("object") or {}):
        return
    _queue(namespace, name)


def _own_write(key: tuple[str, str], obj: Manifest) -> bool:
    """The event echoes a version this operator already reconciled (its own status write,
    or the version a reconcile triggered otherwise read): nothing new to react to."""
    seen = LIVE.version(key)
    return seen is not None and seen == (obj.get("metadata") or {}).get("resourceVersion")


def _stop_reading(namespace: str, name: str) -> None:
    """The fine-tune is gone or going: no more metrics reads or live status for it."""
    if RUNTIME.scraper is not None:
        RUNTIME.scraper.forget(namespace, name)
    LIVE.forget(namespace, name)
    monitoring.PHASES.set(namespace, name, None)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
async def on_job(labels: dict[str, str], namespace: str, **_: Any) -> None:
    owner = labels.get(children.NAME_LABEL)
    if owner:
        _queue(namespace, owner)


@kopf.on.event("", "v1", "pods", labels=MANAGED)
async def on_pod(labels: dict[str, str], namespace: str, **_: Any) -> None:
    owner = labels.get(children.NAME_LABEL)
    if owner:
        _queue(namespace, owner)


def resync_forever(stop: threading.Event) -> None:
    """Reconcile every unfinished GemmaFineTune periodically: catches what no watch event of
    a fine-tune, Job or pod announces (a Warning event on the Job, a child deleted)."""
    while not stop.wait(RUNTIME.resync_seconds):
        resync()


def resync(everything: bool = False) -> None:
    """Queue a reconcile of every fine-tune in the cache (with ``everything``, finished ones
    too: a new leader looks at all of them once), spread over one resync period so that the
    workers see a steady trickle rather than a burst."""
    requeue = RUNTIME.requeue
    if requeue is None or not CACHE.attached or not leading():
        return
    keys = [
        (ns, name)
        for ns, name, st in CACHE.finetunes()
        if everything
        or st.get("phase") not in TERMINAL_PHASES
        or st.get("tensorboardURL")  # finished: a TensorBoard to take down,
        or st.get("jobName")  # or a Job to expire
    ]
    spread = 0.0 if everything else RUNTIME.resync_seconds
    for i, key in enumerate(keys):
        requeue.after(key, spread * i / max(1, len(keys)))


def took_over() -> None:
    """Called when this replica becomes the leader: what happened meanwhile had no reconcile
    here, so look at everything once (in its own thread: the Lease keeps being renewed)."""
    threading.Thread(target=resync, args=(True,), daemon=True, name="gft-takeover").start()


_stop_resync = threading.Event()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
    # kopf's own bookkeeping in annotations: the structural schema would prune status.kopf.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.enabled = False  # the operator records its own Events, one per transition
    settings.execution.max_workers = int(os.environ.get("GFT_OPERATOR_WORKERS", "8"))
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    # Filtered by the API server: only what this operator made, only Warning events.
    for group, version_, plural in [*WATCHED_CHILDREN.values(), ("", "v1", "pods")]:
        settings.watching.label_selectors[group, version_, plural] = MANAGED_SELECTOR
    settings.watching.field_selectors["", "v1", "events"] = "type=Warning"
    CACHE.attach(kwargs)  # kopf hands its indexes to every handler
    RUNTIME.requeue = Requeue(_safely, workers=settings.execution.max_workers)
    threading.Thread(
        target=RUNTIME.requeue.run, args=(_stop_resync,), daemon=True, name="gft-requeue"
    ).start()
    threading.Thread(
        target=resync_forever, args=(_stop_resync,), daemon=True, name="gft-resync"
    ).start()
    if RUNTIME.scraper is not None:
        threading.Thread(
            target=RUNTIME.scraper.run, args=(_stop_resync,), daemon=True, name="gft-scraper"
        ).start()
    if RUNTIME.leader is not None:
        threading.Thread(
            target=RUNTIME.leader.run, args=(_stop_resync,), daemon=True, name="gft-leader"
        ).start()


@kopf.on.cleanup()
def cleanup(**_: Any) -> None:
    _stop_resync.set()
    if RUNTIME.leader is not None:
        RUNTIME.leader.release()  # a standby takes over now, not when the Lease lapses


@kopf.on.probe(id="ready")
def ready(**_: Any) -> float:
    """The liveness/readiness endpoint answers once the operator has started; this adds the
    time of the last probe so that a stuck event loop shows."""
    return time.time()
