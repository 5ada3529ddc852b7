"""Cluster DNS on the proving ground: CoreDNS (built from the Go module proxy, ``build.TOOLS``)
serving ``cluster.local`` from the API server, as a cluster's kube-dns does.

It listens on the node's bridge address, which the runner gives its pods as their name server
(the kubelet's ``--cluster-dns``; there is no Service routing here to reach a ClusterIP). Pods
find Services and, through a headless Service, each other by name:
``<hostname>.<subdomain>.<namespace>.svc.cluster.local``. Only the cluster's names are
answered: nothing is forwarded, so no query leaves this machine, and any other name is refused
at once rather than timing out.
"""

from __future__ import annotations

import urllib.request

from devcluster import build
from devcluster.cluster import Cluster, _spawn, _wait, component_port

COMPONENT = "coredns"
DOMAIN = "cluster.local"


def corefile(c: Cluster, ready_port: int) -> str:
    return f"""\
{DOMAIN}:53 {{
    bind {c.node_ip}
    kubernetes {DOMAIN} {{
        kubeconfig {c.kubeconfig}
        ttl 5
    }}
    ready 127.0.0.1:{ready_port}
    errors
}}
.:53 {{
    bind {c.node_ip}
    errors
}}
"""


def start(c: Cluster) -> None:
    """Start CoreDNS on ``c`` (the runner's bridge must be up) and wait until it has read the
    cluster's Services and endpoints."""
    ready_port = component_port()
    c.ports["coredns-ready"] = ready_port
    conf = c.state_dir / "Corefile"
    conf.write_text(corefile(c, ready_port))
    _spawn(c, COMPONENT, [str(build.tool(COMPONENT)), "-conf", str(conf)])
    _wait("CoreDNS", lambda: _ready(ready_port), 60, c, COMPONENT)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
