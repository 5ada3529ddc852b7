"""The operator as the tests run it: a real ``gft-operator`` process, out of cluster, with the
RBAC of manifests/rbac.yaml (it authenticates as the gft-operator service account).

The fixtures here are imported by the test modules that use them (module scope: each module
starts its own operator and stops it at its end). They are not in a conftest.py because a
second module named ``conftest`` would hide the suite's own (``from conftest import wait_for``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from gft_api import GROUP, PLURAL, VERSION

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"


def install(cluster, manifests: Path = MANIFESTS) -> None:
    """The CRD, the operator's namespace and its RBAC for running it out of the cluster (it
    reads trainers' metrics through the API server's pod proxy), as a user installs them."""
    cluster.kubectl("apply", "--server-side", "-f", str(manifests / "crd.yaml"))
    cluster.kubectl("apply", "-f", str(manifests / "namespace.yaml"))
    cluster.kubectl("apply", "-f", str(manifests / "rbac-out-of-cluster.yaml"))
    cluster.kubectl(
        "wait",
        "--for",
        "condition=Established",
        "crd/gemmafinetunes.finetune.gemma.dev",
        "--timeout=60s",
    )
    # kubectl's discovery cache learns the new resource (and its short name) a moment later.
    deadline = time.monotonic() + 60
    while cluster.kubectl("explain", "gft", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("kubectl does not know the gft resource a minute after install")
        time.sleep(0.5)


def service_account_kubeconfig(cluster, path: Path) -> Path:
    """A kubeconfig that logs in as the operator's service account."""
    token = cluster.kubectl(
        "create", "token", "gft-operator", "-n", "gft-system", "--duration=24h"
    ).stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    cluster_entry = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "pg", "cluster": cluster_entry["cluster"]}],
        "users": [{"name": "gft-operator", "user": {"token": token}}],
        "contexts": [{"name": "op", "context": {"cluster": "pg", "user": "gft-operator"}}],
        "current-context": "op",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorProcess:
    """Start, kill and restart ``gft-operator``; its log is kept for the assertions."""

    def __init__(
        self, cluster, kubeconfig: Path, log_path: Path, *extra: str, venv: Path | None = None
    ) -> None:
        self.venv = venv or Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv"))
        self.cluster = cluster
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.port = _free_port()
        self.metrics_port = _free_port()

    def start(self) -> None:
        env = {**os.environ, **self.cluster.env, "KUBECONFIG": str(self.kubeconfig)}
        exe = self.venv / "bin" / "gft-operator"
        if not exe.exists():
            exe = REPO / ".venv" / "bin" / "gft-operator"
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [
                str(exe),
                "--health-address",
                f"127.0.0.1:{self.port}",
                "--metrics-address",
                f"127.0.0.1:{self.metrics_port}",
                "--resync-seconds",
                "3",
                *self.extra,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gft-operator exited: {self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"gft-operator did not become healthy: {self.log()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


# ---------------------------------------------------------------------------------------------
# kubectl helpers
# ---------------------------------------------------------------------------------------------
def apply(cluster, namespace: str, manifest: dict, check: bool = True):
    return cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=check
    )


def get_gft(cluster, namespace: str, name: str) -> dict:
    """The fine-tune as the API server has it (read on a kept-alive connection: tests poll it)."""
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
    return cluster.api.request("GET", path, timeout=10)  # one try, as a kubectl get was


def wait_phase(cluster, namespace, name, phase, reason=None, timeout=60) -> dict:
    """Wait for the fine-tune's phase (and reason). Waiting for a run to train (Running or
    Succeeded) gives up at once when one of its pods can never start, naming the pod and why."""
    from conftest import pod_that_cannot_start, wait_for

    def check():
        status = get_gft(cluster, namespace, name).get("status") or {}
        if status.get("phase") == phase and (reason is None or status.get("reason") == reason):
            return status
        return None

    def give_up():
        return pod_that_cannot_start(cluster, namespace, f"finetune.gemma.dev/name={name}")

    return wait_for(
        f"{name} to be {phase}/{reason or '*'}",
        check,
        timeout=timeout,
        give_up=give_up if phase in ("Running", "Succeeded") else None,
    )


def events_of(cluster, namespace, name) -> list[dict]:
    items = cluster.kubectl_json(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.kind=GemmaFineTune,involvedObject.name={name}",
    )["items"]
    return sorted(items, key=lambda e: int(e["metadata"]["resourceVersion"]))


def job_creates(c, namespace: str) -> int:
    """Jobs created in ``namespace``, from the API server's audit log (it survives restarts
    of the API server, which a watch does not)."""
    created = 0
    for line in (Path(c.state_dir) / "logs" / "audit.log").read_text().splitlines():
        entry = json.loads(line)
        ref = entry.get("objectRef") or {}
        if (
            entry.get("verb") == "create"
            and entry.get("stage") == "ResponseComplete"
            and ref.get("resource") == "jobs"
            and ref.get("namespace") == namespace
            and (entry.get("responseStatus") or {}).get("code") == 201
        ):
            created += 1
    return created


def counter(op, name: str) -> float:
    """One of the operator's counters, from its own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5) as r:
        families = text_string_to_metric_families(r.read().decode())
        return next(s.value for f in families for s in f.samples if s.name == name)


def reconciles(op) -> float:
    """The operator's count of reconciles."""
    return counter(op, "gft_operator_reconciles_total")


def operator_looked_again(op, times: int = 3, timeout: float = 60) -> None:
    """Wait until the operator's periodic resync has passed ``times`` more times (each queues
    every unfinished fine-tune, and runs after the reconciles the previous one queued): it had
    every chance to act on what the test set up. (A finished run is not looked at by the
    resync: only an event of its own, or a deadline it set, wakes it.)"""
    from conftest import wait_for

    start = counter(op, "gft_operator_resyncs_total")
    wait_for(
        f"{times} more resync passes",
        lambda: counter(op, "gft_operator_resyncs_total") >= start + times,
        timeout=timeout,
        interval=0.5,
    )


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def installed(cluster):
    install(cluster)
    return cluster


# TensorBoard after a run goes where the admin says (--tensorboard-node-selector); on the
# proving ground only the runner node's pods really serve.
TENSORBOARD_ON_RUNNER = ("--tensorboard-node-selector", "gft.dev/runner=true")


def start_operator(
    cluster, tmp_path_factory, *extra: str, venv: Path | None = None
) -> OperatorProcess:
    """``gft-operator`` out of cluster, logged in as its service account, with ``extra``
    arguments; started and healthy."""
    kubeconfig = service_account_kubeconfig(
        cluster, tmp_path_factory.mktemp("op") / "operator.kubeconfig"
    )
    log = tmp_path_factory.mktemp("oplog") / "operator.log"
    op = OperatorProcess(cluster, kubeconfig, log, *extra, venv=venv)
    op.start()
    return op


@pytest.fixture(scope="module")
def operator(installed, tmp_path_factory):
    """``gft-operator`` out of cluster, logged in as its service account."""
    op = start_operator(installed, tmp_path_factory)
    yield op
    op.kill(signal.SIGTERM)


@pytest.fixture
def running_operator(operator):
    """The operator, started again if a test left it stopped."""
    if operator.proc is None or operator.proc.poll() is not None:
        operator.start()
    return operator


@pytest.fixture(scope="module")
def scratch(installed):
    """A namespace for manifests that are refused (nothing gets created in it)."""
    name = f"t-refused-{uuid.uuid4().hex[:5]}"
    installed.kubectl("create", "namespace", name)
    yield name
    installed.kubectl("delete", "namespace", name, "--wait=false", check=False)


def watch_job_events(c, namespace: str) -> subprocess.Popen:
    """``kubectl get jobs --watch``: one ``TYPE NAME`` line per watch event, on stdout."""
    return subprocess.Popen(
        [
            str(c.bin_dir / "kubectl"),
            "--kubeconfig",
            str(c.kubeconfig),
            "get",
            "jobs",
            "-n",
            namespace,
            "--watch",
            "--output-watch-events",
            "-o",
            'jsonpath={.type} {.object.metadata.name}{"\\n"}',
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=c.env,
    )
