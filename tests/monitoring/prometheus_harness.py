"""A real Prometheus (Debian's ``/usr/bin/prometheus``) for the monitoring tests.

Its scrape configs come from the PodMonitors in manifests/monitoring, translated the way the
Prometheus Operator translates them (selector and port become ``keep`` rules, then the
Operator's own labels, then the monitor's relabelings). The targets are loopback addresses that
carry the ``__meta_kubernetes_*`` labels Kubernetes service discovery would give the pod, so the
real relabelings decide which targets are kept and which labels the series get.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "manifests" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
# A stand-in for Grafana's $__rate_interval and $__interval: four 1 s scrapes and one more.
RATE_INTERVAL = "5s"


def binary(name: str) -> str:
    """A Prometheus tool from Debian's ``prometheus`` package; missing is a failure under CI."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else "")
    if found:
        return found
    why = f"{name} is missing: `make system-deps` installs Debian's prometheus package"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


# The monitoring manifests are rendered from the chart (make manifests); both PodMonitors in one
# file. name -> (file, object name)
_MONITORS = {
    "podmonitor-trainers.yaml": ("podmonitors.yaml", "gft-trainers"),
    "podmonitor-operator.yaml": ("podmonitors.yaml", "gft-operator"),
}


def load_manifest(name: str) -> dict[str, Any]:
    file, wanted = _MONITORS.get(name, (name, None))
    docs = [d for d in yaml.safe_load_all((MONITORING / file).read_text()) if d]
    return next(d for d in docs if wanted is None or d["metadata"]["name"] == wanted)


def operator_test_module(name: str) -> Any:
    """A helper module of tests/operator (``operator_samples``, ``operator_process``)."""
    folder = str(REPO / "tests" / "operator")
    if folder not in sys.path:
        sys.path.append(folder)
    return importlib.import_module(name)


def training_pod(name: str, namespace: str) -> dict[str, Any]:
    """The pod template of the Job the operator makes for the sample GemmaFineTune ``name``."""
    from gft_api.v1alpha1 import GemmaFineTuneSpec
    from gft_operator import children

    sample = operator_test_module("operator_samples").finetune(name)
    spec = GemmaFineTuneSpec.model_validate(sample["spec"])
    job = children.job(children.Owner(name=name, namespace=namespace, uid="u1"), spec)
    return {"job": job["metadata"]["name"], **job["spec"]["template"]}


# ---------------------------------------------------------------------------------------------
# The dashboard's queries
# ---------------------------------------------------------------------------------------------
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but rows, including those inside collapsed rows."""
    found = []
    for panel in dash["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def expressions(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """``(panel title and refId, PromQL)`` for every query of every panel."""
    return [
        (f"{p['title']} [{t['refId']}]", t["expr"])
        for p in panels(dash)
        for t in p.get("targets", [])
    ]


def is_operator_query(expr: str) -> bool:
    """Whether the data comes from the operator's /metrics (else from the trainers')."""
    return "gft_operator_" in expr or 'job="gft-operator"' in expr


def variable_queries(dash: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """``name -> (series selector, label)`` of each ``label_values(selector, label)`` variable."""
    out = {}
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert m, f"variable {var['name']}: not a label_values(selector, label) query: {query}"
        out[var["name"]] = (m.group(1).strip(), m.group(2))
    return out


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variables replaced: template variables by ``values``, intervals by 5s."""
    values = {"__rate_interval": RATE_INTERVAL, "__interval": RATE_INTERVAL, **values}

    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", one, expr)


# ---------------------------------------------------------------------------------------------
# PodMonitor -> scrape config, as the Prometheus Operator writes it
# ---------------------------------------------------------------------------------------------
def sanitize(label: str) -> str:
    """A Kubernetes label key as a Prometheus label name (``a.b/c-d`` -> ``a_b_c_d``)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def pod_target(
    address: str, *, namespace: str, pod: str, container: str, port: str, labels: dict[str, str]
) -> dict[str, Any]:
    """A static target carrying what Kubernetes pod discovery says about a pod's port."""
    meta = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_container_name": container,
        "__meta_kubernetes_pod_container_port_name": port,
    }
    for key, value in labels.items():
        meta[f"__meta_kubernetes_pod_label_{sanitize(key)}"] = value
        meta[f"__meta_kubernetes_pod_labelpresent_{sanitize(key)}"] = "true"
    return {"targets": [address], "labels": meta}


_RELABEL_KEYS = {
    "sourceLabels": "source_labels",
    "targetLabel": "target_label",
    "separator": "separator",
    "regex": "regex",
    "replacement": "replacement",
    "modulus": "modulus",
    "action": "action",
}


def scrape_config(
    monitor: dict[str, Any], targets: list[dict[str, Any]], interval: str = "1s"
) -> dict[str, Any]:
    """The scrape config the Prometheus Operator generates for a PodMonitor's first endpoint,
    with static ``targets`` in place of Kubernetes discovery and a shorter ``interval``."""
    meta, spec = monitor["metadata"], monitor["spec"]
    (endpoint,) = spec["podMetricsEndpoints"]
    monitor_name = f"{meta['namespace']}/{meta['name']}"
    relabel: list[dict[str, Any]] = []
    for key, value in spec["selector"].get("matchLabels", {}).items():
        s = sanitize(key)
        relabel.append(
            {
                "action": "keep",
                "source_labels": [
                    f"__meta_kubernetes_pod_label_{s}",
                    f"__meta_kubernetes_pod_labelpresent_{s}",
                ],
                "regex": f"({re.escape(value)});true",
            }
        )
    namespaces = spec.get("namespaceSelector", {})
    if not namespaces.get("any"):  # the Operator limits discovery to these namespaces
        names = namespaces.get("matchNames") or [meta["namespace"]]
        relabel.append(
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_namespace"],
                "regex": "|".join(map(re.escape, names)),
            }
        )
    relabel += [
        {
            "action": "drop",
            "source_labels": ["__meta_kubernetes_pod_phase"],
            "regex": "(Failed|Succeeded)",
        },
        {
            "action": "keep",
            "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": re.escape(endpoint["port"]),
        },
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "job", "replacement": monitor_name},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
    ]
    for rule in endpoint.get("relabelings", []):
        relabel.append({_RELABEL_KEYS[k]: v for k, v in rule.items()})
    return {
        "job_name": f"podMonitor/{monitor_name}/0",
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "metrics_path": endpoint.get("path", "/metrics"),
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "static_configs": targets,
        "relabel_configs": relabel,
    }


# ---------------------------------------------------------------------------------------------
# The Prometheus process
# ---------------------------------------------------------------------------------------------
class PromQLError(Exception):
    """Prometheus refused a query (a syntax error, an unknown function)."""


class Prometheus:
    """``prometheus`` on 127.0.0.1 with its storage in ``workdir``; ``stop`` kills it."""

    def __init__(self, workdir: Path, scrape_configs: list[dict[str, Any]]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": scrape_configs,
        }
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "prometheus.log"

    def start(self, timeout: float = 30) -> Prometheus:
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))
        exe = binary("prometheus")
        check = subprocess.run(
            [binary("promtool"), "check", "config", str(config_file)],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, f"promtool refuses the config: {check.stdout}{check.stderr}"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    exe,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log()[-3000:]}")
            try:
                http_get(f"{self.url}/-/ready", timeout=1)
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready after {timeout:.0f}s: {self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def _api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            body = json.loads(http_get(url))
        except urllib.error.HTTPError as e:
            body = json.loads(e.read().decode())
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}") from e
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (``/api/v1/query``)."""
        data = self._api("query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: a {data['resultType']}, not a vector"
        return data["result"]

    def label_values(self, label: str, selector: str) -> list[str]:
        """What Grafana's ``label_values(selector, label)`` lists."""
        return self._api(f"label/{label}/values", **{"match[]": selector})

    def targets(self) -> list[dict[str, Any]]:
        return self._api("targets")["activeTargets"]

    def _targets_said(self) -> str:
        said = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in self.targets()]
        return f"targets: {said}; log: {self.log()[-1500:]}"

    def wait_for(self, what: str, check, timeout: float = 30, interval: float = 0.5):
        """Poll ``check`` until it returns something truthy; fail naming ``what``."""
        deadline = time.monotonic() + timeout
        while not (last := check()):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"timed out after {timeout:.0f}s waiting for {what}; {self._targets_said()}"
                )
            time.sleep(interval)
        return last

    def wait_for_results(
        self, exprs: dict[str, str], timeout: float = 30
    ) -> dict[str, list[dict[str, Any]]]:
        """Poll until every expression has a non-empty result; fail listing those still empty."""
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in exprs}
        deadline = time.monotonic() + timeout
        while True:
            for name, expr in exprs.items():
                results[name] = results[name] or self.query(expr)
            if all(results.values()):
                return results
            if time.monotonic() > deadline:
                empty = "\n".join(f"  {n}: {exprs[n]}" for n, r in results.items() if not r)
                pytest.fail(f"empty after {timeout:.0f}s:\n{empty}\n{self._targets_said()}")
            time.sleep(0.5)


def promtool_problems(exposition: str) -> str:
    """What ``promtool check metrics`` says about a /metrics text (empty: nothing)."""
    done = subprocess.run(
        [binary("promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=30,
    )
    said = (done.stdout + done.stderr).strip()
    if done.returncode != 0 and not said:
        said = f"promtool exited {done.returncode}"
    return said
