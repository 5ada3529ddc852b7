"""Reconcile one GemmaFineTune: observe what exists (the caches), let ``children`` and
``status`` decide (pure), and write the difference through ``apply.Writer`` (the one place that
writes). Every trigger (the fine-tune, its Job or pods changed, the resync, a queued retry)
runs this same level-based function; nothing runs it before the caches are synced.

Idempotent and restart-safe by construction: children have fixed names (a second create is a
409, never a second Job), the status lives on the object (the cache is only what the watches
said), and a live Job's pod template is never patched.

Safe for the run's results:
- a run that ended stays ended: the Job and the pod that prove it carry a finalizer until the
  outcome is in the status, no Job is created for a run whose status is terminal, and an
  outcome is never decided from pods not seen (``RecordingOutcome`` until they are, or until a
  read of the API server confirms they are gone);
- one trainer at a time: a new Job (after one was deleted by hand) waits until every trainer
  of the run has exited;
- status writes carry the resourceVersion they were computed from: a stale writer gets a
  conflict and decides again instead of overwriting;
- a refusal of the API server becomes the ``Applied`` condition and a Warning event, and the
  reconcile is retried with back-off.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gft_api import KIND
from gft_api.compat import known_fields
from gft_api.contract import format_validation_error
from gft_api.v1alpha1 import TERMINAL_PHASES, GemmaFineTuneSpec
from pydantic import ValidationError

from gft_operator import children, monitoring, policy, status
from gft_operator.apply import Gone, Refused, StatusConflict, Writer
from gft_operator.cache import CACHE
from gft_operator.kube import ApiUnavailable, Manifest
from gft_operator.live import LIVE
from gft_operator.runtime import RUNTIME, drop_lock, lock

log = logging.getLogger("gft_operator")

GONE_RETRY_SECONDS = 2.0
"""How soon to look again while a deleted run's children are still going away."""
CATCH_UP_SECONDS = 2.0
"""How long to wait for the watch to deliver an object a write says exists (or changed)."""
POD_PATIENCE_SECONDS = 10.0
"""How long after its Job ended a pod not seen ended is waited for before the API server is
asked (one read) whether it is still there."""

_CHILDREN_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gft-children")


class Retry(Exception):
    """The reconcile wrote what it could; run it again with back-off (a refusal stands)."""


def reconcile(namespace: str, name: str) -> None:
    """Bring one GemmaFineTune's children and status in line with what exists."""
    try:
        _reconcile_locked(namespace, name)
    finally:
        if not CACHE.has(KIND, namespace, name):
            drop_lock(namespace, name)  # gone: one lock per fine-tune there is, not per one ever


def _reconcile_locked(namespace: str, name: str) -> None:
    writer = RUNTIME.writer
    assert writer is not None, "the operator's startup sets the writer"
    with lock(namespace, name):
        for _ in range(3):
            try:
                _reconcile(writer, namespace, name)
                return
            except Gone:
                log.info("%s/%s: deleted (the watch has not said so yet)", namespace, name)
                gone(writer, namespace, name, None)
                return
            except StatusConflict as e:
                monitoring.STATUS_CONFLICTS.inc()
                log.info(
                    "%s/%s: the object changed while it was reconciled; again", namespace, name
                )
                if e.seen:  # let the watch deliver the version that won
                    CACHE.wait_for(KIND, namespace, name, e.seen, CATCH_UP_SECONDS)
        raise ApiUnavailable(409, "the object kept changing while it was being reconciled")


# ---------------------------------------------------------------------------------------------
# Plan: what a version of the spec asks for (pure, kept while the run is live)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Understood:
    """What a version of the spec says: the model (or why it is invalid), the fields of a newer
    CRD it ignores, the policy's objections, and the children it asks for."""

    spec: GemmaFineTuneSpec | None
    error: str | None
    ignored: list[str]
    refused: list[str]
    ingress_refused: list[str]
    desired: list[Manifest]


_UNDERSTOOD: dict[tuple[str, str], tuple[str, Understood]] = {}
"""(namespace, name) -> (uid and spec as read, what they say)."""
_understood_guard = threading.Lock()


def understand(owner: children.Owner, body: Manifest) -> Understood:
    """Validate the spec and build its children once per spec as read: a reconcile comes many
    times between two changes. One entry per unfinished fine-tune (``forget``: finished or
    gone). Keyed by the spec itself, not the generation: a newer CRD's defaults change what is
    read without a new generation."""
    raw = owner.uid + json.dumps(body.get("spec") or {}, sort_keys=True)
    key = (owner.namespace, owner.name)
    with _understood_guard:
        kept = _UNDERSTOOD.get(key)
        if kept is not None and kept[0] == raw:
            return kept[1]
    # Fields of a newer CRD are ignored (and said so), never a reason to fail a run.
    known, ignored = known_fields(GemmaFineTuneSpec, body.get("spec") or {})
    spec: GemmaFineTuneSpec | None = None
    error = None
    try:
        spec = GemmaFineTuneSpec.model_validate(known)
    except ValidationError as e:
        error = format_validation_error(e)
    defaults = RUNTIME.defaults
    understood = Understood(
        spec=spec,
        error=error,
        ignored=ignored,
        refused=policy.violations(spec, defaults.image, defaults.policy) if spec else [],
        ingress_refused=policy.ingress_violations(spec, defaults.policy) if spec else [],
        desired=children.desired_children(owner, spec, defaults) if spec else [],
    )
    if (body.get("status") or {}).get("phase") not in TERMINAL_PHASES:
        with _understood_guard:
            _UNDERSTOOD[key] = (raw, understood)
    return understood


def forget(namespace: str, name: str) -> None:
    with _understood_guard:
        _UNDERSTOOD.pop((namespace, name), None)


def understood_count() -> int:
    with _understood_guard:
        return len(_UNDERSTOOD)


# ---------------------------------------------------------------------------------------------
# Ownership of what is found under a child's name
# ---------------------------------------------------------------------------------------------
def _owned_by(obj: Manifest, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def _owned_by_a_finetune(obj: Manifest) -> bool:
    return any(
        ref.get("kind") == KIND and ref.get("apiVersion", "").startswith("finetune.gemma.dev/")
        for ref in obj["metadata"].get("ownerReferences") or []
    )


def _controller_uid(obj: Manifest) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


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


def _caught_up(kind: str, namespace: str, name: str) -> Manifest | None:
    """The object a create was refused for (409), once the watch delivers it; ``None`` when
    none comes: then it is not labelled as one of this operator's, so it is someone else's."""
    return CACHE.wait_for(kind, namespace, name, newer_than=0, timeout=CATCH_UP_SECONDS)


# ---------------------------------------------------------------------------------------------
# The children before the Job
# ---------------------------------------------------------------------------------------------
@dataclass
class ChildOutcome:
    blocked: tuple[str, str] | None = None
    """Why the run cannot start (a conflict, a refusal)."""
    refusal: tuple[str, str] | None = None
    """What the API server (or the policy, for the Ingress) refused: the Applied condition."""


def _sync_child(
    w: Writer, desired: Manifest, owner: children.Owner, finished: bool, who: str
) -> ChildOutcome:
    """Create a missing child (not after the run finished); keep an Ingress as the spec says
    (server-side apply)."""
    kind, meta = desired["kind"], desired["metadata"]
    live = CACHE.get(kind, meta["namespace"], meta["name"])
    try:
        if live is None and kind == "Ingress":
            return _first_apply(w, desired, owner, finished, who)
        if live is None:
            if finished or w.create(desired, who) is not None:
                return ChildOutcome()
            # 409: it exists. The watches show everything labelled as this operator's children.
            live = _caught_up(kind, meta["namespace"], meta["name"])
            if live is None:
                return ChildOutcome(blocked=_not_ours(kind, meta["name"]))
        problem = _foreign(live, desired, owner)
        if problem is not None or kind != "Ingress":
            return ChildOutcome(blocked=problem)  # the others are fixed, like their spec
        if not w.applied(desired, live):
            w.apply(desired, who)
    except Refused as e:
        return ChildOutcome(blocked=(e.reason, e.message), refusal=(e.reason, e.message))
    return ChildOutcome()


def _first_apply(
    w: Writer, desired: Manifest, owner: children.Owner, finished: bool, who: str
) -> ChildOutcome:
    """An Ingress the watch does not show: someone else's of that name (not labelled as this
    operator's) is never taken over, so the API server is asked first (one read)."""
    meta = desired["metadata"]
    found = w.exists_elsewhere("Ingress", meta["namespace"], meta["name"])
    if found is not None and _foreign(found, desired, owner) is not None:
        return ChildOutcome(blocked=_foreign(found, desired, owner))
    if not finished:
        w.apply(desired, who)
    return ChildOutcome()


def _ingress(
    w: Writer, owner: children.Owner, understood: Understood, finished: bool, who: str
) -> ChildOutcome:
    """The TensorBoard Ingress: applied while asked for and within the policy; removed when no
    longer asked for or outside it (the run goes on)."""
    desired = next((d for d in understood.desired if d["kind"] == "Ingress"), None)
    if desired is not None and not understood.ingress_refused:
        outcome = _sync_child(w, desired, owner, finished, who)
        if outcome.refusal is not None:  # said, retried; the run goes on without it
            return ChildOutcome(refusal=outcome.refusal)
        return outcome
    name = children.child_names(owner.name)["ingress"]
    live = CACHE.get("Ingress", owner.namespace, name)
    if live is not None and _owned_by(live, owner.uid):
        why = "no longer asked for" if desired is None else "outside the cluster's policy"
        w.delete(live, who, f"deleted Ingress {name} ({why})")
    if desired is None:
        return ChildOutcome()
    message = "the TensorBoard Ingress is not made: " + "; ".join(understood.ingress_refused)
    return ChildOutcome(refusal=("PolicyViolation", message))


def _children(
    w: Writer, body: Manifest, understood: Understood, finished: bool, who: str
) -> ChildOutcome:
    """Every child but the Job (side by side when several are missing: one round trip).
    A known run's missing child is made again only once the run is confirmed to exist."""
    owner = children.Owner.from_body(body)
    others = [d for d in understood.desired[:-1] if d["kind"] != "Ingress"]
    missing = [
        c for c in others if not CACHE.has(c["kind"], owner.namespace, c["metadata"]["name"])
    ]
    if missing and not finished and (body.get("status") or {}).get("phase"):
        w.confirm(body)
    run = _CHILDREN_POOL.map if len(missing) > 1 else map
    outcomes = list(run(lambda child: _sync_child(w, child, owner, finished, who), others))
    outcomes.append(_ingress(w, owner, understood, finished, who))
    blocked = next((o.blocked for o in outcomes if o.blocked is not None), None)
    refusal = next((o.refusal for o in outcomes if o.refusal is not None), None)
    return ChildOutcome(blocked=blocked, refusal=refusal)


# ---------------------------------------------------------------------------------------------
# The reconcile
# ---------------------------------------------------------------------------------------------
def _reconcile(w: Writer, namespace: str, name: str) -> None:
    key = (namespace, name)
    body = CACHE.finetune(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        gone(w, namespace, name, body)
        return  # garbage collection removes the children
    meta = body["metadata"]
    who = f"{namespace}/{name}"
    owner = children.Owner.from_body(body)
    old_status: Manifest = body.get("status") or {}
    raw_spec = body.get("spec") or {}
    generation = int(meta.get("generation") or 0)
    understood = understand(owner, body)
    spec = understood.spec
    finished = old_status.get("phase") in TERMINAL_PHASES

    # Observe and apply the children that come before the Job.
    outcome = ChildOutcome()
    if understood.refused and not finished and not old_status.get("jobName"):
        # Nothing is created for it (a run that started before the policy did goes on).
        reason = "refused by the cluster's policy: " + "; ".join(understood.refused)
        outcome = ChildOutcome(blocked=("PolicyViolation", reason))
    elif spec is not None:
        outcome = _children(w, body, understood, finished, who)
    blocked, refusal = outcome.blocked, outcome.refusal

    # Observe the Job: this run's, another's of the same name, or none.
    job = CACHE.get("Job", namespace, name)
    if job is not None and not _owned_by(job, owner.uid):
        if _owned_by_a_finetune(job):
            w.release(job, who)  # its run was deleted: let it go
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
        w.release(job, who)
        job = None
    if job is not None and spec is not None:
        patch = children.job_patch(spec, job, status.job_finished(job))
        if patch:
            job = w.patch("Job", namespace, name, patch, who)

    workload = None
    if job is not None and spec is not None and spec.queue_name and CACHE.watches_workloads():
        workload = CACHE.workload(namespace, job["metadata"]["uid"])
        active = children.workload_patch(spec, workload) if workload is not None else None
        if active and workload is not None and not status.job_finished(job):
            workload = w.patch("Workload", namespace, workload["metadata"]["name"], active, who)

    current, earlier = _pods(w, owner, job, who)
    observed = status.Observed(
        generation=generation,
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
        ignored_fields=understood.ignored,
        spec_error=understood.error,
        refusal=refusal,
    )
    desired_job = understood.desired[-1] if spec is not None and not blocked else None
    if desired_job is not None and status.should_create_job(observed):
        if old_status.get("jobName"):
            w.confirm(body)  # or is it the cache that is behind?
            log.info("%s: Job %s is gone while the run is live; recreating it", who, name)
        try:
            created = w.create(desired_job, who)
        except Refused as e:
            created = None
            observed.blocked = observed.refusal = (e.reason, e.message)
        else:
            if created is None and _caught_up("Job", namespace, name) is not None:
                raise StatusConflict  # one of ours exists after all: look again from the start
            if created is None:
                observed.blocked = _not_ours("Job", name)
        observed.job = created
    job = observed.job
    if job is not None and status.pods_behind_job(job, current):
        _confirm_pods(observed, namespace, name, job)
        current = observed.pods  # what the API server has: released once recorded
    if job is not None and not observed.blocked:
        running = any(p.get("status", {}).get("phase") == "Running" for p in current)
        if not running and not status.job_finished(job):
            pending = [
                p["metadata"]["name"]
                for p in current
                if p.get("status", {}).get("phase") == "Pending"
            ]
            observed.events = CACHE.warnings(namespace, [name, *pending])

    # Plan the status, apply it.
    at = status.timestamp(time.time())
    decision = status.decide(observed, now=at)
    new_status = decision.status
    if spec is not None:
        new_status["outputClaim"] = children.output_claim_name(owner, spec)
        new_status["outputPath"] = children.run_path(owner)
        url = children.tensorboard_url(owner, spec)
        if url and new_status.get("phase") in TERMINAL_PHASES:
            url = _tensorboard_after_run(w, owner, spec, new_status, who)
        if url:
            new_status["tensorboardURL"] = url
        elif old_status.get("tensorboardURL"):
            new_status["tensorboardURL"] = None  # merge patch: remove it
    stored = body
    if new_status != old_status:
        stored = w.status(body, new_status, "phase")
    if decision.transition is not None:
        t = decision.transition
        log.info("%s: %s (%s): %s", who, new_status["phase"], t.reason, t.message)
        w.event(body, t.type, t.reason, t.message, at)
    for t in decision.notices:
        log.warning("%s: %s: %s", who, t.reason, t.message)
        w.event(body, t.type, t.reason, t.message, at)
    ended = stored.get("status", {}).get("phase") in TERMINAL_PHASES
    _release_settled(w, job, current + earlier, ended, who)
    if ended:
        forget(namespace, name)
        CACHE.forget_events(namespace, [name, *(p["metadata"]["name"] for p in current + earlier)])
    if ended and spec is not None and job is not None:
        _expire(w, spec, stored, job, who)
    if RUNTIME.requeue is not None:
        if blocked and blocked[0] == "WaitingForPreviousRun":
            RUNTIME.requeue.after(key, GONE_RETRY_SECONDS)
        if new_status.get("reason") == "RecordingOutcome":
            RUNTIME.requeue.after(key, 1.0)
    monitoring.PHASES.set(namespace, name, new_status.get("phase"))
    LIVE.track(namespace, name, new_status, current, generation)
    if observed.refusal is not None and observed.refusal[0] != "PolicyViolation":
        raise Retry(observed.refusal[1])


def _pods(
    w: Writer, owner: children.Owner, job: Manifest | None, who: str
) -> tuple[list[Manifest], list[Manifest]]:
    """Pods of this name: the current Job's, this run's earlier ones (a Job deleted before it
    finished), and leftovers of a deleted fine-tune of the same name (released at once). A
    trainer left running by a deleted Job is stopped (it saves a checkpoint first) before the
    next one starts."""
    current: list[Manifest] = []
    earlier: list[Manifest] = []
    job_uid = job["metadata"]["uid"] if job is not None else None
    for pod in CACHE.pods(owner.namespace, owner.name):
        run = (pod["metadata"].get("labels") or {}).get(children.UID_LABEL)
        if job_uid is not None and _controller_uid(pod) == job_uid:
            current.append(pod)
        elif run == owner.uid:
            earlier.append(pod)
        else:
            w.release(pod, who)  # a deleted run's: nothing to record
    for pod in earlier:
        if status.alive(pod) and not pod["metadata"].get("deletionTimestamp"):
            name = pod["metadata"]["name"]
            w.delete(pod, who, f"stopping pod {name}, left running by a deleted Job")
    return current, earlier


def _confirm_pods(observed: status.Observed, namespace: str, name: str, job: Manifest) -> None:
    """The Job ended but not all its pods are seen ended. For a while the watch is given the
    benefit of the doubt; then the API server is asked (one LIST) what pods there are: the
    outcome is decided from that, never from a half-seen view."""
    ended_at = status.job_ended_at(job)
    if ended_at is not None and time.time() - ended_at < POD_PATIENCE_SECONDS:
        return
    kube = RUNTIME.kube
    assert kube is not None
    listed = kube.list("Pod", namespace, labelSelector=f"{children.NAME_LABEL}={name}")
    job_uid = job["metadata"]["uid"]
    observed.pods = [{**p, "kind": "Pod"} for p in listed if _controller_uid(p) == job_uid]
    observed.pods_confirmed = True
    log.info(
        "%s/%s: the Job ended; %d of its pods read from the API server to record the outcome",
        namespace,
        name,
        len(observed.pods),
    )


def _release_settled(
    w: Writer, job: Manifest | None, pods: list[Manifest], ended: bool, who: str
) -> None:
    """Release what the status written no longer needs: every ended pod once the run ended
    (with the Job), else the ended pods a newer attempt superseded and those that stopped
    cleanly (suspend, preemption). The newest ended pod otherwise keeps its finalizer while
    the run goes on: its termination message may be what ends it."""
    newest = status.newest_pod(pods)
    for pod in pods:
        if not status.alive(pod) and (ended or pod is not newest or status.clean_stop(pod)):
            w.release(pod, who)
    if ended and job is not None:
        w.release({"kind": "Job", **job}, who)


def _expire(w: Writer, spec: GemmaFineTuneSpec, stored: Manifest, job: Manifest, who: str) -> None:
    """``ttlSecondsAfterFinished``: delete the finished Job (and its pods) once the outcome is
    in the status and the time has come; until then, come back when it does."""
    ttl = spec.ttl_seconds_after_finished
    completed = stored.get("status", {}).get("completionTime")
    if ttl is None or not completed or job["metadata"].get("deletionTimestamp"):
        return
    wait = status.unix_time(completed) + ttl - time.time()
    meta = stored["metadata"]
    if wait > 0:
        if RUNTIME.requeue is not None:
            RUNTIME.requeue.after((meta["namespace"], meta["name"]), wait)
        return
    name = job["metadata"]["name"]
    w.delete(
        {"kind": "Job", **job},
        who,
        f"deleted the finished Job {name} (ttlSecondsAfterFinished: {ttl}s)",
    )
    w.status(stored, {"jobName": None, "podName": None}, "phase")


def _tensorboard_after_run(
    w: Writer, owner: children.Owner, spec: GemmaFineTuneSpec, new_status: Manifest, who: str
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
            if w.create(desired, who) is not None:
                log.info(
                    "%s: TensorBoard stays up after the run for %ds",
                    who,
                    spec.tensorboard.keep_after_finish_seconds,
                )
        return children.tensorboard_url(owner, spec)
    if live is not None and _owned_by(live, owner.uid):
        kept = spec.tensorboard.keep_after_finish_seconds
        w.delete(live, who, f"removed TensorBoard (kept {kept}s after the run)")
    return None


def gone(w: Writer, namespace: str, name: str, body: Manifest | None) -> None:
    """The fine-tune is gone or going: no more metrics reads or live status for it, and
    nothing of its run held back by the operator (garbage collection removes the rest)."""
    LIVE.forget(namespace, name)
    monitoring.PHASES.set(namespace, name, None)
    who = f"{namespace}/{name}"
    job = CACHE.get("Job", namespace, name)
    if job is not None and (job["metadata"].get("labels") or {}).get(children.NAME_LABEL) == name:
        w.release(job, who)
    pods = CACHE.pods(namespace, name)
    for pod in pods:
        w.release(pod, who)
    CACHE.forget_events(namespace, [name, *(p["metadata"]["name"] for p in pods)])
    forget(namespace, name)
    if body is None:
        CACHE.gone(namespace, name)


def orphans() -> list[Manifest]:
    """The labelled Jobs and pods holding the outcome finalizer whose fine-tune is gone (it was
    deleted while no operator led): nothing will reconcile them, so the sweep releases them."""
    found = []
    for kind in ("Job", "Pod"):
        for obj in CACHE.labelled(kind):
            meta = obj["metadata"]
            if children.OUTCOME_FINALIZER not in (meta.get("finalizers") or []):
                continue
            labels = meta.get("labels") or {}
            owner = CACHE.finetune(meta["namespace"], labels.get(children.NAME_LABEL) or "")
            # The run's uid: the label (this operator's Jobs and pods), or a Job's owner.
            run = labels.get(children.UID_LABEL) or (
                _controller_uid(obj) if kind == "Job" else None
            )
            if owner is None or (run is not None and owner["metadata"]["uid"] != run):
                found.append(obj)
    return found


def sweep() -> int:
    """Release the orphans (on taking the lead, and at a leader's start); returns how many."""
    w = RUNTIME.writer
    assert w is not None
    released = 0
    for obj in orphans():
        meta = obj["metadata"]
        w.release(obj, f"{meta['namespace']}/{meta['name']}")
        released += 1
        log.info(
            "%s/%s: released %s %s: its fine-tune was deleted while no operator led",
            meta["namespace"],
            (meta.get("labels") or {}).get(children.NAME_LABEL),
            obj["kind"],
            meta["name"],
        )
    return released
