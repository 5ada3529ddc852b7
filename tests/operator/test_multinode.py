# ruff: noqa: F811  (pytest fixtures imported from operator_process are parameters here)
"""A fine-tune across two pods (``resources.nodes: 2``): an Indexed Job on the runner node,
one CPU rank per pod talking gloo over the pods' own network namespaces, finding rank 0 by name
through the cluster DNS. One pod is SIGKILLed mid-run: both restart, resume from the last
checkpoint and finish with the losses of a one-pod run of the same two ranks.

Every pod serves its own GPUs' readings (a stand-in NVML, ``fake_nvml``, gives each pod a GPU
that says which pod it is) and the status averages them; the live status keeps following pod 0
after pod 1 is replaced.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import requests
from conftest import wait_for
from dashboard.client import start_dashboard
from operator_process import (  # noqa: F401 (fixtures)
    apply,
    get_gft,
    installed,
    operator,
    wait_phase,
)
from runner_runs import (  # noqa: F401 (model_dir is a fixture)
    STARTUP,
    checkpoint_steps,
    logged_losses,
    logs,
    model_dir,
    on_runner,
    run_dir,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

STEPS = 600
FAKE_NVML = Path(__file__).resolve().parent / "fake_nvml"
GIB = 2**30
SHARED = {"checkpointEverySteps": 25, "pvc": {"size": "1Gi", "accessMode": "ReadWriteMany"}}


def processes_of(hostname: str) -> list[int]:
    """This machine's processes of the pod with that hostname (the runner sets HOSTNAME)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        trainer = b"gft-train" in cmdline or b"gft_trainer" in cmdline  # launcher, ranks
        if f"HOSTNAME={hostname}".encode() in environ and trainer:
            pids.append(int(proc.name))
    return pids


def pods_of(c, namespace: str, name: str) -> list[dict]:
    return c.kubectl_json("get", "pods", "-n", namespace, "-l", f"job-name={name}")["items"]


def index_of(pod: dict) -> str:
    return pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]


def test_two_pods_train_lose_one_restart_together_and_match_one_pod(
    operator, namespace, model_dir, tmp_path
):
    c = operator.cluster
    two = on_runner("two", model_dir, max_steps=STEPS, output=SHARED)
    two["spec"]["resources"]["nodes"] = 2
    two["spec"]["env"].append({"name": "PYTHONPATH", "value": str(FAKE_NVML)})
    # The same two ranks in one pod: the reference curve.
    one = on_runner(
        "one", model_dir, max_steps=STEPS, output=SHARED, env=[{"name": "GFT_NPROC", "value": "2"}]
    )
    apply(c, namespace, two)
    apply(c, namespace, one)
    out = run_dir(c, namespace, "two")

    def both_running():
        pods = pods_of(c, namespace, "two")
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        return len(running) == 2 and running

    pods = wait_for("both pods of the run Running", both_running, timeout=STARTUP)
    assert sorted(index_of(p) for p in pods) == ["0", "1"]
    first = wait_for("a checkpoint", lambda: (checkpoint_steps(out) or [0])[-1], timeout=STARTUP)
    victim = next(p for p in pods if index_of(p) == "1")
    survivor = next(p for p in pods if index_of(p) == "0")

    # Each pod's GPU (pod 0: 20 %, 1 GiB; pod 1: 60 %, 3 GiB), averaged in the status.
    def gpus_averaged():
        metrics = get_gft(c, namespace, "two").get("status", {}).get("metrics", {})
        return metrics.get("gpuUtilization") == 0.4 and metrics.get("gpuMemoryBytes") == 2 * GIB

    wait_for("the status averaging both pods' GPUs", gpus_averaged, timeout=STARTUP,
             on_timeout=lambda: get_gft(c, namespace, "two").get("status"))  # fmt: skip
    proxy = f"/api/v1/namespaces/{namespace}/pods/{victim['metadata']['name']}:9090/proxy/metrics"
    pod1 = c.kubectl("get", "--raw", proxy).stdout
    assert re.search(r'^gft_gpu_utilization_ratio\{gpu="0",run="[^"]+"\} 0\.6$', pod1, re.M), pod1
    # The dashboard shows each pod's GPU.
    dashboard, base = start_dashboard(c, tmp_path / "dashboard.log", "--auth", "kubeconfig")
    try:
        shown = requests.get(f"{base}/api/finetunes/{namespace}/two/gpus", timeout=30).json()
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=10)
    per_pod = {(g["index"], g["gpu"]): g["utilization"] for g in shown["gpus"]}
    assert per_pod == {("0", "0"): 0.2, ("1", "0"): 0.6} and shown["pods"] == 2, shown

    at_kill = get_gft(c, namespace, "two")["status"]["progress"]["step"]
    pids = processes_of(victim["spec"]["hostname"])
    assert pids, "no trainer process of pod 1 found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)

    def replaced_and_live():
        """Pod 1 replaced, and the live status past the step of the kill while still Running
        (the status must keep following pod 0, not the newer pod 1)."""
        gone = victim["metadata"]["uid"]
        new = [p for p in pods_of(c, namespace, "two")
               if index_of(p) == "1" and p["metadata"]["uid"] != gone]  # fmt: skip
        st = get_gft(c, namespace, "two")["status"]
        assert st.get("phase") == "Running", f"the run ended before its live status moved on: {st}"
        return new and st.get("progress", {}).get("step", 0) > at_kill + 25 and st

    wait_for("live status after pod 1 was replaced", replaced_and_live, timeout=STARTUP + 300)

    status = wait_phase(c, namespace, "two", "Succeeded", timeout=STARTUP + 600)
    assert status["podName"] == survivor["metadata"]["name"]  # pod 0 lived on; its ranks restarted
    assert status["failedAttempts"] == 1, status  # the lost pod, not the whole group twice
    log0 = logs(c, namespace, survivor["metadata"]["name"])
    assert "starting them again" in log0, log0[-3000:]
    assert "resuming from " in log0.split("starting them again", 1)[1], log0[-3000:]
    resumed = int(log0.split("starting them again", 1)[1].split("resuming from ")[1].split()[0]
                  .rsplit("-", 1)[1])  # fmt: skip
    assert resumed >= first
    assert status["progress"]["step"] == STEPS

    reference = wait_phase(c, namespace, "one", "Succeeded", timeout=STARTUP + 600)
    assert reference["progress"]["step"] == STEPS
    curve_two, curve_one = logged_losses(out), logged_losses(run_dir(c, namespace, "one"))
    after = [step for step in curve_one if step > resumed and step in curve_two]
    assert after, (curve_two, curve_one)
    worst = max(abs(curve_two[s] - curve_one[s]) / abs(curve_one[s]) for s in after)
    last = after[-1]
    print(
        f"resumed at step {resumed}; loss at step {last}: two pods {curve_two[last]:.4f}, "
        f"one pod {curve_one[last]:.4f}; largest relative gap after the resume {worst:.2e}"
    )
    assert worst <= 0.02, {s: (curve_two[s], curve_one[s]) for s in after}
