"""The status logic: observed Job, pods and events -> phase, conditions, attempts, result."""

from __future__ import annotations

import json
import re

from gft_api.contract import ExitCode, Outcome, TrainerSummary
from gft_operator.status import (
    COMPLETION_INDEX_LABEL,
    Observed,
    decide,
    job_ended_at,
    leaders,
    newest_pod,
    peers,
    pods_behind_job,
    should_create_job,
    unix_time,
)

NOW = "2026-01-01T00:10:00Z"


def job(*conditions, suspend=False, **status):
    return {
        "metadata": {"name": "demo", "uid": "job-uid"},
        "spec": {"suspend": suspend},
        "status": {
            "conditions": [
                {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": NOW}
                for t, r, m in conditions
            ],
            **status,
        },
    }


def pod(
    name,
    phase="Running",
    created="2026-01-01T00:00:00Z",
    trainer=None,
    conditions=(),
    deleting=False,
    init=None,
    reason=None,
    node="gft-runner",
):
    meta = {"name": name, "creationTimestamp": created}
    if deleting:
        meta["deletionTimestamp"] = NOW
    status = {"phase": phase, "conditions": list(conditions)}
    if trainer is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": trainer}]
    if init is not None:
        status["initContainerStatuses"] = init
    if reason:
        status["reason"] = reason
    return {"metadata": meta, "spec": {"nodeName": node} if node else {}, "status": status}


def observe(job_=None, pods=(), events=(), old=None, suspend=False, queue=None, conflict=None):
    return Observed(
        generation=3,
        suspend=suspend,
        queue_name=queue,
        old_status=old or {},
        job=job_,
        pods=list(pods),
        events=list(events),
        blocked=("JobConflict", conflict) if conflict else None,
    )


def summary_message(code, reason, message, step=0, outcome=Outcome.FAILED):
    return TrainerSummary(
        outcome=outcome,
        exit_code=code,
        reason=reason,
        message=message,
        global_step=step,
        last_checkpoint_step=step or None,
        last_checkpoint=f"/output/checkpoint-{step}" if step else None,
    ).to_termination_message()


def conditions(status):
    return {c["type"]: c for c in status["conditions"]}


def test_no_job_yet_is_pending():
    d = decide(observe(), NOW)
    assert d.status["phase"] == "Pending" and d.status["reason"] == "CreatingJob"
    assert d.transition is not None


def test_running_sets_ready_and_records_one_event():
    running = pod("demo-a", trainer={"running": {"startedAt": NOW}})
    d = decide(observe(job(active=1, startTime=NOW), [running]), NOW)
    s = d.status
    assert s["phase"] == "Running"
    assert s["startTime"] == NOW and s["jobName"] == "demo" and s["attempts"] == 1
    c = conditions(s)
    assert c["Ready"]["status"] == "True" and c["Ready"]["observedGeneration"] == 3
    assert c["Failed"]["status"] == "False"
    assert d.transition.type == "Normal"
    # the same observation again: no transition, conditions keep their transition time
    again = decide(observe(job(active=1, startTime=NOW), [running], old=s), "2026-01-01T01:00:00Z")
    assert again.transition is None
    assert conditions(again.status)["Ready"]["lastTransitionTime"] == NOW


def test_succeeded_keeps_result_and_completion_time():
    done = pod(
        "demo-a",
        phase="Succeeded",
        trainer={
            "terminated": {
                "exitCode": 0,
                "message": summary_message(
                    0, "Completed", "saved the adapter", step=20, outcome=Outcome.SUCCEEDED
                ),
            }
        },
    )
    j = job(("Complete", "", ""), succeeded=1, completionTime="2026-01-01T00:09:00Z")
    s = decide(observe(j, [done]), NOW).status
    assert s["phase"] == "Succeeded"
    assert s["completionTime"] == "2026-01-01T00:09:00Z"
    assert s["result"]["outcome"] == "Succeeded"
    assert s["lastCheckpoint"] == {"step": 20, "path": "/output/checkpoint-20"}
    assert conditions(s)["Complete"]["status"] == "True"
    # the Job is gone (TTL): the fine-tune stays Succeeded, no new transition
    after = decide(observe(None, [], old=s), "2026-01-02T00:00:00Z")
    assert after.status == s and after.transition is None


def test_early_stopped_run_succeeds_with_the_trainers_reason_and_best_step():
    message = TrainerSummary(
        outcome=Outcome.SUCCEEDED,
        exit_code=0,
        reason="EarlyStopped",
        message="stopped early at step 8 of 12: ...; best at step 4",
        global_step=8,
        total_steps=12,
        best_step=4,
        best_eval_loss=1.25,
        exported_step=4,
        eval_exact_match=0.5,
    ).to_termination_message()
    done = pod(
        "demo-a", phase="Succeeded", trainer={"terminated": {"exitCode": 0, "message": message}}
    )
    j = job(("Complete", "", ""), succeeded=1, completionTime="2026-01-01T00:09:00Z")
    s = decide(observe(j, [done]), NOW).status
    assert (s["phase"], s["reason"]) == ("Succeeded", "EarlyStopped")
    assert (s["result"]["bestStep"], s["result"]["exportedStep"]) == (4, 4)
    assert s["metrics"]["evalExactMatch"] == 0.5


def test_a_run_that_ended_between_two_metric_reads_still_shows_its_loss():
    """The LOSS column after Succeeded: status.metrics filled from the trainer's summary where
    the last live read left a gap; its final evaluation replaces a mid-run one."""
    message = TrainerSummary(
        outcome=Outcome.SUCCEEDED,
        exit_code=0,
        reason="Completed",
        global_step=30,
        train_loss=0.41,
        eval_loss=0.52,
        eval_token_accuracy=0.91,
        tokens_per_second=64.0,
    ).to_termination_message()
    done = pod(
        "demo-a", phase="Succeeded", trainer={"terminated": {"exitCode": 0, "message": message}}
    )
    j = job(("Complete", "", ""), succeeded=1)
    never_read = decide(observe(j, [done]), NOW).status
    assert never_read["metrics"] == {
        "loss": 0.41,
        "evalLoss": 0.52,
        "evalTokenAccuracy": 0.91,
        "tokensPerSecond": 64.0,
    }
    old = {"phase": "Running", "metrics": {"loss": 0.2, "evalLoss": 0.9, "gpuUtilization": 50.0}}
    read = decide(observe(j, [done], old=old), NOW).status
    assert read["metrics"]["loss"] == 0.2  # the last interval's loss, as read live
    assert read["metrics"]["evalLoss"] == 0.52 and read["metrics"]["gpuUtilization"] == 50.0


def test_non_retryable_exit_fails_with_the_trainers_message():
    msg = summary_message(
        ExitCode.CONFIG_ERROR, "InvalidConfig", "config.yaml: training.learningRate: must be > 0"
    )
    failed = pod(
        "demo-a",
        phase="Failed",
        trainer={"terminated": {"exitCode": int(ExitCode.CONFIG_ERROR), "message": msg}},
    )
    j = job(("Failed", "PodFailurePolicy", "Container trainer ... exit code 78"), failed=1)
    d = decide(observe(j, [failed]), NOW)
    assert d.status["phase"] == "Failed"
    assert d.status["reason"] == "InvalidConfig"
    assert "training.learningRate" in d.status["message"]
    assert d.transition.type == "Warning"
    assert d.status["completionTime"] == NOW


def test_non_retryable_exit_without_summary_uses_the_exit_code():
    failed = pod(
        "demo-a",
        phase="Failed",
        trainer={
            "terminated": {"exitCode": 66, "message": "Traceback ...\nOSError: no such model"}
        },
    )
    j = job(("FailureTarget", "PodFailurePolicy", ""), failed=1)
    s = decide(observe(j, [failed]), NOW).status
    assert s["phase"] == "Failed" and s["reason"] == "ModelNotFound"
    assert "no such model" in s["message"]


def test_backoff_limit_and_deadline():
    oom = pod(
        "demo-b",
        phase="Failed",
        created="2026-01-01T00:05:00Z",
        trainer={"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
    )
    older = pod("demo-a", phase="Failed", trainer={"terminated": {"exitCode": 1}})
    j = job(
        ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"), failed=2
    )
    s = decide(observe(j, [older, oom]), NOW).status
    assert s["reason"] == "BackoffLimitExceeded" and "OOMKilled" in s["message"]
    assert s["attempts"] == 2 and s["failedAttempts"] == 2
    j = job(("Failed", "DeadlineExceeded", "Job was active longer than specified deadline"))
    s = decide(observe(j, []), NOW).status
    assert (s["phase"], s["reason"]) == ("Failed", "DeadlineExceeded")


def test_failed_attempts_count_the_pods_the_job_has_not_counted_yet():
    """The Job controller records a failed pod in ``uncountedTerminatedPods`` first and moves it
    to ``failed`` later; its FailureTarget can come in between. The run is final from then
    on, so the count must include the uncounted pods (CI saw ``failedAttempts: 1`` of 2)."""
    older = pod("demo-a", phase="Failed", trainer={"terminated": {"exitCode": 1}})
    newer = pod(
        "demo-b",
        phase="Failed",
        created="2026-01-01T00:05:00Z",
        trainer={"terminated": {"exitCode": 1}},
    )
    j = job(
        ("FailureTarget", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
        failed=1,
        uncountedTerminatedPods={"failed": ["uid-b"]},
    )
    s = decide(observe(j, [older, newer]), NOW).status
    assert (s["phase"], s["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert s["attempts"] == 2 and s["failedAttempts"] == 2


def test_a_crash_then_a_new_attempt_counts_two_attempts():
    crashed = pod("demo-a", phase="Failed", trainer={"terminated": {"exitCode": 137}})
    between = decide(observe(job(failed=1), [crashed]), NOW)
    assert between.status["phase"] == "Pending"
    assert between.status["reason"] == "AttemptFailed"
    assert "signal 9" in between.status["message"]
    second = pod("demo-b", created="2026-01-01T00:05:00Z", trainer={"running": {}})
    s = decide(observe(job(failed=1, active=1), [crashed, second], old=between.status), NOW).status
    assert s["phase"] == "Running" and s["attempts"] == 2 and s["podName"] == "demo-b"


def test_an_evicted_pod_that_is_gone_still_counts_as_an_attempt_but_not_a_failure():
    first = pod("demo-a", trainer={"running": {}})
    s1 = decide(observe(job(active=1), [first]), NOW).status
    second = pod("demo-b", created="2026-01-01T00:05:00Z", trainer={"running": {}})
    s2 = decide(observe(job(active=1), [second], old=s1), NOW).status
    assert s2["attempts"] == 2 and s2["failedAttempts"] == 0


def test_disrupted_pod_is_reported_as_not_counted():
    evicted = pod(
        "demo-a",
        phase="Failed",
        trainer={"terminated": {"exitCode": 75}},
        conditions=[
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "EvictionByEvictionAPI",
                "message": "Eviction API",
            }
        ],
    )
    s = decide(observe(job(), [evicted]), NOW).status
    assert s["phase"] == "Pending" and s["reason"] == "EvictionByEvictionAPI"
    assert "not counted" in s["message"]


def test_suspend_and_queue():
    terminating = pod("demo-a", deleting=True, trainer={"running": {}})
    s = decide(
        observe(job(("Suspended", "JobSuspended", ""), suspend=True), [terminating], suspend=True),
        NOW,
    ).status
    assert (s["phase"], s["reason"]) == ("Suspended", "Suspending")
    s = decide(
        observe(job(("Suspended", "JobSuspended", ""), suspend=True), [], suspend=True, old=s), NOW
    ).status
    assert (s["phase"], s["reason"]) == ("Suspended", "Suspended")
    assert conditions(s)["Suspended"]["status"] == "True"
    assert conditions(s)["Ready"]["status"] == "False"
    q = decide(observe(job(suspend=True), [], queue="gpu"), NOW).status
    assert (q["phase"], q["reason"]) == ("Queued", "WaitingForAdmission")
    # resumed: Suspended goes False; the printer columns read phase, which says Running
    running = pod("demo-b", trainer={"running": {}})
    r = decide(observe(job(active=1), [running], old=s), NOW).status
    assert r["phase"] == "Running" and conditions(r)["Suspended"]["status"] == "False"


def test_stop_checkpoints_then_ends_the_run_as_succeeded_and_keeps_it_ended():
    """spec.stop: the trainer stops as for a suspend (its checkpoint first), then the run is
    over: Succeeded/Stopped with where it got to, no new Job, whatever happens to the pods."""
    stopping = pod("demo-a", deleting=True, trainer={"running": {}})
    suspended = job(("Suspended", "JobSuspended", ""), suspend=True, active=1)
    obs = observe(suspended, [stopping])
    obs.stop = True
    s = decide(obs, NOW).status
    assert (s["phase"], s["reason"]) == ("Running", "Stopping"), s
    ended = pod(
        "demo-a",
        phase="Failed",
        trainer={
            "terminated": {
                "exitCode": int(ExitCode.STOPPED),
                "message": TrainerSummary(
                    outcome=Outcome.STOPPED,
                    exit_code=int(ExitCode.STOPPED),
                    reason="StoppedAfterCheckpoint",
                    message="stopped by SIGTERM after a checkpoint",
                    global_step=12,
                    total_steps=40,
                    last_checkpoint="/output/runs/u/checkpoints/checkpoint-12",
                    last_checkpoint_step=12,
                ).to_termination_message(),
            }
        },
    )
    obs = observe(job(("Suspended", "JobSuspended", ""), suspend=True), [ended], old=s)
    obs.stop = True
    d = decide(obs, NOW)
    s = d.status
    assert (s["phase"], s["reason"]) == ("Succeeded", "Stopped"), s
    assert "at step 12 of 40" in s["message"] and "checkpoint-12" in s["message"]
    assert s["result"]["outcome"] == "Stopped" and s["completionTime"] == NOW
    assert s["lastCheckpoint"]["step"] == 12 and s["progress"]["percent"] == 30.0
    assert conditions(s)["Complete"]["status"] == "True" and d.transition.reason == "Stopped"
    assert not should_create_job(obs)
    # Its pods released and gone, the Job deleted (TTL): it stays as it was said.
    obs = observe(job(("Suspended", "JobSuspended", ""), suspend=True), [], old=s)
    obs.stop = True
    assert decide(obs, "2026-01-01T01:00:00Z").status == s
    obs = observe(None, [], old=s)
    obs.stop = True
    assert decide(obs, "2026-01-01T01:00:00Z").status == s and not should_create_job(obs)
    # Stopped before a Job was made: nothing is trained.
    fresh = observe()
    fresh.stop = True
    s = decide(fresh, NOW).status
    assert (s["phase"], s["reason"]) == ("Succeeded", "Stopped") and not should_create_job(fresh)
    # With a queue, a stop is not "waiting for admission": the run ends.
    queued_stop = observe(job(suspend=True), [], queue="gpu")
    queued_stop.stop = True
    assert decide(queued_stop, NOW).status["reason"] == "Stopped"


def workload(*conditions, active=True):
    """A Kueue Workload with conditions given as (type, status, reason, message)."""
    return {
        "metadata": {"name": "job-demo-1a2b3"},
        "spec": {"active": active},
        "status": {
            "conditions": [
                {"type": t, "status": st, "reason": r, "message": m} for t, st, r, m in conditions
            ]
        },
    }


def queued_status(wl, pods=(), kueue=True):
    obs = observe(job(suspend=True), pods, queue="gpus")
    obs.kueue, obs.workload = kueue, wl
    return decide(obs, NOW).status


def test_queued_says_why_in_kueues_words():
    s = queued_status(None, kueue=False)
    assert (s["phase"], s["reason"]) == ("Queued", "WaitingForAdmission")
    assert "--kueue" in s["message"]
    s = queued_status(None)
    assert (s["phase"], s["reason"]) == ("Queued", "WaitingForWorkload")
    insufficient = "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu"
    s = queued_status(workload(("QuotaReserved", "False", "Pending", insufficient)))
    assert (s["phase"], s["reason"]) == ("Queued", "WaitingForQuota")
    assert s["message"] == f"queue gpus: {insufficient}"
    missing = "LocalQueue gpus doesn't exist"
    s = queued_status(workload(("QuotaReserved", "False", "Inadmissible", missing)))
    assert (s["phase"], s["reason"]) == ("Queued", "Inadmissible") and missing in s["message"]
    s = queued_status(workload(("QuotaReserved", "True", "QuotaReserved", "")))
    assert (s["phase"], s["reason"]) == ("Queued", "Admitted")


def test_preempted_is_queued_again_and_says_the_trainer_is_saving():
    by = "Preempted to accommodate a workload (UID: 1) due to prioritization in the ClusterQueue"
    wl = workload(
        ("QuotaReserved", "False", "Pending", "waiting"),
        ("Evicted", "True", "Preempted", by),
    )
    saving = pod("demo-a", deleting=True, trainer={"running": {}})
    s = queued_status(wl, [saving])
    assert (s["phase"], s["reason"]) == ("Queued", "Preempted")
    assert s["message"].startswith(by) and "saving a checkpoint" in s["message"]
    s = queued_status(wl)
    assert "saving" not in s["message"] and "last checkpoint" in s["message"]


def test_pending_reasons_a_user_can_act_on():
    unsched = pod(
        "demo-a",
        phase="Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/5 nodes are available: 5 Insufficient nvidia.com/gpu.",
            }
        ],
    )
    s = decide(observe(job(active=1), [unsched]), NOW).status
    assert (s["phase"], s["reason"]) == ("Pending", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in s["message"]

    pvc = pod(
        "demo-a",
        phase="Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/5 nodes are available: "
                "pod has unbound immediate PersistentVolumeClaims.",
            }
        ],
    )
    assert decide(observe(job(active=1), [pvc]), NOW).status["reason"] == (
        "PersistentVolumeClaimNotBound"
    )

    secret = pod(
        "demo-a",
        phase="Pending",
        trainer={
            "waiting": {"reason": "CreateContainerConfigError", "message": 'secret "hf" not found'}
        },
    )
    s = decide(observe(job(active=1), [secret]), NOW).status
    assert s["reason"] == "SecretNotFound" and 'secret "hf"' in s["message"]

    image = pod(
        "demo-a",
        phase="Pending",
        trainer={"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}},
    )
    assert decide(observe(job(active=1), [image]), NOW).status["reason"] == "ImagePullFailed"

    mount = pod("demo-a", phase="Pending")
    ev = {
        "reason": "FailedMount",
        "involvedObject": {"kind": "Pod", "name": "demo-a"},
        "message": 'MountVolume.SetUp failed for volume "dataset-configmap" : '
        'configmap "records" not found',
    }
    assert decide(observe(job(active=1), [mount], [ev]), NOW).status["reason"] == (
        "ConfigMapNotFound"
    )


def test_events_from_before_the_pod_was_placed_do_not_hide_why_it_is_stuck():
    """The flaky test of issue 9: under load the output claim bound late, so the pod's first
    event was a FailedScheduling; once placed, its FailedMount (the missing ConfigMap) is what
    holds it, and the stale event must not win because it was listed first."""
    placed = pod("demo-a", phase="Pending")
    unbound = {
        "reason": "FailedScheduling",
        "involvedObject": {"kind": "Pod", "name": "demo-a"},
        "lastTimestamp": "2026-01-01T00:00:01Z",
        "message": "0/5 nodes are available: pod has unbound immediate PersistentVolumeClaims.",
    }
    mount = {
        "reason": "FailedMount",
        "involvedObject": {"kind": "Pod", "name": "demo-a"},
        "lastTimestamp": "2026-01-01T00:00:09Z",
        "message": 'MountVolume.SetUp failed: volume "dataset-configmap": configmap "records" '
        "not found",
    }
    older_mount = {**mount, "lastTimestamp": "2026-01-01T00:00:05Z", "message": "claim not bound"}
    s = decide(observe(job(active=1), [placed], [unbound, older_mount, mount]), NOW).status
    assert (s["reason"], 'configmap "records"' in s["message"]) == ("ConfigMapNotFound", True)
    # Before it is placed, the scheduler's word is the one that counts.
    waiting = pod("demo-a", phase="Pending", node=None)
    s = decide(observe(job(active=1), [waiting], [unbound, mount]), NOW).status
    assert s["reason"] == "Unschedulable"


def test_failed_create_surfaces_pod_security_and_quota():
    ev = {
        "reason": "FailedCreate",
        "type": "Warning",
        "involvedObject": {"kind": "Job", "name": "demo", "uid": "job-uid"},
        "lastTimestamp": NOW,
        "message": 'Error creating: pods "demo-x" is forbidden: violates PodSecurity '
        '"restricted:latest": runAsNonRoot != true',
    }
    s = decide(observe(job(), [], [ev]), NOW).status
    assert (s["phase"], s["reason"]) == ("Pending", "PodSecurityViolation")
    assert "runAsNonRoot" in s["message"]
    ev["message"] = 'Error creating: pods "demo-x" is forbidden: exceeded quota: gpu'
    assert decide(observe(job(), [], [ev]), NOW).status["reason"] == "QuotaExceeded"


def test_a_job_owned_by_someone_else_is_reported():
    s = decide(observe(job(), conflict="a Job named demo exists"), NOW).status
    assert s["reason"] == "JobConflict"


def test_a_finished_pod_before_the_job_completes_does_not_flap_to_pending():
    done = pod("demo-a", phase="Succeeded", trainer={"terminated": {"exitCode": 0}})
    s = decide(observe(job(active=0, succeeded=1), [done]), NOW).status
    assert (s["phase"], s["reason"]) == ("Running", "TrainerFinished")


def test_a_trainer_that_ended_in_a_still_running_pod_is_not_starting_again():
    ending = pod("demo-a", trainer={"terminated": {"exitCode": 0}})
    s = decide(observe(job(active=1), [ending]), NOW).status
    assert (s["phase"], s["reason"]) == ("Running", "TrainerFinished")
    crashed = pod("demo-a", trainer={"terminated": {"exitCode": 137}})
    s = decide(observe(job(active=1), [crashed]), NOW).status
    assert (s["phase"], s["reason"]) == ("Pending", "AttemptFailed")


def test_a_clean_stop_after_a_checkpoint_is_not_a_failed_attempt():
    msg = summary_message(
        75,
        "StoppedAfterCheckpoint",
        "stopped by SIGTERM after a checkpoint",
        step=40,
        outcome=Outcome.STOPPED,
    )
    stopped = pod(
        "demo-a", phase="Failed", trainer={"terminated": {"exitCode": 75, "message": msg}}
    )
    d = decide(observe(job(), [stopped]), NOW)
    assert (d.status["phase"], d.status["reason"]) == ("Pending", "StoppedAfterCheckpoint")
    assert d.transition.type == "Normal"
    assert d.status["lastCheckpoint"]["step"] == 40


def test_progress_ends_at_the_summarys_step_and_metrics_condition_ends_with_the_run():
    metrics_ok = {
        "type": "MetricsAvailable",
        "status": "True",
        "reason": "MetricsRead",
        "message": "",
        "lastTransitionTime": NOW,
    }
    running = pod("demo-a", trainer={"running": {"startedAt": NOW}})
    live = decide(observe(job(active=1, startTime=NOW), [running]), NOW).status
    live["conditions"].append(metrics_ok)
    live["progress"] = {"step": 18, "totalSteps": 20, "percent": 90.0, "etaSeconds": 7}
    # Another reconcile while it runs keeps the condition the metrics reads wrote.
    again = decide(observe(job(active=1, startTime=NOW), [running], old=live), NOW).status
    assert conditions(again)["MetricsAvailable"] == metrics_ok

    summary = TrainerSummary(
        outcome=Outcome.SUCCEEDED,
        exit_code=0,
        reason="Completed",
        global_step=20,
        total_steps=20,
        epoch=2.0,
    ).to_termination_message()
    done = pod(
        "demo-a",
        phase="Succeeded",
        trainer={"terminated": {"exitCode": 0, "message": summary}},
    )
    j = job(("Complete", "", ""), succeeded=1, completionTime=NOW)
    s = decide(observe(j, [done], old=again), NOW).status
    assert s["progress"] == {
        "step": 20,
        "totalSteps": 20,
        "percent": 100.0,
        "epoch": 2.0,
        "etaSeconds": 0,
    }
    assert "MetricsAvailable" not in conditions(s)


def test_tensorboard_is_kept_for_the_configured_time_after_the_run():
    from gft_operator.status import tensorboard_kept_until, trainer_started_at

    assert tensorboard_kept_until("2026-01-01T00:00:00Z", 60) == 1767225600 + 60
    assert tensorboard_kept_until("2026-01-01T00:00:00Z", 0) is None
    assert tensorboard_kept_until(None, 60) is None
    running = pod("demo-a", trainer={"running": {"startedAt": "2026-01-01T00:00:00Z"}})
    assert trainer_started_at(running) == 1767225600
    assert trainer_started_at(pod("demo-b", phase="Pending", trainer={"waiting": {}})) is None


def test_last_checkpoint_time_comes_from_the_reads_or_from_the_trainers_end():
    message = summary_message(75, "StoppedAfterCheckpoint", "stopped", step=12)
    ended = pod(
        "demo-a",
        phase="Failed",
        trainer={"terminated": {"exitCode": 75, "message": message, "finishedAt": NOW}},
    )
    j = job(failed=1)
    first = decide(observe(j, [ended]), NOW).status
    assert first["lastCheckpoint"]["time"] == NOW  # the trainer saved it just before it ended
    seen = {"step": 12, "time": "2026-01-01T00:09:30Z"}
    again = decide(observe(j, [ended], old={**first, "lastCheckpoint": seen}), NOW).status
    assert again["lastCheckpoint"]["time"] == "2026-01-01T00:09:30Z"  # as the reads saw it


# ---------------------------------------------------------------------------------------------
# Run safety (issue 9)
# ---------------------------------------------------------------------------------------------
def test_a_finished_run_stays_finished_whatever_its_job_does():
    done = pod(
        "demo-a",
        phase="Succeeded",
        trainer={
            "terminated": {
                "exitCode": 0,
                "message": summary_message(
                    0, "Completed", "trained 10 steps", step=10, outcome=Outcome.SUCCEEDED
                ),
            }
        },
    )
    s = decide(observe(job(("Complete", "", ""), succeeded=1), [done]), NOW).status
    assert s["phase"] == "Succeeded"
    for later in (
        observe(None, old=s),  # the Job is gone
        observe(job(active=1), [pod("demo-b")], old=s),  # a Job of that name is live again
        observe(job(), old=s, conflict="a Job named demo exists"),
    ):
        d = decide(later, "2026-01-02T00:00:00Z")
        assert d.status == s and d.transition is None
        assert not should_create_job(later)


def test_no_new_job_while_a_trainer_of_the_run_is_still_stopping():
    stopping = pod("demo-a", deleting=True, trainer={"running": {"startedAt": NOW}})
    obs = observe(None, old={"phase": "Running", "jobName": "demo"})
    obs.earlier_pods = [stopping]
    d = decide(obs, NOW)
    assert (d.status["phase"], d.status["reason"]) == ("Pending", "WaitingForPreviousTrainer")
    assert "demo-a" in d.status["message"] and not should_create_job(obs)
    stopped = pod(
        "demo-a",
        phase="Failed",
        deleting=True,
        trainer={
            "terminated": {
                "exitCode": 75,
                "message": summary_message(
                    75, "StoppedAfterCheckpoint", "stopped", 40, Outcome.STOPPED
                ),
            }
        },
    )
    obs.earlier_pods = [stopped]
    assert should_create_job(obs)
    assert decide(obs, NOW).status["reason"] == "CreatingJob"


def test_a_trainer_that_succeeded_ends_the_run_even_if_its_job_was_deleted():
    done = pod(
        "demo-a",
        phase="Succeeded",
        trainer={
            "terminated": {
                "exitCode": 0,
                "message": summary_message(
                    0, "Completed", "trained 20 steps", 20, Outcome.SUCCEEDED
                ),
            }
        },
    )
    obs = observe(None, old={"phase": "Running", "jobName": "demo"})
    obs.earlier_pods = [done]
    d = decide(obs, NOW)
    assert (d.status["phase"], d.status["reason"]) == ("Succeeded", "Completed")
    assert d.status["result"]["globalStep"] == 20 and d.status["completionTime"] == NOW
    assert not should_create_job(obs)


def test_fields_of_a_newer_crd_are_reported_not_fatal():
    running = pod("demo-a", trainer={"running": {"startedAt": NOW}})
    obs = observe(job(active=1), [running])
    obs.ignored_fields = ["spec.training.newKnob"]
    d = decide(obs, NOW)
    assert d.status["phase"] == "Running"
    understood = conditions(d.status)["SpecUnderstood"]
    assert (understood["status"], understood["reason"]) == ("False", "UnknownFields")
    assert "spec.training.newKnob" in understood["message"]
    assert [n.reason for n in d.notices] == ["UnknownFields"] and d.notices[0].type == "Warning"
    again = decide(observe(job(active=1), [running], old=d.status), NOW)  # upgraded operator
    assert "SpecUnderstood" not in conditions(again.status) and not again.notices
    obs.old_status, obs.ignored_fields = d.status, ["spec.training.newKnob"]
    assert not decide(obs, NOW).notices  # said once


def test_a_spec_this_operator_cannot_use_creates_nothing_and_fails_nothing():
    obs = observe(None)
    obs.spec_error = "training.maxSteps: must be at least 1"
    d = decide(obs, NOW)
    assert (d.status["phase"], d.status["reason"]) == ("Pending", "InvalidSpec")
    assert not should_create_job(obs)
    running = pod("demo-a", trainer={"running": {"startedAt": NOW}})
    obs = observe(job(active=1), [running])
    obs.spec_error = "training.maxSteps: must be at least 1"
    d = decide(obs, NOW)
    assert d.status["phase"] == "Running"
    assert conditions(d.status)["SpecUnderstood"]["reason"] == "InvalidSpec"


def test_a_job_that_ended_waits_for_its_pods_to_be_seen_ended():
    """The pods come from a watch of their own: one that lags the Job's must not freeze a
    half-seen outcome (a failure counted once of two)."""
    failed = job(("Failed", "BackoffLimitExceeded", "too many"), failed=2)
    first, second = pod("demo-1", phase="Failed"), pod("demo-2", phase="Running")
    assert pods_behind_job(failed, [first, second])
    assert not pods_behind_job(failed, [first, pod("demo-2", phase="Failed")])
    assert not pods_behind_job(job(), [second])  # not ended: nothing to wait for
    assert job_ended_at(failed) == unix_time(NOW) and job_ended_at(job()) is None


def indexed(name, index, created="2026-01-01T00:00:00Z", **kw):
    p = pod(name, created=created, **kw)
    p["metadata"]["labels"] = {COMPLETION_INDEX_LABEL: str(index)}
    return p


def test_pod_zero_speaks_for_a_multi_node_run_and_each_newest_peer_is_read():
    zero = indexed("mn-0-a", 0)
    lost = indexed("mn-1-a", 1, created="2026-01-01T00:00:00Z", phase="Failed")
    replacement = indexed("mn-1-b", 1, created="2026-01-01T00:05:00Z")
    two = indexed("mn-2-a", 2)
    pods = [replacement, two, lost, zero]
    # The replacement of pod 1 is the newest pod of all; pod 0 still speaks.
    assert newest_pod(leaders(pods)) is zero
    assert [p["metadata"]["name"] for p in peers(pods)] == ["mn-1-b", "mn-2-a"]
    one_pod = pod("single")
    assert leaders([one_pod]) == [one_pod] and peers([one_pod]) == []


# ---------------------------------------------------------------------------------------------
# Issue 25: never a half-seen outcome; nothing from the pod can poison the status
# ---------------------------------------------------------------------------------------------
FAIL_JOB_MESSAGE = (
    "Container trainer for pod ns/demo-abcde failed with exit code 78 matching FailJob rule "
    "at index 1"
)


def test_an_ended_job_whose_pod_is_not_seen_keeps_waiting_and_says_why():
    """Finding 7. Before: once 10 s had passed the outcome was decided from whatever pods had
    been seen (here none: Failed/PodFailurePolicy, the trainer's own reason lost for good)."""
    failed = job(("Failed", "PodFailurePolicy", FAIL_JOB_MESSAGE), failed=1)
    running = {"phase": "Running", "reason": "TrainerRunning", "podName": "demo-abcde"}
    d = decide(observe(failed, pods=[], old=running), NOW)
    assert d.status["phase"] == "Running", d.status
    assert d.status["reason"] == "RecordingOutcome"
    assert "demo-abcde" not in d.status["message"] or "not seen" in d.status["message"]
    assert "termination message" in d.status["message"]
    assert conditions(d.status)["Ready"]["reason"] == "RecordingOutcome"


def test_an_ended_job_whose_pods_are_gone_is_decided_from_the_jobs_own_record():
    """Finding 7: once a read of the API server confirms the pods are gone (deleted by hand),
    the Job's own record decides: its FailJob message names the trainer's exit code."""
    failed = job(("Failed", "PodFailurePolicy", FAIL_JOB_MESSAGE), failed=1)
    obs = observe(failed, pods=[], old={"phase": "Running"})
    obs.pods_confirmed = True
    d = decide(obs, NOW)
    assert d.status["phase"] == "Failed" and d.status["reason"] == "InvalidConfig", d.status
    assert "exit code 78" in d.status["message"] and "gone" in d.status["message"]
    done = job(("Complete", "CompletionsReached", ""), succeeded=1)
    obs = observe(done, pods=[], old={"phase": "Running"})
    obs.pods_confirmed = True
    d = decide(obs, NOW)
    assert d.status["phase"] == "Succeeded" and "result" not in d.status
    assert "not recorded" in d.status["message"]


def test_a_termination_message_cannot_poison_the_status():
    """Finding 8. Before: a reason outside the CRD's pattern went into the status as it was,
    and the API server refused every status write of the run (422); a NaN loss made the
    patch invalid JSON; an over-long message lost the whole result."""
    from gft_api.v1alpha1 import GemmaFineTuneStatus

    pattern = r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?"
    for text in (
        '{"outcome":"Failed","exitCode":1,"reason":"not a reason!","message":"boom"}',
        '{"outcome":"Failed","exitCode":1,"reason":"Diverged","message":"'
        + "x" * 3000
        + '","globalStep":-5,"trainLoss":NaN,"evalLoss":Infinity,"totalSteps":10}',
    ):
        trainer = {"terminated": {"exitCode": 1, "message": text}}
        bad = pod("demo-1", phase="Failed", trainer=trainer)
        failed = job(("Failed", "PodFailurePolicy", "exit code 1"), failed=1)
        d = decide(observe(failed, pods=[bad], old={"phase": "Running"}), NOW)
        reasons = [d.status["reason"], *(c["reason"] for c in d.status["conditions"])]
        assert all(re.fullmatch(pattern, r) for r in reasons), reasons
        result = d.status["result"]  # kept, cleaned
        assert not re.search(r"nan|inf", json.dumps(result), re.IGNORECASE), result
        assert re.fullmatch(pattern, result["reason"]) and result["globalStep"] >= 0
        GemmaFineTuneStatus.model_validate(d.status)  # what the CRD's schema holds it to


def test_a_finished_run_keeps_observing_its_generation():
    """Finding 9. Before: observedGeneration stopped at the finish, so a change afterwards
    (a TTL set, the Ingress changed) left kstatus tools reporting it in progress forever."""
    done = job(("Complete", "CompletionsReached", ""), succeeded=1)
    ended = pod("demo-1", phase="Succeeded", trainer={"terminated": {"exitCode": 0}})
    finished = decide(observe(done, pods=[ended]), NOW).status
    assert finished["phase"] == "Succeeded" and finished["observedGeneration"] == 3
    later = Observed(
        generation=4, suspend=False, queue_name=None, old_status=finished, job=None, pods=[]
    )
    d = decide(later, NOW)
    assert d.status["phase"] == "Succeeded"
    assert d.status["observedGeneration"] == 4
    assert all(c["observedGeneration"] == 4 for c in d.status["conditions"])


def test_the_dashboard_lights_every_reason_the_operator_warns_about():
    """Shape (issue 25): the dashboard kept its own list of trouble reasons and missed the
    operator's own (ImagePullFailed, AttemptFailed, QuotaExceeded, ...): a run that could not
    pull its image showed no warning light. Both now read gft_api.conventions."""
    from gft_api.conventions import WARNING_REASONS
    from gft_dashboard.hub import summarize

    for reason in sorted(WARNING_REASONS):
        row = summarize(
            {"metadata": {"name": "x"}, "status": {"phase": "Pending", "reason": reason}}
        )
        assert row["light"] == "warning", (reason, row["light"])
