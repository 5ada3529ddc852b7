"""The monitoring manifests on their own: the Grafana dashboard, its ConfigMap, the PodMonitors,
and that they agree with what the operator and the trainer really label and export."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from prometheus_harness import (
    DASHBOARD,
    MONITORING,
    REPO,
    dashboard,
    expressions,
    load_manifest,
    panels,
    training_pod,
    variable_queries,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_is_grafana_json_on_a_datasource_variable() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] >= 39
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "finetune"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "finetune"):
        assert variables[name]["datasource"] == DATASOURCE
        assert variables[name]["multi"] and variables[name]["includeAll"]
    assert set(variable_queries(dash)) == {"namespace", "finetune"}

    rows = [p for p in dash["panels"] if p["type"] == "row"]
    ids = [p["id"] for p in rows + panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dash):
        where = panel["title"]
        assert panel["datasource"] == DATASOURCE, where
        assert panel["targets"], where
        x, w = panel["gridPos"]["x"], panel["gridPos"]["w"]
        assert x >= 0 and x + w <= 24, where
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), where
        for t in panel["targets"]:
            assert t["datasource"] == DATASOURCE, where
            assert t["expr"].strip(), where


def test_dashboard_has_the_panels_of_the_issue() -> None:
    titles = {p["title"] for p in panels(dashboard())}
    assert titles >= {
        "Fine-tunes by phase",
        "Progress",
        "ETA",
        "Loss",
        "Token accuracy",
        "Learning rate",
        "Throughput",
        "GPU utilisation",
        "GPU memory",
        "GPU power",
        "GPU temperature",
        "Operator up",
        "Reconciles / s",
        "Reconcile errors / s",
        "Reconcile duration",
        "Status-update lag",
        "Trainer metrics reads / s",
    }


def exported_names(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every metric name the trainer (with a GPU) and the operator export."""
    from gft_operator import monitoring
    from gft_trainer import gpu, metrics
    from gft_trainer.gpu import GpuReading

    monkeypatch.setattr(gpu, "read_gpus", lambda: [GpuReading(0, 0.5, 1, 2, 3.0, 4.0)])
    trainer = metrics.PrometheusMetrics("ns/name")
    families = [*trainer.registry.collect(), *monitoring.REGISTRY.collect()]
    return {sample.name for family in families for sample in family.samples} | {
        family.name for family in families
    }


def test_every_metric_the_dashboard_reads_is_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    exported = exported_names(monkeypatch)
    read = {
        name for _, expr in expressions(dashboard()) for name in re.findall(r"\b(gft_\w+)", expr)
    }
    assert read, "the dashboard reads no gft_ metric"
    assert read <= exported, f"not exported by the trainer or the operator: {read - exported}"


def test_dashboard_configmap_carries_the_charts_json() -> None:
    """The ConfigMap (rendered from the chart; `make manifests` keeps it current, a chart test
    checks) holds the chart's dashboard JSON, with the sidecar's label and folder."""
    cm = yaml.safe_load((MONITORING / "grafana-dashboard-configmap.yaml").read_text())
    assert cm["kind"] == "ConfigMap"
    assert cm["metadata"]["namespace"] == "gft-system"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "Gemma fine-tuning"
    chart_json = REPO / "charts" / "gemma-finetune-operator" / "files" / "grafana-dashboard.json"
    assert json.loads(cm["data"]["gft-finetuning.json"]) == json.loads(chart_json.read_text())
    assert DASHBOARD.read_text() == chart_json.read_text()


def _endpoint(monitor: dict) -> dict:
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "PodMonitor"
    assert monitor["metadata"]["namespace"] == "gft-system"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    return endpoint


def _relabeled(endpoint: dict) -> dict[str, str]:
    """target label -> the source label (or fixed value) it comes from."""
    return {
        r["targetLabel"]: ",".join(r.get("sourceLabels", [])) or r["replacement"]
        for r in endpoint["relabelings"]
    }


def test_trainer_podmonitor_selects_the_training_pods() -> None:
    monitor = load_manifest("podmonitor-trainers.yaml")
    endpoint = _endpoint(monitor)
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/managed-by": "gft-operator",
        "app.kubernetes.io/component": "trainer",
    }
    assert _relabeled(endpoint) == {
        "namespace": "__meta_kubernetes_namespace",
        "pod": "__meta_kubernetes_pod_name",
        "finetune": "__meta_kubernetes_pod_label_finetune_gemma_dev_name",
        "job": "gft-trainer",
    }

    # What the operator really puts on the training pod.
    pod = training_pod("demo", "ml")
    labels = pod["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels["finetune.gemma.dev/name"] == "demo"  # the source of the `finetune` label
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert "metrics" in ports


def test_operator_podmonitor_selects_the_operator_pod() -> None:
    monitor = load_manifest("podmonitor-operator.yaml")
    endpoint = _endpoint(monitor)
    assert endpoint["honorLabels"] is True  # gft_operator_finetunes keeps its `namespace`
    assert _relabeled(endpoint) == {
        "namespace": "__meta_kubernetes_namespace",
        "pod": "__meta_kubernetes_pod_name",
        "job": "gft-operator",
    }
    deployment = next(
        d
        for d in yaml.safe_load_all((REPO / "manifests" / "operator.yaml").read_text())
        if d and d["kind"] == "Deployment"
    )
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [
        deployment["metadata"]["namespace"]
    ]
    template = deployment["spec"]["template"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    )
    (container,) = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert "metrics" in ports, "manifests/operator.yaml: the operator has no port named metrics"
    argv = " ".join(container.get("command", []) + container.get("args", []))
    address = re.search(r"--metrics-address[= ](\S+)", argv)
    assert address, f"the operator is started without --metrics-address: {argv}"
    assert address.group(1).endswith(f":{ports['metrics']}")
