"""From what the operator observes (the Job, its pods, their events) to the GemmaFineTune's
status: phase, conditions with reasons a user can act on, attempts, times, the trainer's result.

Pure: ``decide`` takes plain dicts and returns the new status and, when the phase or its reason
changed, the Event to record. The handlers read and write; all judgement is here.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from gft_api.contract import ExitCode, Outcome, TrainerSummary, describe_exit_code
from gft_api.conventions import (
    COMPLETION_INDEX_LABEL,
    TRAINER,
    WARNING_REASONS,
    leaders,
    newest_pod,
    peers,
)
from gft_api.v1alpha1 import TERMINAL_PHASES, Phase

Manifest = dict[str, Any]

CONDITION_TYPES = ("Ready", "Suspended", "Complete", "Failed")
SPEC_UNDERSTOOD = "SpecUnderstood"
METRICS_AVAILABLE = "MetricsAvailable"
APPLIED = "Applied"
"""False while the API server refuses a write (or the policy an Ingress): reason and message."""
REASON_PATTERN = re.compile(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?")
"""A condition's reason, as the CRD (and the API conventions) hold it."""

__all__ = ["COMPLETION_INDEX_LABEL", "leaders", "newest_pod", "peers"]  # (from gft_api)


@dataclass
class Observed:
    """Everything the status is computed from."""

    generation: int
    suspend: bool
    queue_name: str | None
    old_status: Manifest
    job: Manifest | None
    pods: list[Manifest] = field(default_factory=list)
    events: list[Manifest] = field(default_factory=list)
    """Warning events about the Job and its pods (FailedCreate, FailedScheduling, FailedMount)."""
    blocked: tuple[str, str] | None = None
    """(reason, message) when a child cannot be had: one of that name belongs to something
    else (``JobConflict``, ``ChildConflict``) or to a deleted run still going away
    (``WaitingForPreviousRun``). Nothing is created meanwhile."""
    earlier_pods: list[Manifest] = field(default_factory=list)
    """Pods of this run from an earlier Job (one deleted before it finished)."""
    ignored_fields: list[str] = field(default_factory=list)
    """Spec fields this operator does not know (the CRD is newer): ignored."""
    spec_error: str | None = None
    """Why the spec cannot be used (the CRD admitted what this operator refuses)."""
    nodes: int = 1
    """Pods per attempt (``resources.nodes``): an Indexed Job's pod 0 is the run's trainer
    (rank 0: the result, the metrics); the others are its peers."""
    kueue: bool = False
    """Kueue's Workloads are watched (``--kueue``): a queued run can say why it waits."""
    workload: Manifest | None = None
    """Kueue's Workload of the Job, when queued and watched."""
    refusal: tuple[str, str] | None = None
    """(reason, message) when the API server refused a write (or the policy the Ingress):
    the ``Applied`` condition says so; when it kept the run from starting, so does ``blocked``."""
    pods_confirmed: bool = False
    """``pods`` was read from the API server itself (not the watch), so pods missing from it
    are gone: an ended Job is then decided from its own record."""
    stop: bool = False
    """``spec.stop``: end the run once its trainer has saved a checkpoint and stopped."""


@dataclass
class Transition:
    """An Event to record: the phase or its reason changed."""

    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Decision:
    status: Manifest
    transition: Transition | None
    """The phase or its reason changed."""
    notices: list[Transition] = field(default_factory=list)
    """Other Events to record (the spec stopped being understood)."""


@dataclass
class _Verdict:
    phase: Phase
    reason: str
    message: str


# ---------------------------------------------------------------------------------------------
# Reading the Job and pods
# ---------------------------------------------------------------------------------------------
def job_finished(job: Manifest) -> bool:
    """The Job completed or failed (no new pods, no more changes but its TTL)."""
    return bool(_job_condition(job, "Complete") or _job_condition(job, "Failed"))


def pods_behind_job(job: Manifest, pods: list[Manifest]) -> bool:
    """The Job has ended but fewer of its pods show as ended than it counts: what was read of
    the pods (a watch of their own) is behind what was read of the Job, or pods were removed.
    Deciding the run's outcome now would freeze a half-seen one (attempts, the trainer's
    result): the status says it is recording the outcome until the pods are seen, or a read of
    the API server confirms they are gone (``Observed.pods_confirmed``)."""
    if not job_finished(job):
        return False
    status = job.get("status") or {}
    counted = int(status.get("failed") or 0) + int(status.get("succeeded") or 0)
    return sum(not alive(p) for p in pods) < counted


def job_ended_at(job: Manifest) -> float | None:
    """Unix time the Job ended (its Complete or Failed condition), if it has."""
    ended = _job_condition(job, "Complete") or _job_condition(job, "Failed")
    stamp = (ended or {}).get("lastTransitionTime")
    return unix_time(stamp) if stamp else None


def _job_condition(job: Manifest, type_: str) -> Manifest | None:
    for cond in job.get("status", {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def _trainer_status(pod: Manifest) -> Manifest | None:
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        if cs.get("name") == TRAINER:
            return cs
    return None


def _terminated(pod: Manifest) -> Manifest | None:
    cs = _trainer_status(pod)
    return (cs or {}).get("state", {}).get("terminated")


_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def timestamp(unix: float) -> str:
    """An API timestamp (RFC 3339, UTC, whole seconds)."""
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime(_TIME_FORMAT)


def unix_time(stamp: str) -> float:
    """The Unix time of an API timestamp."""
    at = datetime.datetime.strptime(stamp, _TIME_FORMAT)
    return at.replace(tzinfo=datetime.UTC).timestamp()


def trainer_started_at(pod: Manifest) -> float | None:
    """Unix time the trainer container started running, or ``None`` when it is not running."""
    running = ((_trainer_status(pod) or {}).get("state") or {}).get("running")
    if not running or not running.get("startedAt"):
        return None
    return unix_time(running["startedAt"])


def tensorboard_kept_until(completion_time: str | None, keep_seconds: int) -> float | None:
    """Unix time until which TensorBoard stays up after the run, or ``None`` for not at all."""
    if not completion_time or keep_seconds <= 0:
        return None
    return unix_time(completion_time) + keep_seconds


def _disruption(pod: Manifest) -> Manifest | None:
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return cond
    return None


def summary_of(pod: Manifest) -> TrainerSummary | None:
    """The trainer's final summary from its termination message, if it wrote one, made fit
    for the status (``sanitized``): whatever a pod writes, the status stays writable."""
    term = _terminated(pod)
    if not term or not term.get("message"):
        return None
    return sanitized(term["message"], int(term.get("exitCode", 0)))


_TEXT_LIMITS = {"message": 2048, "lastCheckpoint": 1024}
_SAMPLE_LIMITS = {"prompt": 1024, "answer": 2048, "reference": 1024}
_COUNTS = ("globalStep", "totalSteps", "trainTokens", "bestStep", "exportedStep")


def sanitized(text: str, exit_code: int) -> TrainerSummary | None:
    """A termination message as a summary the CRD admits, or ``None`` when it is not one
    (a crash's stack trace). The pod is the trainer's, and the trainer runs the author's image:
    a reason outside the conditions' pattern (every status write would be refused, 422), a NaN
    or infinite number (not JSON), a negative count or an over-long text are cleaned, not
    passed on: the reason falls back to the exit code's, the rest is dropped or cut."""
    try:
        raw: Any = json.loads(text)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    clean: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, float) and not math.isfinite(value):
            continue
        if key in _COUNTS and isinstance(value, int) and value < 0:
            continue
        if key in _TEXT_LIMITS and isinstance(value, str):
            value = value[: _TEXT_LIMITS[key]]
        clean[key] = value
    if not isinstance(clean.get("reason"), str) or not REASON_PATTERN.fullmatch(
        clean["reason"][:64]
    ):
        clean["reason"] = describe_exit_code(exit_code)
    clean["reason"] = clean["reason"][:64]
    samples = clean.get("samples")
    if isinstance(samples, list):
        clean["samples"] = [
            {k: v[: _SAMPLE_LIMITS[k]] if isinstance(v, str) and k in _SAMPLE_LIMITS else v
             for k, v in sample.items()}
            for sample in samples[:8]
            if isinstance(sample, dict)
        ]  # fmt: skip
    artifacts = clean.get("artifacts")
    if isinstance(artifacts, dict):
        clean["artifacts"] = {
            str(k)[:253]: v[:1024] for k, v in list(artifacts.items())[:32] if isinstance(v, str)
        }
    return TrainerSummary.from_termination_message(json.dumps(clean))


def _exit_code_in(message: str) -> int | None:
    """The exit code a Job's FailJob condition names ("... failed with exit code 78 ...")."""
    found = re.search(r"exit code (\d+)", message)
    return int(found.group(1)) if found else None


def _tail(text: str, limit: int = 600) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def describe_failure(pod: Manifest) -> tuple[str, str]:
    """(reason, message) for a failed training pod."""
    disruption = _disruption(pod)
    if disruption is not None:
        return (
            disruption.get("reason") or "Disrupted",
            f"pod {pod['metadata']['name']} was disrupted ({disruption.get('message', '')}); "
            "not counted as a failure, the next attempt resumes from the last checkpoint",
        )
    term = _terminated(pod)
    if term is None:
        reason = pod.get("status", {}).get("reason") or "PodFailed"
        return reason, pod.get("status", {}).get(
            "message"
        ) or f"pod {pod['metadata']['name']} failed"
    code = int(term.get("exitCode", 0))
    if term.get("reason") == "OOMKilled":
        return (
            "OOMKilled",
            "the trainer ran out of memory (OOMKilled): raise resources.memory, or lower "
            "training.batchSize or dataset.maxSeqLength",
        )
    summary = summary_of(pod)
    if summary is not None:
        return summary.reason or describe_exit_code(code), summary.message or f"exit code {code}"
    reason = describe_exit_code(code)
    detail = _tail(term.get("message") or "")
    message = f"the trainer exited with code {code}"
    if code in (137, 143):
        message += f" (killed by signal {code - 128})"
    if detail:
        message += f": {detail}"
    return reason, message


def _missing_ref(message: str) -> str | None:
    """SecretNotFound or ConfigMapNotFound when a kubelet message says one is missing."""
    found = re.search(r'(secret|configmap) "[^"]+" not found', message, re.IGNORECASE)
    if found is None:
        return None
    return "SecretNotFound" if found.group(1).lower() == "secret" else "ConfigMapNotFound"


def _problem_of_pending(pod: Manifest, events: list[Manifest]) -> tuple[str, str] | None:
    """Why a pod that is not running yet is stuck, if it is."""
    name = pod["metadata"]["name"]
    status = pod.get("status", {})
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            message = cond.get("message") or ""
            if "unbound" in message and "PersistentVolumeClaim" in message:
                return "PersistentVolumeClaimNotBound", message
            return (cond.get("reason") or "Unschedulable"), message
    all_statuses = (status.get("initContainerStatuses") or []) + (
        status.get("containerStatuses") or []
    )
    for cs in all_statuses:
        waiting = cs.get("state", {}).get("waiting") or {}
        reason = waiting.get("reason") or ""
        message = waiting.get("message") or ""
        if reason in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"):
            return "ImagePullFailed", f"{cs.get('name')}: {reason}: {message}".rstrip(": ")
        if reason == "CreateContainerConfigError":
            return _missing_ref(
                message
            ) or "CreateContainerConfigError", f"{cs.get('name')}: {message}"
    # Events outlive what they describe: a FailedScheduling from before the pod was placed
    # (its claim was not bound yet) says nothing once it is; the newest one of a kind speaks.
    scheduled = bool(pod.get("spec", {}).get("nodeName"))
    wanted = "FailedMount" if scheduled else "FailedScheduling"
    relevant = [
        ev
        for ev in events
        if ev.get("involvedObject", {}).get("name") == name
        and ev.get("involvedObject", {}).get("uid") in (None, pod["metadata"].get("uid"))
        and ev.get("reason") == wanted
    ]
    if not relevant:
        return None
    ev = max(relevant, key=_event_time)
    message = ev.get("message") or ""
    if wanted == "FailedMount":
        return _missing_ref(message) or "VolumeMountFailed", message
    return "Unschedulable", message


def _event_time(ev: Manifest) -> tuple[str, int]:
    stamp = ev.get("lastTimestamp") or ev.get("eventTime") or ev.get("firstTimestamp") or ""
    return (stamp[:19], int(ev.get("metadata", {}).get("resourceVersion") or 0))


def _failed_create(job: Manifest, events: list[Manifest]) -> tuple[str, str] | None:
    """The newest FailedCreate event of the Job: PodSecurity or quota refused its pods."""
    name = job["metadata"]["name"]
    relevant = [
        e
        for e in events
        if e.get("reason") == "FailedCreate"
        and e.get("involvedObject", {}).get("kind") == "Job"
        and e.get("involvedObject", {}).get("name") == name
        and e.get("involvedObject", {}).get("uid") in (None, job["metadata"].get("uid"))
    ]
    if not relevant:
        return None
    ev = max(relevant, key=_event_time)
    message = ev.get("message") or ""
    if "PodSecurity" in message:
        return "PodSecurityViolation", message
    if "quota" in message.lower():
        return "QuotaExceeded", message
    return "FailedCreate", message


# ---------------------------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------------------------
def clean_stop(pod: Manifest) -> bool:
    """The pod ended on a disruption or a stop after a checkpoint (suspend, preemption): the
    run goes on, and the status already says all it has to say."""
    term = _terminated(pod) or {}
    return _disruption(pod) is not None or int(term.get("exitCode", -1)) == int(ExitCode.STOPPED)


def trainer_succeeded(pod: Manifest) -> bool:
    """The trainer exited 0 saying it succeeded: the run's work is done, whatever becomes of
    its Job."""
    term = _terminated(pod)
    if term is None or int(term.get("exitCode", -1)) != 0:
        return False
    summary = summary_of(pod)
    return summary is not None and summary.outcome == Outcome.SUCCEEDED


def alive(pod: Manifest) -> bool:
    return pod.get("status", {}).get("phase") not in ("Succeeded", "Failed")


def should_create_job(obs: Observed) -> bool:
    """Whether a (new) Job may be created now: there is none, the run has not ended, nothing
    blocks it, and no trainer of this run is still alive (one trainer at a time: a Job deleted
    by hand leaves its pod stopping, writing its checkpoint, for up to its grace period)."""
    return (
        obs.job is None
        and obs.spec_error is None
        and obs.old_status.get("phase") not in TERMINAL_PHASES
        and not obs.stop
        and obs.blocked is None
        and not any(alive(p) for p in obs.earlier_pods)
        and not any(trainer_succeeded(p) for p in obs.earlier_pods)
    )


def _failed_pods(job: Manifest) -> int:
    """Failed pods as the Job counts them, with those it has seen fail but not yet moved into
    ``status.failed``: its FailureTarget condition can come first, and the run is final then."""
    status = job.get("status") or {}
    uncounted = (status.get("uncountedTerminatedPods") or {}).get("failed") or []
    return int(status.get("failed") or 0) + len(uncounted)


def _success_reason(summary: TrainerSummary | None) -> str:
    """``Completed``, or how the trainer says it succeeded (``EarlyStopped``)."""
    if summary is not None and summary.outcome == Outcome.SUCCEEDED and summary.reason:
        return summary.reason
    return "Completed"


def _verdict(obs: Observed) -> _Verdict:
    old_phase = obs.old_status.get("phase")
    if obs.blocked:
        return _Verdict(Phase.PENDING, *obs.blocked)
    job = obs.job
    if job is None:
        done = newest_pod([p for p in obs.earlier_pods if trainer_succeeded(p)])
        if done is not None:
            summary = summary_of(done)
            message = (summary.message if summary else "") or "training finished"
            return _Verdict(Phase.SUCCEEDED, _success_reason(summary), message)
        stopping = [p for p in obs.earlier_pods if alive(p)]
        if stopping:
            return _Verdict(
                Phase.PENDING,
                "WaitingForPreviousTrainer",
                f"the Job was deleted before the run finished; its trainer (pod "
                f"{newest_pod(stopping)['metadata']['name']}) is still stopping, saving its "
                "checkpoint. A new Job starts once it has exited",
            )
        if obs.stop:
            return stopped(obs.earlier_pods)
        if obs.spec_error:
            return _Verdict(Phase.PENDING, "InvalidSpec", obs.spec_error)
        return _Verdict(Phase.PENDING, "CreatingJob", "creating the training Job")

    pods = obs.pods
    if not obs.pods_confirmed and pods_behind_job(job, pods):
        ended = "Complete" if _job_condition(job, "Complete") else "Failed"
        return _Verdict(
            Phase(old_phase) if old_phase else Phase.PENDING,
            "RecordingOutcome",
            f"the Job ended ({ended}) but its trainer's pod is not seen ended yet: the outcome "
            "is recorded once it is (the pod's termination message holds the trainer's result)",
        )
    gone = "; the trainer's pod was gone before its end was seen, so its result was not recorded"
    if _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet"):
        pod = newest_pod([p for p in leaders(pods) if _terminated(p)])
        summary = summary_of(pod) if pod else None
        message = (summary.message if summary and summary.message else "") or "training finished"
        if pod is None and obs.pods_confirmed:
            message += gone
        return _Verdict(Phase.SUCCEEDED, _success_reason(summary), message)

    failed = _job_condition(job, "Failed") or _job_condition(job, "FailureTarget")
    if failed:
        reason = failed.get("reason") or "Failed"
        message = failed.get("message") or ""
        failed_pods = [p for p in pods if p.get("status", {}).get("phase") == "Failed"]
        last = newest_pod(failed_pods)
        if reason == "PodFailurePolicy" and last is not None:
            return _Verdict(Phase.FAILED, *describe_failure(last))
        code = _exit_code_in(message) if reason == "PodFailurePolicy" else None
        if code is not None:  # the pod is gone: the Job's own record names the exit code
            return _Verdict(Phase.FAILED, describe_exit_code(code), message + gone)
        if reason == "BackoffLimitExceeded" and last is not None:
            why, detail = describe_failure(last)
            return _Verdict(
                Phase.FAILED,
                "BackoffLimitExceeded",
                f"{message or 'too many failed attempts'}; the last one: {why}: {detail}",
            )
        if reason == "DeadlineExceeded":
            message = message or "the fine-tune ran longer than spec.activeDeadlineSeconds"
        return _Verdict(Phase.FAILED, reason, message)

    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    # An ended pod kept by a finalizer is not stopping any more.
    terminating = [p for p in pods if p["metadata"].get("deletionTimestamp") and alive(p)]
    if job.get("spec", {}).get("suspend"):
        if obs.queue_name and not (obs.suspend or obs.stop):
            return queued(obs, stopping=bool(live or terminating))
        if obs.stop:
            if old_phase == Phase.SUCCEEDED:
                # Said once, when the trainer's summary was at hand (its pod may be gone now).
                return _Verdict(Phase.SUCCEEDED, "Stopped", obs.old_status.get("message") or "")
            if any(alive(p) for p in pods):
                return _Verdict(
                    Phase.RUNNING,
                    "Stopping",
                    "stopping (spec.stop): the trainer is saving a checkpoint; the run then "
                    "ends as Succeeded",
                )
            return stopped(pods)
        if live or terminating:
            return _Verdict(
                Phase.SUSPENDED,
                "Suspending",
                "the trainer is saving a checkpoint and stopping",
            )
        return _Verdict(
            Phase.SUSPENDED,
            "Suspended",
            "suspended; set spec.suspend to false to resume from the last checkpoint",
        )

    current = newest_pod(leaders(live)) or newest_pod(live)
    if current is not None:
        phase = current.get("status", {}).get("phase")
        trainer = _trainer_status(current) or {}
        if phase == "Running" and "running" in (trainer.get("state") or {}):
            return _Verdict(Phase.RUNNING, "TrainerRunning", f"pod {current['metadata']['name']}")
        term = _terminated(current)
        if term is not None and int(term.get("exitCode", 0)) == 0:
            return _Verdict(
                Phase.RUNNING, "TrainerFinished", "the trainer finished; the Job is completing"
            )
        if term is not None or phase == "Failed":
            return _between_attempts(current)
        if phase in (None, "Pending", "Running"):
            problem = _problem_of_pending(current, obs.events)
            if problem:
                return _Verdict(Phase.PENDING, *problem)
            return _Verdict(
                Phase.PENDING, "PodStarting", f"pod {current['metadata']['name']} is starting"
            )
    # No live pod: between attempts, or the Job cannot create its pods.
    problem = _failed_create(job, obs.events)
    if problem:
        return _Verdict(Phase.PENDING, *problem)
    finished = newest_pod([p for p in pods if p.get("status", {}).get("phase") == "Failed"])
    if finished is not None:
        return _between_attempts(finished)
    if old_phase == Phase.RUNNING:
        return _Verdict(Phase.PENDING, "WaitingForPod", "waiting for the next training pod")
    return _Verdict(Phase.PENDING, "WaitingForPod", "waiting for the Job to create its pod")


def stopped(pods: list[Manifest]) -> _Verdict:
    """The run ended by ``spec.stop``: where it got to, from its last trainer's summary."""
    last = newest_pod([p for p in leaders(pods) if _terminated(p)])
    summary = summary_of(last) if last is not None else None
    if summary is None or not summary.global_step:
        return _Verdict(Phase.SUCCEEDED, "Stopped", "stopped (spec.stop) before any step")
    planned = f" of {summary.total_steps}" if summary.total_steps else ""
    kept = (
        f"; its checkpoint {summary.last_checkpoint} is kept (the adapter in it loads with "
        "peft; resumeFrom it to train on)"
        if summary.last_checkpoint
        else ""
    )
    return _Verdict(
        Phase.SUCCEEDED,
        "Stopped",
        f"stopped (spec.stop) at step {summary.global_step}{planned}{kept}",
    )


def queued(obs: Observed, stopping: bool) -> _Verdict:
    """Waiting for Kueue, and why, in Kueue's words (its Workload's conditions). ``stopping``:
    a trainer of the run is still saving its checkpoint."""
    queue = obs.queue_name
    if not obs.kueue:
        return _Verdict(
            Phase.QUEUED,
            "WaitingForAdmission",
            f"waiting for Kueue to admit the Job in queue {queue} (the operator does not watch "
            "Kueue's Workloads: run it with --kueue, the chart's kueue.enabled, to see why)",
        )
    if obs.workload is None:
        return _Verdict(
            Phase.QUEUED,
            "WaitingForWorkload",
            f"waiting for Kueue to take the Job into queue {queue}: no Workload for it yet "
            "(is Kueue running, and does it manage Jobs in this namespace?)",
        )
    conditions = {
        c.get("type"): c for c in (obs.workload.get("status") or {}).get("conditions") or []
    }
    saving = "; the trainer is saving a checkpoint" if stopping else ""
    evicted = conditions.get("Evicted")
    if _is_true(evicted) and evicted.get("reason") == "Preempted":
        return _Verdict(
            Phase.QUEUED,
            "Preempted",
            f"{evicted.get('message') or 'preempted'}{saving}; it resumes from its last "
            f"checkpoint when queue {queue} has room again",
        )
    if _is_true(conditions.get("QuotaReserved")):
        return _Verdict(
            Phase.QUEUED,
            "Admitted",
            f"admitted in queue {queue}{saving}; Kueue is starting the Job",
        )
    reserved = conditions.get("QuotaReserved")
    if reserved is not None:
        reason = reserved.get("reason") or "Pending"
        return _Verdict(
            Phase.QUEUED,
            "WaitingForQuota" if reason == "Pending" else reason,
            f"queue {queue}: {reserved.get('message') or 'waiting for quota'}{saving}",
        )
    return _Verdict(
        Phase.QUEUED, "WaitingForAdmission", f"waiting for Kueue to admit the Job in queue {queue}"
    )


def _is_true(condition: Manifest | None) -> bool:
    return condition is not None and condition.get("status") == "True"


def _between_attempts(pod: Manifest) -> _Verdict:
    """The last attempt ended and the Job will start another. A disruption or a clean stop
    after a checkpoint keeps its own reason (not counted); any other end is AttemptFailed."""
    why, detail = describe_failure(pod)
    term = _terminated(pod) or {}
    clean_stop = int(term.get("exitCode", -1)) == int(ExitCode.STOPPED)
    if _disruption(pod) or clean_stop:
        return _Verdict(Phase.PENDING, why, f"{detail}; the next attempt resumes from it")
    return _Verdict(
        Phase.PENDING,
        "AttemptFailed",
        f"{why}: {detail}; the Job starts a new attempt after a back-off",
    )


def _spec_condition(obs: Observed, old: list[Manifest], now: str) -> Manifest | None:
    """SpecUnderstood=False while the spec has fields this operator ignores or cannot use."""
    previous = next((c for c in old if c.get("type") == SPEC_UNDERSTOOD), None)
    if obs.spec_error:
        reason = "InvalidSpec"
        message = f"this operator cannot use the spec ({obs.spec_error}); the run is observed "
        message += "but nothing is created or changed for it. Upgrade the operator to match the CRD"
    elif obs.ignored_fields:
        reason = "UnknownFields"
        message = (
            f"{', '.join(obs.ignored_fields)}: not known to this operator (the CRD is newer); "
            "ignored. Upgrade the operator to use them"
        )
    else:
        return None
    return condition(previous, SPEC_UNDERSTOOD, "False", reason, message, obs.generation, now)


def _conditions(
    old: list[Manifest], verdict: _Verdict, generation: int, now: str
) -> list[Manifest]:
    truth = {
        "Ready": verdict.phase == Phase.RUNNING,
        "Suspended": verdict.phase == Phase.SUSPENDED,
        "Complete": verdict.phase == Phase.SUCCEEDED,
        "Failed": verdict.phase == Phase.FAILED,
    }
    previous = {c.get("type"): c for c in old}
    out = []
    # Conditions of other writers (MetricsAvailable, from the metrics reads) hold while the
    # trainer runs; once it stops they would describe an endpoint that is gone.
    others = [c for c in old if c.get("type") == METRICS_AVAILABLE]
    if verdict.phase != Phase.RUNNING:
        others = []
    for type_ in CONDITION_TYPES:
        status = "True" if truth[type_] else "False"
        if truth[type_] or type_ == "Ready":
            reason, message = verdict.reason, verdict.message
        else:
            reason, message = f"Not{type_}", ""
        out.append(condition(previous.get(type_), type_, status, reason, message, generation, now))
    return out + others


def condition(
    previous: Manifest | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> Manifest:
    """A condition per the API conventions; its transition time moves only when ``status``
    changes from ``previous``."""
    transition = now
    if previous is not None and previous.get("status") == status:
        transition = previous.get("lastTransitionTime", now)
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": transition,
        "observedGeneration": generation,
    }


def _attempts(obs: Observed) -> int:
    old = int(obs.old_status.get("attempts") or 0)
    job_status = (obs.job or {}).get("status", {})
    counted = sum(int(job_status.get(k) or 0) for k in ("failed", "succeeded", "active"))
    lead = leaders(obs.pods)
    attempts = max(old, -(-counted // max(1, obs.nodes)), len(lead))
    old_pod = obs.old_status.get("podName")
    current = newest_pod(lead)
    gone = old_pod and old_pod not in {p["metadata"]["name"] for p in lead}
    if gone and current is not None:
        attempts = max(attempts, old + 1)  # the previous pod is gone: this one is a new attempt
    return attempts


def _final_progress(old: Manifest, summary: TrainerSummary, verdict: _Verdict) -> Manifest:
    """Progress as the trainer's summary has it when an attempt ended: the last metrics read
    may be a logging interval behind."""
    progress = dict(old)
    progress["step"] = summary.global_step
    if summary.total_steps:
        progress["totalSteps"] = summary.total_steps
        progress["percent"] = round(
            min(100.0, 100.0 * summary.global_step / summary.total_steps), 1
        )
    if summary.epoch is not None:
        progress["epoch"] = round(summary.epoch, 3)
    if verdict.phase == Phase.SUCCEEDED:
        progress["etaSeconds"] = 0
    return progress


def _final_metrics(old: Manifest, summary: TrainerSummary) -> Manifest:
    """Metrics when an attempt ended: the last live read's, with the trainer's summary filling
    what a run that ended between two reads never had, and its final evaluation winning."""
    metrics = dict(old)
    if summary.train_loss is not None:
        metrics.setdefault("loss", summary.train_loss)
    if summary.tokens_per_second is not None:
        metrics.setdefault("tokensPerSecond", summary.tokens_per_second)
    if summary.eval_loss is not None:
        metrics["evalLoss"] = summary.eval_loss
    if summary.eval_token_accuracy is not None:
        metrics["evalTokenAccuracy"] = summary.eval_token_accuracy
    if summary.eval_exact_match is not None:
        metrics["evalExactMatch"] = summary.eval_exact_match
    return metrics


def decide(obs: Observed, now: str) -> Decision:
    """The new status and, on a change of phase or reason, the Event to record."""
    old = obs.old_status
    old_phase = old.get("phase")
    verdict = _verdict(obs)
    spec_condition = _spec_condition(obs, old.get("conditions") or [], now)
    applied = _applied_condition(obs, old.get("conditions") or [], now)
    extra = [c for c in (spec_condition, applied) if c is not None]
    if old_phase in TERMINAL_PHASES and (
        verdict.phase.value != old_phase or obs.job is None or obs.blocked
    ):
        # A finished run stays finished, whatever happens to its Job afterwards; what it says
        # is still about the current generation (kstatus tools compare the two).
        kept = dict(old)
        kept["observedGeneration"] = obs.generation
        kept["conditions"] = [
            {**c, "observedGeneration": obs.generation}
            for c in old.get("conditions") or []
            if c.get("type") not in (SPEC_UNDERSTOOD, APPLIED)
        ] + extra
        return Decision(kept, None, _notices(old, spec_condition, applied, None))
    status: Manifest = {
        k: v
        for k, v in old.items()
        if k not in ("phase", "reason", "message", "conditions", "observedGeneration")
    }
    status.update(
        phase=verdict.phase.value,
        reason=verdict.reason,
        message=verdict.message[:32768],
        observedGeneration=obs.generation,
        conditions=_conditions(old.get("conditions") or [], verdict, obs.generation, now) + extra,
    )
    job = obs.job
    pods = obs.pods
    if job is None and verdict.phase == Phase.SUCCEEDED:
        pods = obs.earlier_pods  # the trainer of a deleted Job finished the run
        if not status.get("completionTime"):
            status["completionTime"] = now
    if job is not None:
        job_status = job.get("status", {})
        status["jobName"] = job["metadata"]["name"]
        if job_status.get("startTime") and not status.get("startTime"):
            status["startTime"] = job_status["startTime"]
        if verdict.phase in TERMINAL_PHASES and not status.get("completionTime"):
            status["completionTime"] = job_status.get("completionTime") or now
        status["attempts"] = _attempts(obs)
        status["failedAttempts"] = max(int(old.get("failedAttempts") or 0), _failed_pods(job))
    if job is not None or pods:
        current = newest_pod(leaders(pods))
        if current is not None:
            status["podName"] = current["metadata"]["name"]
        finished = newest_pod([p for p in leaders(pods) if _terminated(p)])
        summary = summary_of(finished) if finished is not None else None
        if summary is not None:
            status["result"] = summary.to_wire()
            status["progress"] = _final_progress(old.get("progress") or {}, summary, verdict)
            status["metrics"] = _final_metrics(old.get("metrics") or {}, summary)
            if summary.last_checkpoint_step is not None:
                checkpoint: Manifest = {"step": summary.last_checkpoint_step}
                if summary.last_checkpoint:
                    checkpoint["path"] = summary.last_checkpoint
                # The time: as the metrics reads saw it, else when the trainer ended (it saves
                # its last checkpoint just before).
                old_checkpoint = old.get("lastCheckpoint") or {}
                ended_at = (_terminated(finished) or {}).get("finishedAt")
                if old_checkpoint.get("step") == checkpoint["step"] and old_checkpoint.get("time"):
                    checkpoint["time"] = old_checkpoint["time"]
                elif ended_at:
                    checkpoint["time"] = ended_at
                status["lastCheckpoint"] = checkpoint

    transition = None
    if verdict.phase.value != old_phase or verdict.reason != old.get("reason"):
        refused = obs.refusal is not None and obs.blocked == obs.refusal
        warning = verdict.phase == Phase.FAILED or verdict.reason in WARNING_REASONS or refused
        transition = Transition(
            type="Warning" if warning else "Normal",
            reason=verdict.reason,
            message=f"{verdict.phase.value}: {verdict.message}"[:1024],
        )
    return Decision(status, transition, _notices(old, spec_condition, applied, transition))


def _applied_condition(obs: Observed, old: list[Manifest], now: str) -> Manifest | None:
    """Applied=False while the API server refuses a write (or the policy the Ingress)."""
    if obs.refusal is None:
        return None
    previous = next((c for c in old if c.get("type") == APPLIED), None)
    reason, message = obs.refusal
    return condition(previous, APPLIED, "False", reason, message, obs.generation, now)


def _notices(
    old: Manifest,
    spec_condition: Manifest | None,
    applied: Manifest | None,
    transition: Transition | None,
) -> list[Transition]:
    """A Warning when the spec starts (or changes how it is) not being understood, and when a
    write starts being refused (unless the phase's own event says it already)."""
    out = []
    before = {c.get("type"): c for c in old.get("conditions") or []}
    for cond in (spec_condition, applied):
        if cond is None or (before.get(cond["type"]) or {}).get("message") == cond["message"]:
            continue
        if transition is not None and cond["message"] in transition.message:
            continue
        out.append(Transition("Warning", cond["reason"], cond["message"][:1024]))
    return out
