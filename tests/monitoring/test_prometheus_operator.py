"""The operator's /metrics through a real Prometheus, as its PodMonitor has it scraped, and the
dashboard's operator panels answered from it.

``gft-operator --metrics-address`` runs out of cluster against the proving ground and reconciles
two GemmaFineTunes, so that the fine-tunes-by-phase and reconcile panels have something to show:
one suspended, one running on a KWOK node whose pod address is answered by a fake trainer
(``devcluster.fake_trainers``), so that the operator reads metrics and writes live status
and the status-update lag panel has data too.
A module of its own, apart from test_prometheus.py, so that no trainer competes for the CPU while
the control plane starts.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_harness import (
    REPO,
    Prometheus,
    dashboard,
    expressions,
    free_port,
    http_get,
    is_operator_query,
    load_manifest,
    operator_test_module,
    pod_target,
    promtool_problems,
    scrape_config,
    substitute,
    variable_queries,
)

from devcluster.fake_trainers import kwok_pods_served

operator_process = operator_test_module("operator_process")
finetune = operator_test_module("operator_samples").finetune

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def operator_deployment() -> dict:
    docs = yaml.safe_load_all((REPO / "manifests" / "operator.yaml").read_text())
    (deployment,) = [d for d in docs if d and d["kind"] == "Deployment"]
    return deployment


def operator_target(address: str) -> dict:
    """The operator's pod as discovery shows it, from manifests/operator.yaml."""
    deployment = operator_deployment()
    port = load_manifest("podmonitor-operator.yaml")["spec"]["podMetricsEndpoints"][0]["port"]
    template = deployment["spec"]["template"]
    containers = [
        c for c in template["spec"]["containers"] if port in [p["name"] for p in c.get("ports", [])]
    ]
    if not containers:
        pytest.fail(f"manifests/operator.yaml: no container port named {port!r} to scrape")
    return pod_target(
        address,
        namespace=deployment["metadata"]["namespace"],
        pod=f"{deployment['metadata']['name']}-6b8f9c7d5-q2w4e",
        container=containers[0]["name"],
        port=port,
        labels=template["metadata"]["labels"],
    )


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def prometheus(metrics_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    monitor = load_manifest("podmonitor-operator.yaml")
    prom = Prometheus(
        tmp_path_factory.mktemp("prometheus"),
        [scrape_config(monitor, [operator_target(f"127.0.0.1:{metrics_port}")])],
    ).start()
    try:
        yield prom
    finally:
        prom.stop()


@pytest.fixture(scope="module")
def operator(cluster, metrics_port: int, tmp_path_factory: pytest.TempPathFactory):
    exe = Path(sys.executable).parent / "gft-operator"
    usage = subprocess.run([str(exe), "--help"], capture_output=True, text=True).stdout
    if "--metrics-address" not in usage:
        pytest.fail("gft-operator has no --metrics-address flag")
    operator_process.install(cluster)
    op = operator_process.start_operator(
        cluster,
        tmp_path_factory,
        "--metrics-address",
        f"127.0.0.1:{metrics_port}",
        "--metrics-interval",
        "1",
        "--metrics-access",
        "pod-ip",
    )
    yield op
    op.kill(signal.SIGTERM)


def test_operator_panels_have_data(
    cluster, operator: operator_process.OperatorProcess, prometheus: Prometheus, namespace: str
) -> None:
    with kwok_pods_served(time.time()):
        check_operator_panels(cluster, prometheus, namespace)


def check_operator_panels(cluster, prometheus: Prometheus, namespace: str) -> None:
    prometheus.wait_for("a scrape of the operator", lambda: prometheus.query("up == 1"))
    # Suspended: unfinished, so the operator keeps reconciling it (every 3 s) while we look.
    operator_process.apply(cluster, namespace, finetune("demo", suspend=True))
    running = finetune(
        "live",
        resources={"gpus": 0},
        tensorboard={"enabled": False},
        podAnnotations={"gft.dev/kwok-keep-running": "true"},
    )
    operator_process.apply(cluster, namespace, running)
    phases = prometheus.wait_for(
        f"gft_operator_finetunes for {namespace}",
        lambda: prometheus.query(f'gft_operator_finetunes{{namespace="{namespace}"}}'),
        timeout=60,
    )
    by_phase = {s["metric"]["phase"]: float(s["value"][1]) for s in phases}
    # honorLabels keeps the fine-tunes' namespace; the target's labels fill in the rest.
    for series in phases:
        assert series["metric"]["job"] == "gft-operator"
        assert series["metric"]["pod"].startswith("gft-operator-")
        assert "exported_namespace" not in series["metric"]
    assert by_phase.get("Suspended") == 1

    selector, label = variable_queries(dashboard())["namespace"]
    assert namespace in prometheus.label_values(label, selector)

    values = {"namespace": namespace, "finetune": "demo"}
    exprs = {
        name: substitute(expr, values)
        for name, expr in expressions(dashboard())
        if is_operator_query(expr)
    }
    assert len(exprs) >= 9
    results = prometheus.wait_for_results(exprs)
    assert [float(s["value"][1]) for s in results["Operator up [A]"]] == [1]
    # Reconciles and live-status writes within the last rate interval: rates above 0 and real
    # quantiles, not NaN.
    busy = [
        "Reconciles / s [A]",
        "Reconcile duration [A]",
        "Reconcile duration [B]",
        "Status-update lag [A]",
        "Status-update lag [B]",
    ]
    prometheus.wait_for_results({name: f"({exprs[name]}) > 0" for name in busy})
    assert {s["metric"]["reason"] for s in results["Trainer metrics reads / s [B]"]} == {
        "unreachable",
        "timeout",
        "invalid",
    }


def test_promtool_accepts_the_operator_metrics(
    operator: operator_process.OperatorProcess, metrics_port: int
) -> None:
    text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert "gft_operator_reconciles_total" in text
    assert promtool_problems(text) == ""
