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
from pathlib import Path

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
from operator_samples import finetune

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.e2e]

DATA = Path(__file__).resolve().parents[1] / "data" / "chat_small.jsonl"
STARTUP = 180  # seconds for a trainer process to import torch and load the model, on 2 busy cores


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from trainer.tiny import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("models"), "gemma3_text")


def on_runner(name: str, model_dir: Path, max_steps: int = 30, gpus: int = 1, **spec):
    """A GemmaFineTune that really trains on the runner node."""
    spec.setdefault("output", {"checkpointEverySteps": 5, "pvc": {"size": "1Gi"}})
    return finetune(
        name,
        model={"name": "tiny-gemma3", "path": str(model_dir)},
        dataset={"path": str(DATA), "format": "chat", "maxSeqLength": 64, "evalFraction": 0},
        training={
            "maxSteps": max_steps,
            "batchSize": 2,
            "gradientAccumulationSteps": 1,
            "loggingEverySteps": 5,
        },
        resources={
            "gpus": gpus,
            "nodeSelector": {"gft.dev/runner": "true"},
            "tolerations": [
                {"key": "gft.dev/runner", "operator": "Exists", "effect": "NoSchedule"}
            ],
        },
        terminationGracePeriodSeconds=60,
        **spec,
    )


def output_dir(c, namespace: str, claim: str) -> Path:
    """The host folder behind the output claim (the host-path provisioner's PV)."""

    def bound():
        pvc = c.kubectl_json("get", "pvc", claim, "-n", namespace)
        return pvc["spec"].get("volumeName")

    pv = c.kubectl_json("get", "pv", wait_for(f"{claim} bound", bound))
    return Path(pv["spec"]["hostPath"]["path"])


def checkpoint_steps(out: Path) -> list[int]:
    """Steps of the complete checkpoints on the output volume (a folder still being written,
    or cut short by a kill, is not one: the trainer would not resume from it)."""
    from gft_trainer.checkpoints import is_valid

    return sorted(
        int(p.name.split("-")[-1]) for p in out.glob("checkpoints/checkpoint-*") if is_valid(p)
    )


def trainer_pids(pod: str) -> list[int]:
    """Processes of this machine that run the trainer of ``pod`` (the runner sets HOSTNAME)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"HOSTNAME={pod}".encode() in environ and b"gft-train" in cmdline:
            pids.append(int(proc.name))
    return pids


def running_pod(c, namespace, name) -> str:
    status = wait_phase(c, namespace, name, "Running", "TrainerRunning", timeout=STARTUP)
    return status["podName"]


def logs(c, namespace, pod) -> str:
    return c.kubectl("logs", "-n", namespace, pod, "-c", "trainer").stdout


def resumed_step(c, namespace, pod) -> int:
    """The step of the checkpoint the trainer of ``pod`` resumed from (its log says)."""
    text = logs(c, namespace, pod)
    assert "resuming from " in text, text[-2000:]
    return int(text.split("resuming from ")[1].split()[0].rsplit("-", 1)[1])


def wait_for_checkpoint(out: Path, timeout=STARTUP) -> int:
    return wait_for(
        "a checkpoint on the output volume",
        lambda: (checkpoint_steps(out) or [0])[-1],
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------
def test_real_run_succeeds(running_operator, namespace, model_dir):
    c = running_operator.cluster
    apply(c, namespace, on_runner("real", model_dir))
    status = wait_phase(c, namespace, "real", "Succeeded", timeout=STARTUP + 60)
    assert status["completionTime"] and status["attempts"] == 1
    assert status["result"]["outcome"] == "Succeeded" and status["result"]["globalStep"] == 30
    assert status["lastCheckpoint"]["step"] == 30
    out = output_dir(c, namespace, "real-output")
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
    out = output_dir(c, namespace, "crash-output")
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
    out = output_dir(c, namespace, "evict-output")
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
    wait_for_checkpoint(output_dir(c, namespace, "preempted-output"))
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
    out = output_dir(c, namespace, "pause-output")
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
    out = output_dir(c, namespace, "bye-output")
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
