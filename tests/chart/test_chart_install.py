"""The chart installed on the proving ground the way users install it: ``helm install``, the
operator running in the cluster (two replicas, on the runner node, under its own service account
and the chart's RBAC), ``helm test``, fine-tunes run by it, leader failover, ``helm upgrade``
with a CRD change while a run is live, and ``helm uninstall`` leaving only the CRD, the
fine-tunes and their retained claims.

The RBAC is checked against what the operator really did: every request its service account
made during a full lifecycle (from the API server's audit log) against every verb granted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import wait_for

from chart.render import CHART, helm

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

RELEASE = "gft"
NAMESPACE = "gft-system"
SERVICE_ACCOUNT = f"system:serviceaccount:{NAMESPACE}:gft-operator"
ON_RUNNER = [
    "--set-string",
    "nodeSelector.gft\\.dev/runner=true",
    "--set-string",
    "trainer.tensorBoardNodeSelector.gft\\.dev/runner=true",
    "--set",
    "tolerations[0].key=gft.dev/runner",
    "--set",
    "tolerations[0].operator=Exists",
    "--set",
    "tolerations[0].effect=NoSchedule",
    # Short intervals so that the tests see things happen.
    "--set",
    "metrics.intervalSeconds=2",
    "--set",
    "leaderElection.leaseDurationSeconds=10",
    "--set",
    "networkPolicy.allowFromNamespaces={ingress-nginx}",
]


def run_helm(c, *args: str, check: bool = True, timeout: float = 300):
    result = subprocess.run(
        [helm(), *args], capture_output=True, text=True, env=c.env, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}:\n{result.stdout}\n{result.stderr}")
    return result


def operator_pods(c) -> list[dict]:
    return c.kubectl_json(
        "get",
        "pods",
        "-n",
        NAMESPACE,
        "-l",
        "app.kubernetes.io/name=gemma-finetune-operator,app.kubernetes.io/component=operator",
    )["items"]


def lease_holder(c) -> str:
    got = c.kubectl("get", "lease", "gft-operator", "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(got.stdout)["spec"].get("holderIdentity", "") if got.returncode == 0 else ""


def operator_pids(pod: str) -> list[int]:
    """This machine's processes of the operator in ``pod`` (the runner sets HOSTNAME)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"HOSTNAME={pod}".encode() in environ and b"gft-operator" in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def released(cluster):
    """The chart installed in the cluster; uninstalled (and checked clean) at the end."""
    c = cluster
    # --take-ownership: the suite's other modules may have applied manifests/ by hand before.
    run_helm(
        c,
        "install",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--create-namespace",
        "--take-ownership",
        "--wait",
        "--timeout",
        "4m",
        *ON_RUNNER,
    )
    wait_for("a leader", lambda: lease_holder(c), timeout=60)
    yield c
    run_helm(c, "uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout", "3m", check=False)


def test_helm_test_finds_the_crd_established_and_one_leader(released):
    result = run_helm(released, "test", RELEASE, "-n", NAMESPACE, "--logs", "--timeout", "3m")
    phases = re.findall(r"^Phase:\s+(\w+)", result.stdout, re.MULTILINE)
    assert phases and set(phases) == {"Succeeded"}, result.stdout
    assert "CRD gemmafinetunes.finetune.gemma.dev: Established" in result.stdout
    assert "ready: leader" in result.stdout and "ready: standby" in result.stdout


@pytest.mark.e2e
def test_the_operator_in_the_cluster_runs_a_fine_tune(released, namespace):
    from operator_process import apply, wait_phase
    from runner_runs import STARTUP, on_runner

    c = released
    model = _model(c)
    manifest = on_runner("inside", model, max_steps=120)
    # Long enough (about 12 s of training) for several reads of its metrics, 2 s apart.
    manifest["spec"]["training"].update(batchSize=4, gradientAccumulationSteps=8)
    apply(c, namespace, manifest)
    status = wait_phase(c, namespace, "inside", "Succeeded", timeout=STARTUP + 60)
    assert status["result"]["globalStep"] == 120
    # The live status came from the trainer's /metrics at its pod IP (metrics.access=pod-ip).
    assert status["progress"]["updatedAt"] and status["metrics"]["loss"] > 0
    netpol = c.kubectl_json("get", "networkpolicy", "inside", "-n", namespace)
    sources = netpol["spec"]["ingress"][0]["from"]
    assert sources[0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": NAMESPACE
    }


_MODEL: list[Path] = []


def _model(c) -> Path:
    """A tiny Gemma 3 the runner's trainers can read (outside /tmp), made once per module."""
    if not _MODEL:
        import tempfile

        from trainer.tiny import make_model_dir

        root = Path(tempfile.mkdtemp(prefix="gft-chart-models-", dir="/var/tmp"))
        _MODEL.append(make_model_dir(root, "gemma3_text"))
    return _MODEL[0]


@pytest.mark.e2e
def test_a_standby_takes_over_when_the_leader_is_killed_mid_run(released, namespace):
    """SIGKILL the leading replica while a real trainer runs: the standby takes the Lease
    within the lease duration plus one renewal, no second Job is created, and the status never
    goes back."""
    from operator_process import apply, get_gft, wait_phase
    from runner_runs import STARTUP, on_runner, running_pod

    c = released
    apply(c, namespace, on_runner("failover", _model(c), max_steps=500))
    running_pod(c, namespace, "failover")
    wait_for(
        "live progress",
        lambda: (get_gft(c, namespace, "failover").get("status") or {}).get("progress"),
        timeout=60,
    )
    steps: list[int] = []
    sampling = threading.Event()

    def sample():
        while not sampling.wait(0.5):
            st = (get_gft(c, namespace, "failover").get("status") or {}).get("progress") or {}
            if "step" in st:
                steps.append(st["step"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    leader = lease_holder(c)
    pids = wait_for("the leader's process", lambda: operator_pids(leader))
    killed = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    new = wait_for(
        "a new leader",
        lambda: (h := lease_holder(c)) and h != leader and h,
        timeout=60,
        interval=0.2,
    )
    takeover = time.monotonic() - killed
    before = steps[-1] if steps else 0
    wait_for(
        "the status to move on under the new leader",
        lambda: steps and steps[-1] > before,
        timeout=60,
    )
    status = wait_phase(c, namespace, "failover", "Succeeded", timeout=2 * STARTUP)
    sampling.set()
    sampler.join(5)
    print(f"FAILOVER takeover={takeover:.1f}s lease=10s old={leader} new={new}")
    assert takeover <= 20, takeover
    assert status["attempts"] == 1 and status["result"]["globalStep"] == 500
    assert steps == sorted(steps), steps
    from operator_process import job_creates

    assert job_creates(c, namespace) == 1


@pytest.mark.e2e
def test_helm_upgrade_with_a_crd_change_while_a_run_is_live(released, namespace, tmp_path):
    """A newer chart whose CRD has a new defaulted field, upgraded while a fine-tune trains:
    the CRD is updated in place, the run goes on to Succeeded and says which field the
    (older) operator ignored."""
    import shutil

    from operator_process import apply, get_gft, wait_phase
    from runner_runs import STARTUP, on_runner, running_pod

    c = released
    newer = tmp_path / "chart"
    shutil.copytree(CHART, newer)
    crd = newer / "templates" / "crd.yaml"
    knob = "\n".join(
        [
            "                  newKnob:",
            "                    type: integer",
            "                    default: 3",
            "                    description: A knob of a later version.",
            "                  warmupRatio:",
        ]
    )
    text = crd.read_text()
    assert "                  warmupRatio:\n" in text
    crd.write_text(text.replace("                  warmupRatio:", knob, 1))
    apply(c, namespace, on_runner("upgraded", _model(c), max_steps=300))
    running_pod(c, namespace, "upgraded")
    try:
        run_helm(c, "upgrade", RELEASE, str(newer), "-n", NAMESPACE, "--reuse-values", "--wait")
        crd_now = c.kubectl_json("get", "crd", "gemmafinetunes.finetune.gemma.dev")
        training = crd_now["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
            "spec"
        ]["properties"]["training"]["properties"]
        assert "newKnob" in training

        def understood():
            st = get_gft(c, namespace, "upgraded").get("status") or {}
            return next(
                (x for x in st.get("conditions") or [] if x["type"] == "SpecUnderstood"), None
            )

        cond = wait_for("SpecUnderstood=False", understood, timeout=60)
        assert "spec.training.newKnob" in cond["message"]
        status = wait_phase(c, namespace, "upgraded", "Succeeded", timeout=2 * STARTUP)
        assert status["result"]["globalStep"] == 300
    finally:
        run_helm(c, "upgrade", RELEASE, str(CHART), "-n", NAMESPACE, "--reuse-values", "--wait")


def test_the_rbac_is_exactly_what_a_full_lifecycle_uses(released, namespace):
    """Every request of the operator's service account over a lifecycle that exercises every
    path (create, run, live status, ingress added, changed and removed, suspend, resume, a
    non-retryable failure, a Job deleted under a live run, the TTL, TensorBoard after the run,
    delete) against every verb the chart grants: nothing is missing, nothing is spare."""
    from operator_process import apply, wait_phase
    from operator_samples import finetune

    c = released
    kwok = {"gpus": 1, "nodeSelector": {"type": "kwok"}}

    def patch(name: str, spec: dict) -> None:
        c.kubectl(
            "patch",
            "gft",
            name,
            "-n",
            namespace,
            "--type",
            "merge",
            "-p",
            json.dumps({"spec": spec}),
        )

    # A run that ends (TensorBoard after the run, then removed; the TTL deletes its Job).
    apply(
        c,
        namespace,
        finetune(
            "ends",
            resources=kwok,
            ttlSecondsAfterFinished=0,
            tensorboard={"keepAfterFinishSeconds": 3, "ingress": {"host": "tb.example.com"}},
        ),
    )
    wait_phase(c, namespace, "ends", "Succeeded", timeout=60)
    patch("ends", {"tensorboard": {"ingress": {"host": "tb2.example.com"}}})
    wait_for(
        "the Ingress updated",
        lambda: (
            c.kubectl_json("get", "ingress", "ends", "-n", namespace)["spec"]["rules"][0]["host"]
            == "tb2.example.com"
        ),
    )
    wait_for(
        "TensorBoard removed after the run",
        lambda: (
            c.kubectl("get", "deployment", "ends-tb", "-n", namespace, check=False).returncode != 0
        ),
        timeout=60,
    )
    wait_for(
        "the Job removed (TTL)",
        lambda: c.kubectl("get", "job", "ends", "-n", namespace, check=False).returncode != 0,
        timeout=60,
    )
    patch("ends", {"tensorboard": {"ingress": None}})
    wait_for(
        "the Ingress removed",
        lambda: c.kubectl("get", "ingress", "ends", "-n", namespace, check=False).returncode != 0,
    )
    # A live run: suspended, resumed, its Job deleted (orphaning the pod), then deleted.
    live = finetune("lives", resources=kwok, podAnnotations={"gft.dev/kwok-keep-running": "1"})
    apply(c, namespace, live)
    wait_phase(c, namespace, "lives", "Running", timeout=60)
    patch("lives", {"suspend": True})
    wait_phase(c, namespace, "lives", "Suspended", "Suspended", timeout=60)
    patch("lives", {"suspend": False})
    wait_phase(c, namespace, "lives", "Running", timeout=60)
    c.kubectl("delete", "job", "lives", "-n", namespace, "--cascade=orphan", "--wait=false")
    wait_phase(c, namespace, "lives", "Running", timeout=90)  # on a new Job, one pod at a time
    # A non-retryable failure.
    apply(
        c,
        namespace,
        finetune("fails", resources=kwok, podAnnotations={"gft.dev/kwok-exit-code": "78"}),
    )
    wait_phase(c, namespace, "fails", "Failed", timeout=60)
    c.kubectl("delete", "gft", "lives", "fails", "ends", "-n", namespace)

    used = _used_by_operator(c)
    granted = _granted(c)
    # Checked by admission (OwnerReferencesPermissionEnforcement), never requested as such.
    granted.discard(("update", "finetune.gemma.dev", "gemmafinetunes/finalizers"))
    # A server-side apply that makes the Ingress is authorized as a create, logged as a patch.
    granted.discard(("create", "networking.k8s.io", "ingresses"))
    assert used - granted == set(), f"used but not granted: {sorted(used - granted)}"
    assert granted - used == set(), f"granted but never used: {sorted(granted - used)}"


def _used_by_operator(c) -> set[tuple[str, str, str]]:
    used = set()
    for line in (Path(c.state_dir) / "logs" / "audit.log").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("user", {}).get("username") != SERVICE_ACCOUNT:
            continue
        ref = entry.get("objectRef")
        if ref is None:
            continue  # discovery (/api, /apis, /version): granted to everyone
        resource = ref.get("resource", "")
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        used.add((entry["verb"], ref.get("apiGroup", ""), resource))
    return used


def _granted(c) -> set[tuple[str, str, str]]:
    bindings = c.kubectl_json("get", "clusterrolebindings,rolebindings", "-A")["items"]
    granted = set()
    for b in bindings:
        if not any(
            s.get("name") == "gft-operator" and s.get("namespace") == NAMESPACE
            for s in b.get("subjects") or []
        ):
            continue
        kind, name = b["roleRef"]["kind"], b["roleRef"]["name"]
        args = ["get", kind.lower(), name, "-o", "json"]
        if kind == "Role":
            args += ["-n", b["metadata"]["namespace"]]
        role = json.loads(c.kubectl(*args).stdout)
        for rule in role["rules"]:
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    for verb in rule["verbs"]:
                        granted.add((verb, group, resource))
    return granted


def test_uninstall_leaves_the_crd_the_fine_tunes_and_their_claims(released, namespace):
    """Last in this module: uninstall, then look. Issue 25: a run still going when the
    operator is uninstalled keeps its Job and pod, but no finalizer of the operator's holds
    them (before: deleting the fine-tune afterwards left them terminating forever)."""
    from operator_process import apply, wait_phase
    from operator_samples import finetune

    c = released
    kwok = {"gpus": 1, "nodeSelector": {"type": "kwok"}}
    apply(c, namespace, finetune("kept", resources=kwok))
    live = finetune("going", resources=kwok, podAnnotations={"gft.dev/kwok-keep-running": "1"})
    apply(c, namespace, live)
    wait_phase(c, namespace, "kept", "Succeeded", timeout=60)
    wait_phase(c, namespace, "going", "Running", timeout=60)
    run_helm(c, "uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout", "3m")
    held = [
        f"{x['kind']}/{x['metadata']['name']}"
        for x in c.kubectl_json("get", "jobs,pods", "-n", namespace)["items"]
        if "finetune.gemma.dev/outcome" in (x["metadata"].get("finalizers") or [])
    ]
    assert not held, held
    c.kubectl("delete", "gft", "going", "-n", namespace, "--wait=false")
    wait_for(
        "the deleted run's Job and pods to go without an operator",
        lambda: (
            not c.kubectl_json(
                "get", "jobs,pods", "-n", namespace, "-l", "finetune.gemma.dev/name=going"
            )["items"]
        ),
        timeout=90,
    )
    wait_for("the operator's pods to go", lambda: not operator_pods(c), timeout=120)
    selector = f"app.kubernetes.io/instance={RELEASE}"
    for kinds in (
        "deployments,services,serviceaccounts,roles,rolebindings,pods,"
        "poddisruptionbudgets,networkpolicies",
        "clusterroles,clusterrolebindings",
    ):
        left = c.kubectl_json("get", kinds, "-A", "-l", selector)["items"]
        assert not left, [f"{x['kind']}/{x['metadata']['name']}" for x in left]
    crd = c.kubectl_json("get", "crd", "gemmafinetunes.finetune.gemma.dev")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert c.kubectl("get", "gft", "kept", "-n", namespace).returncode == 0
    assert c.kubectl("get", "pvc", "kept-output", "-n", namespace).returncode == 0
    assert (
        yaml.safe_load(c.kubectl("get", "gft", "kept", "-n", namespace, "-o", "yaml").stdout)[
            "status"
        ]["phase"]
        == "Succeeded"
    )
