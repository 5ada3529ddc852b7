"""Kueue on the proving ground, for real: its controller manager (built from the Go module proxy,
``build.TOOLS``), its CRDs and its admission webhooks, beside the control plane.

Where this differs from Kueue's own install, and why:

- The manager runs as a process next to kube-controller-manager (component ``kueue``, stopped
  with the cluster), with the admin's kubeconfig, not as a pod.
- Its webhooks are called by URL on 127.0.0.1 with a certificate of the cluster's CA: there is
  no Service routing here. Kueue's own certificate rotation is off, so it reads its serving
  certificates from files; it looks for the metrics one at a fixed /etc path, which it is given
  through a read-only overlay in a mount namespace of its own (the host's /etc is untouched).
- Only the batch/v1 Job integration is on, and the Job webhooks see only Jobs with a queue name
  (what ``manageJobsWithoutQueueName: false`` means anyway): other tests' Jobs never wait on it.
- The visibility API (an aggregated API server) is off.
"""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from devcluster import build, pki
from devcluster.cluster import Cluster, _pid_alive, _spawn, _wait, component_port

COMPONENT = "kueue"
NAMESPACE = "kueue-system"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Kueue's metrics server reads its certificate from here when its own rotation is off.
METRICS_CERT_DIR = "kueue/metrics/certs"  # under /etc
WEBHOOK_GROUPS = frozenset({"kueue.x-k8s.io", "batch"})


def running(c: Cluster) -> bool:
    return _pid_alive(c.pids.get(COMPONENT, 0))


def install(c: Cluster, say=print) -> None:
    """Kueue up on ``c``: CRDs, the manager, its webhooks. Idempotent; returns once a
    ResourceFlavor passes the validating webhook (a dry run)."""
    if running(c):
        return
    binary = build.tool(COMPONENT)
    if not binary.is_file():
        build.build_tools(say)
    files = binary.parent
    c.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(files / "bases"))
    c.kubectl("wait", "--for", "condition=Established", "--timeout=60s",
              *(f"crd/{crd}" for crd in _crd_names(files / "bases")))  # fmt: skip
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}))  # fmt: skip

    work = c.state_dir / COMPONENT
    certs = work / "certs"
    etc = work / "etc"  # the overlay's top layer over /etc
    certs.mkdir(parents=True, exist_ok=True)
    pki.sign_server(c.pki_dir, "kueue-webhook", ["127.0.0.1"])
    for target in (certs, etc / METRICS_CERT_DIR):
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(c.pki_dir / "kueue-webhook.crt", target / "tls.crt")
        shutil.copyfile(c.pki_dir / "kueue-webhook.key", target / "tls.key")

    ports = {name: component_port() for name in ("webhook", "health", "metrics")}
    c.ports.update({f"kueue-{name}": port for name, port in ports.items()})
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(_configuration(ports, certs)))
    command = [
        str(binary),
        f"--config={config}",
        f"--kubeconfig={c.kubeconfig}",
        "--feature-gates=VisibilityOnDemand=false",
        "--zap-log-level=info",
    ]
    overlay = f"mount -t overlay overlay -o ro,lowerdir={etc}:/etc /etc"
    _spawn(c, COMPONENT, ["unshare", "--mount", "--propagation", "private", "--",
                          "sh", "-c", f'{overlay} && exec "$@"', "kueue", *command])  # fmt: skip
    _wait("Kueue's manager", lambda: _ready(ports["health"]), 120, c, COMPONENT)

    webhooks = yaml.safe_load_all((files / "manifests.yaml").read_text())
    ca = (c.pki_dir / "ca.crt").read_bytes()
    rendered = [_on_loopback(w, ports["webhook"], ca) for w in webhooks if w]
    c.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
              input=yaml.safe_dump_all(rendered))  # fmt: skip

    def webhook_answers() -> bool:
        probe = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
                 "metadata": {"name": "gft-webhook-probe"}}  # fmt: skip
        result = c.kubectl("create", "--dry-run=server", "-f", "-",
                           input=yaml.safe_dump(probe), check=False)  # fmt: skip
        return result.returncode == 0

    _wait("Kueue's webhooks", webhook_answers, 60, c, COMPONENT)
    say(f"Kueue v{build.TOOLS[COMPONENT][1]} up (webhooks on 127.0.0.1:{ports['webhook']})")


def _crd_names(folder: Path) -> list[str]:
    return sorted(yaml.safe_load(p.read_text())["metadata"]["name"] for p in folder.glob("*.yaml"))


def _configuration(ports: dict[str, int], certs: Path) -> dict[str, Any]:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['health']}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports['metrics']}"},
        "webhook": {"port": ports["webhook"], "host": "127.0.0.1", "certDir": str(certs)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
    }


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _on_loopback(config: dict[str, Any], port: int, ca: bytes) -> dict[str, Any]:
    """Kueue's webhook configuration, kept to the Kueue and Job webhooks and pointed at the
    manager on loopback (``url`` and the CA, not a Service)."""
    import base64

    kept = []
    for hook in config.get("webhooks") or []:
        groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
        if not groups or not groups <= WEBHOOK_GROUPS:
            continue
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {
            "url": f"https://127.0.0.1:{port}{path}",
            "caBundle": base64.b64encode(ca).decode(),
        }
        if "batch" in groups:
            hook["objectSelector"] = {
                "matchExpressions": [{"key": QUEUE_LABEL, "operator": "Exists"}]
            }
        kept.append(hook)
    meta = config["metadata"]
    return {**config, "metadata": {"name": f"kueue-{meta['name']}"}, "webhooks": kept}
