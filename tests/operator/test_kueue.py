# ruff: noqa: F811  (pytest fixtures imported from operator_process are parameters here)
"""Fine-tunes in Kueue queues, against the real Kueue (built from the Go module proxy, with its
webhooks, on the proving ground): admission by quota, the reason a run waits, preemption by a
higher-priority run with the preempted trainer resuming from its checkpoint, suspend through
the Workload's ``spec.active``, and quota given back on delete.

KWOK GPU nodes stand in where the trainer does not matter (their pods run until deleted with
``gft.dev/kwok-keep-running``); the preempted run is a real trainer on the runner node.
"""

from __future__ import annotations

import json
import signal

import pytest
from conftest import wait_for
from operator_process import (  # noqa: F401 (fixtures)
    apply,
    get_gft,
    installed,
    start_operator,
    wait_phase,
)
from operator_samples import finetune
from runner_runs import (  # noqa: F401 (model_dir is a fixture)
    STARTUP,
    checkpoint_steps,
    model_dir,
    on_runner,
    resumed_step,
    run_dir,
    running_pod,
    wait_for_checkpoint,
)

from devcluster import kueue

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

QUEUE = "gpus"
KEEP_RUNNING = {"gft.dev/kwok-keep-running": "1"}


@pytest.fixture(scope="module")
def with_kueue(installed):
    kueue.install(installed, say=lambda msg: print(f"[kueue] {msg}"))
    installed.kubectl("apply", "-f", "-", input=json.dumps(_flavor()))
    for name, value in (("gft-test-low", 100), ("gft-test-high", 10_000)):
        installed.kubectl("apply", "-f", "-", input=json.dumps(_priority(name, value)))
    return installed


@pytest.fixture(scope="module")
def operator(with_kueue, tmp_path_factory):
    """The operator watching Kueue's Workloads (the chart's kueue.enabled)."""
    op = start_operator(with_kueue, tmp_path_factory, "--kueue")
    yield op
    op.kill(signal.SIGTERM)


@pytest.fixture
def queue(operator, namespace):
    """A ClusterQueue of one GPU for this test's namespace alone, and its LocalQueue ``gpus``;
    the ClusterQueue is deleted afterwards (it is cluster-scoped)."""
    c = operator.cluster
    cq = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ClusterQueue",
        "metadata": {"name": namespace},
        "spec": {
            "namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": namespace},
            },
            "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [
                {
                    # Everything the training pod requests must be covered.
                    "coveredResources": ["cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"],
                    "flavors": [
                        {
                            "name": "gft-test-any",
                            "resources": [
                                {"name": "cpu", "nominalQuota": "64"},
                                {"name": "memory", "nominalQuota": "512Gi"},
                                {"name": "ephemeral-storage", "nominalQuota": "1Ti"},
                                {"name": "nvidia.com/gpu", "nominalQuota": "1"},
                            ],
                        }
                    ],
                }
            ],
        },
    }
    lq = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "LocalQueue",
        "metadata": {"name": QUEUE, "namespace": namespace},
        "spec": {"clusterQueue": namespace},
    }
    c.kubectl("apply", "-f", "-", input=json.dumps(cq))
    c.kubectl("apply", "-f", "-", input=json.dumps(lq))
    yield namespace
    c.kubectl("delete", "clusterqueue", namespace, "--wait=false", check=False)


def _flavor() -> dict:
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ResourceFlavor",
        "metadata": {"name": "gft-test-any"},
    }


def _priority(name: str, value: int) -> dict:
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "WorkloadPriorityClass",
        "metadata": {"name": name},
        "value": value,
    }


def on_kwok(name: str, **spec) -> dict:
    spec.setdefault("resources", {"gpus": 1, "nodeSelector": {"type": "kwok"}})
    spec.setdefault("podAnnotations", KEEP_RUNNING)
    return finetune(name, queueName=QUEUE, **spec)


def workload_of(c, namespace: str, job: str) -> dict | None:
    uid = c.kubectl_json("get", "job", job, "-n", namespace)["metadata"]["uid"]
    items = c.kubectl_json(
        "get", "workloads", "-n", namespace, "-l", f"kueue.x-k8s.io/job-uid={uid}"
    )["items"]
    return items[0] if items else None


def suspend_writers(c, namespace: str, job: str) -> set[str]:
    """Field managers that have written the Job's spec.suspend."""
    managed = c.kubectl_json("get", "job", job, "-n", namespace, "--show-managed-fields")
    return {
        entry["manager"]
        for entry in managed["metadata"].get("managedFields") or []
        if "f:suspend" in ((entry.get("fieldsV1") or {}).get("f:spec") or {})
    }


def test_two_fine_tunes_share_one_gpu_of_quota(operator, queue):
    """The second waits, Queued with Kueue's reason, until the first is deleted and its quota
    comes back."""
    c, ns = operator.cluster, queue
    apply(c, ns, on_kwok("first"))
    wait_phase(c, ns, "first", "Running", timeout=90)
    apply(c, ns, on_kwok("second"))
    status = wait_phase(c, ns, "second", "Queued", "WaitingForQuota", timeout=60)
    assert "nvidia.com/gpu" in status["message"], status["message"]
    assert c.kubectl_json("get", "job", "second", "-n", ns)["spec"]["suspend"] is True
    assert not c.kubectl_json("get", "pods", "-n", ns, "-l", "job-name=second")["items"]
    row = c.kubectl("get", "gft", "second", "-n", ns).stdout
    assert "Queued" in row, row

    c.kubectl("delete", "gft", "first", "-n", ns, "--wait=false")
    wait_phase(c, ns, "second", "Running", timeout=90)
    assert workload_of(c, ns, "second")["status"]["admission"]["clusterQueue"] == ns


def test_suspend_goes_through_the_workload_never_the_job(operator, queue):
    c, ns = operator.cluster, queue
    apply(c, ns, on_kwok("paused"))
    wait_phase(c, ns, "paused", "Running", timeout=90)

    def patch(suspend: bool) -> None:
        c.kubectl("patch", "gft", "paused", "-n", ns, "--type", "merge",
                  "-p", json.dumps({"spec": {"suspend": suspend}}))  # fmt: skip

    patch(True)
    wait_phase(c, ns, "paused", "Suspended", "Suspended", timeout=90)
    assert workload_of(c, ns, "paused")["spec"]["active"] is False
    assert c.kubectl_json("get", "job", "paused", "-n", ns)["spec"]["suspend"] is True
    patch(False)
    wait_phase(c, ns, "paused", "Running", timeout=90)
    assert workload_of(c, ns, "paused")["spec"]["active"] is True
    # Kueue alone suspended and started the Job: the only owner of its spec.suspend (a write
    # of the operator's, OpenAPI-Generator, would make it an owner too).
    assert suspend_writers(c, ns, "paused") == {"kueue"}


def test_a_multi_node_run_is_admitted_whole_or_not_at_all(operator, queue):
    """Two pods of one GPU each in a queue of one GPU: Kueue admits the Job as one workload,
    so neither pod starts; with quota for both, both start."""
    c, ns = operator.cluster, queue
    spec = on_kwok("pair", output={"pvc": {"size": "1Gi", "accessMode": "ReadWriteMany"}})
    spec["spec"]["resources"]["nodes"] = 2
    apply(c, ns, spec)
    status = wait_phase(c, ns, "pair", "Queued", "WaitingForQuota", timeout=60)
    assert "nvidia.com/gpu" in status["message"], status["message"]
    assert not c.kubectl_json("get", "pods", "-n", ns, "-l", "job-name=pair")["items"]
    c.kubectl("patch", "clusterqueue", ns, "--type", "json", "-p", json.dumps([{
        "op": "replace",
        "path": "/spec/resourceGroups/0/flavors/0/resources/3/nominalQuota",
        "value": "2",
    }]))  # fmt: skip
    wait_phase(c, ns, "pair", "Running", timeout=90)
    pods = c.kubectl_json("get", "pods", "-n", ns, "-l", "job-name=pair")["items"]
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]


def test_a_missing_local_queue_is_named_in_the_status(operator, namespace):
    c = operator.cluster
    kwok = {"gpus": 1, "nodeSelector": {"type": "kwok"}}
    apply(c, namespace, finetune("lost", queueName="no-such-queue", resources=kwok))
    status = wait_phase(c, namespace, "lost", "Queued", "Inadmissible", timeout=60)
    assert "no-such-queue" in status["message"], status["message"]


def test_priority_preempts_and_the_preempted_run_resumes_from_its_checkpoint(
    operator, queue, model_dir
):
    """A low-priority run trains on the runner node; a high-priority one takes the GPU. Kueue
    suspends the low one (the trainer saves a checkpoint on SIGTERM), which waits Queued/
    Preempted, and resumes from that checkpoint once the high one is gone."""
    c, ns = operator.cluster, queue
    low = on_runner("low", model_dir, max_steps=2000, queueName=QUEUE,
                    queuePriorityClass="gft-test-low",
                    output={"checkpointEverySteps": 20, "pvc": {"size": "1Gi"}})  # fmt: skip
    apply(c, ns, low)
    first_pod = running_pod(c, ns, "low")
    out = run_dir(c, ns, "low")
    wait_for_checkpoint(out)

    apply(c, ns, on_kwok("high", queuePriorityClass="gft-test-high"))
    status = wait_phase(c, ns, "low", "Queued", "Preempted", timeout=90)
    assert "preempt" in status["message"].lower(), status["message"]
    wait_phase(c, ns, "high", "Running", timeout=120)
    # The trainer stopped after saving where it was.
    wait_for(
        "the preempted trainer to be gone",
        lambda: not c.kubectl_json("get", "pods", "-n", ns, "-l", "job-name=low")["items"],
        timeout=120,
    )
    saved = checkpoint_steps(out)[-1]
    assert get_gft(c, ns, "low")["status"]["phase"] == "Queued"

    c.kubectl("delete", "gft", "high", "-n", ns, "--wait=false")
    status = wait_phase(c, ns, "low", "Succeeded", timeout=STARTUP + 300)
    assert status["podName"] != first_pod
    assert resumed_step(c, ns, status["podName"]) == saved
    assert status.get("failedAttempts", 0) == 0, status
    assert status["progress"]["step"] == 2000, status["progress"]
