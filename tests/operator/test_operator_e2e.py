# ruff: noqa: F811  (pytest fixtures imported from operator_process are parameters here)
"""The operator with a real trainer: pods on the runner node run ``gft-train`` (and the
TensorBoard sidecar) as real processes on this machine, training a tiny random Gemma on CPU.

Each test drives the run with kubectl and looks at what a user sees: the GemmaFineTune's status,
``kubectl logs``, and the files on the output volume.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import wait_for
from operator_process import (  # noqa: F401 (fixtures)
    apply,
    get_gft,
    installed,
    operator,
    running_operator,
    scratch,
    wait_phase,
    watch_job_events,
)
from runner_runs import (  # noqa: F401 (model_dir is a fixture)
    STARTUP,
    checkpoint_steps,
    logs,
    model_dir,
    on_runner,
    resumed_step,
    run_dir,
    running_pod,
    trainer_pids,
    wait_for_checkpoint,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.e2e]


# ---------------------------------------------------------------------------------------------
def test_real_run_succeeds(running_operator, namespace, model_dir):
    c = running_operator.cluster
    apply(c, namespace, on_runner("real", model_dir))
    status = wait_phase(c, namespace, "real", "Succeeded", timeout=STARTUP + 60)
    assert status["completionTime"] and status["attempts"] == 1
    assert status["result"]["outcome"] == "Succeeded" and status["result"]["globalStep"] == 30
    assert status["lastCheckpoint"]["step"] == 30
    out = run_dir(c, namespace, "real")
    assert json.loads((out / "summary.json").read_text())["outcome"] == "Succeeded"
    assert "step 30/30" in logs(c, namespace, status["podName"])


def test_missing_secret_is_reported(running_operator, namespace, model_dir):
    c = running_operator.cluster
    manifest = on_runner("nosecret", model_dir)
    manifest["spec"]["model"]["hfTokenSecretRef"] = {"name": "no-such-secret", "key": "token"}
    apply(c, namespace, manifest)
    status = wait_phase(c, namespace, "nosecret", "Pending", "SecretNotFound", timeout=60)
    assert "no-such-secret" in status["message"]


def test_bad_config_fails_at_once_with_the_trainers_message(running_operator, namespace, model_dir):
    c = running_operator.cluster
    manifest = on_runner("nomodel", model_dir)
    manifest["spec"]["model"]["path"] = "/nonexistent/model"
    apply(c, namespace, manifest)
    status = wait_phase(c, namespace, "nomodel", "Failed", timeout=STARTUP)
    assert status["reason"] == "ModelNotFound", status
    assert "/nonexistent/model" in status["message"]
    assert status["attempts"] == 1 and status["result"]["exitCode"] == 66


def test_sigkilled_trainer_is_retried_and_resumes(running_operator, namespace, model_dir):
    c = running_operator.cluster
    apply(c, namespace, on_runner("crash", model_dir, max_steps=300))
    first = running_pod(c, namespace, "crash")
    out = run_dir(c, namespace, "crash")
    step = wait_for_checkpoint(out)
    pids = wait_for("the trainer's process", lambda: trainer_pids(first))
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    status = wait_phase(c, namespace, "crash", "Succeeded", timeout=2 * STARTUP)
    assert status["attempts"] == 2 and status["failedAttempts"] == 1, status
    assert status["podName"] != first
    assert resumed_step(c, namespace, status["podName"]) >= step


def test_eviction_is_not_counted(running_operator, namespace, model_dir):
    c = running_operator.cluster
    apply(c, namespace, on_runner("evict", model_dir, max_steps=300))
    first = running_pod(c, namespace, "evict")
    out = run_dir(c, namespace, "evict")
    wait_for_checkpoint(out)
    eviction = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": first, "namespace": namespace},
    }
    c.kubectl(
        "create",
        "--raw",
        f"/api/v1/namespaces/{namespace}/pods/{first}/eviction",
        "-f",
        "-",
        input=json.dumps(eviction),
    )
    status = wait_phase(c, namespace, "evict", "Succeeded", timeout=2 * STARTUP)
    assert status["failedAttempts"] == 0, status
    assert status["attempts"] == 2 and status["podName"] != first
    assert resumed_step(c, namespace, status["podName"]) > 0


def test_preemption_is_not_counted(running_operator, namespace, model_dir):
    c = running_operator.cluster
    c.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": "gft-test-urgent"},
                "value": 1000000,
            }
        ),
    )
    apply(c, namespace, on_runner("preempted", model_dir, max_steps=300, gpus=4))
    first = running_pod(c, namespace, "preempted")
    wait_for_checkpoint(run_dir(c, namespace, "preempted"))
    urgent = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "urgent"},
        "spec": {
            "priorityClassName": "gft-test-urgent",
            "restartPolicy": "Never",
            "nodeSelector": {"gft.dev/runner": "true"},
            "tolerations": [{"key": "gft.dev/runner", "operator": "Exists"}],
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "urgent",
                    "image": "busybox",
                    "command": ["sleep", "2"],
                    "resources": {"limits": {"nvidia.com/gpu": "4"}},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    apply(c, namespace, urgent)
    status = wait_phase(c, namespace, "preempted", "Succeeded", timeout=2 * STARTUP)
    assert status["failedAttempts"] == 0, status
    assert status["attempts"] == 2 and status["podName"] != first


def test_suspend_checkpoints_and_resume_continues(running_operator, namespace, model_dir):
    c = running_operator.cluster
    apply(c, namespace, on_runner("pause", model_dir, max_steps=300))
    first = running_pod(c, namespace, "pause")
    out = run_dir(c, namespace, "pause")
    wait_for_checkpoint(out)
    c.kubectl(
        "patch",
        "gft",
        "pause",
        "-n",
        namespace,
        "--type",
        "merge",
        "-p",
        '{"spec":{"suspend":true}}',
    )
    wait_phase(c, namespace, "pause", "Suspended", "Suspended", timeout=120)
    saved = checkpoint_steps(out)[-1]
    assert not trainer_pids(first)
    c.kubectl(
        "patch",
        "gft",
        "pause",
        "-n",
        namespace,
        "--type",
        "merge",
        "-p",
        '{"spec":{"suspend":false}}',
    )
    status = wait_phase(c, namespace, "pause", "Succeeded", timeout=2 * STARTUP)
    assert resumed_step(c, namespace, status["podName"]) == saved
    assert status["failedAttempts"] == 0


def test_deadline_fails_the_run(running_operator, namespace, model_dir):
    c = running_operator.cluster
    apply(c, namespace, on_runner("late", model_dir, max_steps=100000, activeDeadlineSeconds=60))
    status = wait_phase(c, namespace, "late", "Failed", timeout=STARTUP)
    assert status["reason"] == "DeadlineExceeded", status


def test_delete_stops_gracefully_and_keeps_the_output(running_operator, namespace, model_dir):
    c = running_operator.cluster
    apply(c, namespace, on_runner("bye", model_dir, max_steps=100000))
    pod = running_pod(c, namespace, "bye")
    out = run_dir(c, namespace, "bye")
    wait_for_checkpoint(out)
    c.kubectl("delete", "gft", "bye", "-n", namespace)
    wait_for(
        "the pod to go",
        lambda: c.kubectl("get", "pod", pod, "-n", namespace, check=False).returncode != 0,
        timeout=120,
    )
    for kind, name in (("job", "bye"), ("configmap", "bye-config"), ("service", "bye")):
        wait_for(
            f"{kind} {name} gone",
            lambda k=kind, n=name: (
                c.kubectl("get", k, n, "-n", namespace, check=False).returncode != 0
            ),
        )
    assert c.kubectl("get", "pvc", "bye-output", "-n", namespace).returncode == 0
    summary = json.loads((out / "summary.json").read_text())
    # The trainer got SIGTERM, saved a checkpoint and wrote its summary before the pod went.
    assert summary["outcome"] == "Stopped" and summary["exitCode"] == 75, summary


def test_operator_killed_ten_times_mid_run(running_operator, namespace, model_dir):
    """SIGKILL the operator and start it again, 10 times while the trainer runs: one Job is
    created (counted from a watch), and the status carries on to Succeeded."""
    op = running_operator
    c = op.cluster
    watch = watch_job_events(c, namespace)
    try:
        apply(c, namespace, on_runner("steady", model_dir, max_steps=400))
        running_pod(c, namespace, "steady")
        for _ in range(10):
            op.kill(signal.SIGKILL)
            op.start()
            assert get_gft(c, namespace, "steady")["status"]["phase"] in ("Running", "Succeeded")
        status = wait_phase(c, namespace, "steady", "Succeeded", timeout=2 * STARTUP)
        assert status["attempts"] == 1 and status["result"]["globalStep"] == 400
    finally:
        watch.terminate()
        out, _ = watch.communicate(timeout=10)
    added = [line for line in out.splitlines() if line.startswith("ADDED ")]
    assert added == ["ADDED steady"], out
