"""Render manifests/monitoring/grafana-dashboard-configmap.yaml from grafana-dashboard.json.

    python tests/monitoring/dashboard_configmap.py --write   # or without --write: to stdout

The JSON is the source (edit it, or export it from Grafana); the ConfigMap wraps it for Grafana's
dashboard sidecar, which loads every ConfigMap labelled ``grafana_dashboard: "1"``. A test fails
when the checked-in ConfigMap differs from what this renders.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MONITORING = Path(__file__).resolve().parents[2] / "manifests" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
CONFIGMAP = MONITORING / "grafana-dashboard-configmap.yaml"
DATA_KEY = "gft-finetuning.json"

HEADER = f"""\
# Generated from grafana-dashboard.json: `python tests/monitoring/dashboard_configmap.py --write`.
# Grafana's dashboard sidecar (kube-prometheus-stack, the grafana chart) loads ConfigMaps labelled
# grafana_dashboard: "1"; let it search this namespace (sidecar.dashboards.searchNamespace).
apiVersion: v1
kind: ConfigMap
metadata:
  name: gft-grafana-dashboard
  namespace: gft-system
  labels:
    app.kubernetes.io/name: gemma-finetune-operator
    app.kubernetes.io/component: monitoring
    grafana_dashboard: "1"
data:
  {DATA_KEY}: |
"""


def render(dashboard_json: str | None = None) -> str:
    """The ConfigMap, with the dashboard as a literal block (the JSON as it is checked in)."""
    text = DASHBOARD.read_text() if dashboard_json is None else dashboard_json
    json.loads(text)  # refuse to wrap what is not JSON
    body = "".join(f"    {line}" if line.strip() else "\n" for line in text.splitlines(True))
    return HEADER + body


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        CONFIGMAP.write_text(render())
    else:
        sys.stdout.write(render())
