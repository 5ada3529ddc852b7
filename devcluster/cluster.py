"""Start and stop a real control plane on this machine: the proving ground.

What runs, each a local process logging to ``<state>/logs/<name>.log``:

- etcd (built from source; Debian's 3.4 is too old for current API servers),
- kube-apiserver with TLS, client-certificate users, ``Node,RBAC`` authorization, ServiceAccount
  tokens (TokenRequest works) and the default admission chain with PodSecurity,
- kube-controller-manager (garbage collector, Job controller, the in-tree host-path provisioner
  behind a default StorageClass ``standard``, ServiceAccount tokens, CSR signing),
- kube-scheduler,
- KWOK, managing only nodes annotated ``kwok.x-k8s.io/node=fake``: ``kwok-cpu-*`` and
  ``kwok-gpu-*`` (``nvidia.com/gpu: 8``), where pods "run" and finish instantly; a pod annotated
  ``gft.dev/kwok-exit-code: "N"`` (and optionally ``gft.dev/kwok-reason``) fails with that code,
- the runner (``devcluster.runner``), playing the kubelet for node ``gft-runner`` so pods
  bound there really run here, each in a network namespace on a bridge of its own.

Ports are picked free at start; state lives in one folder; ``stop`` leaves no process behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from devcluster import build, pki

if TYPE_CHECKING:  # kubeapi needs the kubernetes package, which a GPU kit's pytest lacks
    from devcluster import kubeapi

RUNNER_NODE = "gft-runner"
KWOK_CPU_NODES = ("kwok-cpu-0", "kwok-cpu-1")
KWOK_GPU_NODES = ("kwok-gpu-0", "kwok-gpu-1")
SERVICE_CIDR = "10.96.0.0/16"
# Fake pod IPs for KWOK's pods. Something may still try them (the operator reads the metrics
# of every running pod, and the API server proxies to pod IPs), so the range gets an
# `unreachable` route while the proving ground runs: a connect fails at once, on this machine.
KWOK_POD_CIDR = os.environ.get("GFT_KWOK_POD_CIDR", "198.18.0.0/16")
"""KWOK's pod addresses: RFC 2544's benchmarking range, where no resolver or host lives. The
route to it is the machine's own, so a benchmark that serves fake trainers there while other
proving grounds start (each routes the range as unreachable) picks a range of its own:
``GFT_KWOK_POD_CIDR=198.19.0.0/16`` (the other half of RFC 2544's)."""
POD_CIDR_CANDIDATES = (*(f"10.{n}.0.0/16" for n in range(244, 254)), "172.30.0.0/16")
STOP_ORDER = (
    "kueue",  # started on demand by devcluster.kueue
    "coredns",
    "runner",
    "kwok",
    "kube-scheduler",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
)


class ClusterError(RuntimeError):
    """The proving ground could not start; the message says why and what to do."""


def default_state_dir() -> Path:
    return Path(os.environ.get("GFT_CLUSTER_DIR", "/tmp/gft-proving-ground"))


# ---------------------------------------------------------------------------------------------
# Pure decisions


def nameservers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """This machine's DNS resolvers (IPv4): no range the proving ground routes may hold one,
    or every lookup on the machine fails while it runs (package installs among them)."""
    try:
        text = resolv_conf.read_text()
    except OSError:
        return []
    found = re.findall(r"^\s*nameserver\s+(\d+\.\d+\.\d+\.\d+)", text, re.MULTILINE)
    return found


def choose_pod_cidr(route_lines: list[str], taken: list[str] = ()) -> ipaddress.IPv4Network:
    """The first candidate range that no route of this machine (but the default) overlaps."""
    used = []
    for line in route_lines:
        dest = line.split()[0] if line.strip() else ""
        if not dest or dest == "default":
            continue
        with contextlib.suppress(ValueError):
            used.append(ipaddress.ip_network(dest if "/" in dest else f"{dest}/32", strict=False))
    used += [ipaddress.ip_network(t) for t in taken]
    for candidate in POD_CIDR_CANDIDATES:
        net = ipaddress.ip_network(candidate)
        if not any(net.overlaps(u) for u in used):
            return net
    raise ClusterError(
        "every candidate pod range overlaps a route of this machine "
        f"({', '.join(POD_CIDR_CANDIDATES)}); remove a stale bridge (ip link show type bridge) "
        "or free one of those ranges"
    )


def bridge_name(state_dir: Path) -> str:
    """A Linux interface name (at most 15 characters) unique to this state folder."""
    return "gftbr" + hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]


def free_port(host: str = "127.0.0.1") -> int:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    except OSError as e:
        raise ClusterError(
            f"no free TCP port on {host} ({e}); the machine's ephemeral ports are exhausted. "
            "Stop stray servers (ss -ltnp) and try again"
        ) from e


def component_port(host: str = "127.0.0.1") -> int:
    """A free port for a control-plane component, below the kernel's ephemeral range.

    A port the kernel handed out (``free_port``) may be given again, meanwhile, as the source
    port of one of the many client connections a busy test session opens; the component that
    binds it seconds later then fails with "address already in use". Ports from outside that
    range are never given to clients."""
    low, high = _ephemeral_range()
    band = range(20000, low) if low > 21000 else range(high + 1, 65536)
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(band)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    return free_port(host)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# ---------------------------------------------------------------------------------------------
# The running cluster, as tests and tools see it


@dataclass
class Cluster:
    state_dir: Path
    bin_dir: Path
    server: str
    node_ip: str
    pod_cidr: str
    bridge: str
    ports: dict[str, int]
    pids: dict[str, int] = field(default_factory=dict)
    runner_node: str = RUNNER_NODE
    commands: dict[str, list[str]] = field(default_factory=dict)
    """How each component was started, so that a test can stop and start it again."""

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    @property
    def api(self) -> kubeapi.Api:
        """An API client on a kept-alive connection pool, one per proving ground: what polling
        loops read with (a kubectl process costs some 60 ms of CPU a call, so a wait reading
        twice a second took a tenth of a core)."""
        return _api(str(self.kubeconfig), self.server)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, env=self.env
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, cmd, result.stdout, result.stderr
            )
        return result

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def save(self) -> None:
        data = asdict(self)
        data["state_dir"] = str(self.state_dir)
        data["bin_dir"] = str(self.bin_dir)
        (self.state_dir / "cluster.json").write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> Cluster | None:
        path = state_dir / "cluster.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        data["state_dir"] = Path(data["state_dir"])
        data["bin_dir"] = Path(data["bin_dir"])
        return cls(**data)

    def alive(self) -> dict[str, bool]:
        return {name: _pid_alive(pid) for name, pid in self.pids.items()}

    def stop_component(self, name: str) -> None:
        """Stop one component (``kube-apiserver``, ``etcd``...) as a crash or an upgrade
        would: SIGTERM, then SIGKILL after 10 s."""
        _terminate(self.pids[name], grace=10)

    def start_component(self, name: str) -> None:
        """Start a stopped component again with the command it had, and wait until it
        answers (etcd and kube-apiserver keep their data: the cluster carries on)."""
        if _pid_alive(self.pids.get(name, 0)):
            raise ClusterError(f"{name} is still running")
        _spawn(self, name, self.commands[name])
        checks = {
            "etcd": lambda: _http_ok(f"http://127.0.0.1:{self.ports['etcd']}/health"),
            "kube-apiserver": lambda: _https_ok(self, "/readyz"),
        }
        if name in checks:
            _wait(name, checks[name], 90, self, name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Starting


def _spawn(cluster: Cluster, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
    logs = cluster.state_dir / "logs"
    logs.mkdir(exist_ok=True)
    log = (logs / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=env or _clean_env(),
        cwd=cluster.state_dir,
    )
    log.close()
    cluster.pids[name] = proc.pid
    if env is None:
        cluster.commands[name] = cmd
    cluster.save()


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KUBECONFIG", None)
    return env


def _wait(
    what: str, check, timeout: float, cluster: Cluster, log_name: str | tuple[str, ...] | None
) -> None:
    """Wait for ``check``; give up early when a watched component dies, showing its log."""
    watched = (log_name,) if isinstance(log_name, str) else (log_name or ())
    deadline = time.monotonic() + timeout
    dead: str | None = None
    while time.monotonic() < deadline and dead is None:
        if check():
            return
        dead = next((n for n in watched if not _pid_alive(cluster.pids.get(n, 0))), None)
        time.sleep(0.2)
    shown = dead or (watched[0] if len(watched) == 1 else None)
    hint = f" ({dead} exited)" if dead else ""
    if shown:
        log = cluster.state_dir / "logs" / f"{shown}.log"
        tail = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
        hint += f"\n  log: {log}\n--- last lines ---\n" + "\n".join(tail)
    raise ClusterError(f"{what} did not become ready within {timeout:.0f}s{hint}")


def _https_ok(cluster: Cluster, path: str) -> bool:
    ctx = ssl.create_default_context(cafile=str(cluster.pki_dir / "ca.crt"))
    ctx.load_cert_chain(str(cluster.pki_dir / "admin.crt"), str(cluster.pki_dir / "admin.key"))
    try:
        with urllib.request.urlopen(cluster.server + path, context=ctx, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _routes() -> list[str]:
    try:
        out = subprocess.run(
            ["ip", "-4", "route", "show", "table", "all"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise ClusterError(
            f"cannot read this machine's routes with `ip -4 route` ({e}); install iproute2"
        ) from e
    return out.splitlines()


def _check_netns_permitted() -> None:
    probe = f"gftprobe{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        raise ClusterError(
            "network namespaces are not permitted here (`ip netns add` said: "
            f"{result.stderr.strip()}). The runner needs root (or CAP_NET_ADMIN and "
            "CAP_SYS_ADMIN) to give pods addresses the API server can reach"
        )
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _apiserver_cmd(c: Cluster) -> list[str]:
    p = c.pki_dir
    return [
        str(c.bin_dir / "kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{c.ports['etcd']}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        # A loopback advertise address would be refused as an endpoint of `kubernetes`.
        "--endpoint-reconciler-type=none",
        f"--secure-port={c.ports['apiserver']}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--client-ca-file={p / 'ca.crt'}",
        f"--tls-cert-file={p / 'apiserver.crt'}",
        f"--tls-private-key-file={p / 'apiserver.key'}",
        f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
        "--kubelet-preferred-address-types=InternalIP,Hostname",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={p / 'sa.pub'}",
        f"--service-account-signing-key-file={p / 'sa.key'}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction,PodSecurity,DefaultStorageClass,"
        "ResourceQuota,Priority,ServiceAccount,NamespaceLifecycle,LimitRanger,"
        # A child with blockOwnerDeletion needs update on its owner's finalizers.
        "OwnerReferencesPermissionEnforcement",
        "--allow-privileged=true",
        "--profiling=false",
        f"--audit-log-path={c.state_dir / 'logs' / 'audit.log'}",
        f"--audit-policy-file={c.state_dir / 'audit-policy.yaml'}",
        "--audit-log-maxsize=200",
        "--audit-log-maxbackup=1",
    ]


AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    # Metadata for writes only: enough to count who changed what, cheap enough to keep on.
    "omitStages": ["RequestReceived"],
    "rules": [
        # Everything the operator does, reads included: its RBAC is checked against this.
        {"level": "Metadata", "users": ["system:serviceaccount:gft-system:gft-operator"]},
        {"level": "None", "verbs": ["get", "list", "watch"]},
        {"level": "None", "resources": [{"group": "coordination.k8s.io", "resources": ["leases"]}]},
        {"level": "Metadata"},
    ],
}


def _fake_nodes() -> list[dict]:
    nodes = []
    for name in (*KWOK_CPU_NODES, *KWOK_GPU_NODES):
        gpu = name in KWOK_GPU_NODES
        labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
        }
        capacity = {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "500Gi"}
        if gpu:
            labels |= {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                "nvidia.com/gpu.count": "8",
            }
            capacity["nvidia.com/gpu"] = "8"
        nodes.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": labels,
                    "annotations": {
                        "kwok.x-k8s.io/node": "fake",
                        "node.alpha.kubernetes.io/ttl": "0",
                    },
                },
                "spec": {},
                "status": {"capacity": capacity, "allocatable": capacity},
            }
        )
    return nodes


BOOTSTRAP_OBJECTS: list[dict] = [
    {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": "standard",
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": "kubernetes.io/host-path",
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    },
]


def _kwok_stages() -> list[dict]:
    """KWOK's pod lifecycle, plus one stage that fails a pod on purpose.

    A pod annotated ``gft.dev/kwok-exit-code`` ends Failed with that exit code (and the reason
    in ``gft.dev/kwok-reason``, default Error) instead of Succeeded; one annotated
    ``gft.dev/kwok-keep-running`` stays Running until it is deleted.
    """
    now = "{{ $now := Now }}"
    ready = (
        now
        + """
conditions:
- {type: Initialized, status: "True", lastTransitionTime: {{ $now | Quote }}}
- {type: Ready, status: "True", lastTransitionTime: {{ $now | Quote }}}
- {type: ContainersReady, status: "True", lastTransitionTime: {{ $now | Quote }}}
containerStatuses:
{{ range .spec.containers }}
- {name: {{ .name | Quote }}, image: {{ .image | Quote }}, ready: true, restartCount: 0,
   started: true, state: {running: {startedAt: {{ $now | Quote }}}}}
{{ end }}
initContainerStatuses:
{{ range .spec.initContainers }}
{{ if eq (or .restartPolicy "") "Always" }}
- {name: {{ .name | Quote }}, image: {{ .image | Quote }}, ready: true, restartCount: 0,
   started: true, state: {running: {startedAt: {{ $now | Quote }}}}}
{{ else }}
- {name: {{ .name | Quote }}, image: {{ .image | Quote }}, ready: true, restartCount: 0,
   state: {terminated: {exitCode: 0, reason: Completed, startedAt: {{ $now | Quote }},
   finishedAt: {{ $now | Quote }}}}}
{{ end }}
{{ end }}
hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
podIP: {{ PodIPWith .spec.nodeName false .metadata.uid .metadata.name .metadata.namespace | Quote }}
phase: Running
startTime: {{ $now | Quote }}
"""
    )

    def finished(exit_code: str, reason: str, phase: str) -> str:
        return (
            now
            + f"""
conditions:
- {{type: Ready, status: "False", reason: PodCompleted, lastTransitionTime: {{{{ $now | Quote }}}}}}
- {{type: ContainersReady, status: "False", reason: PodCompleted,
   lastTransitionTime: {{{{ $now | Quote }}}}}}
containerStatuses:
{{{{ range .spec.containers }}}}
- {{name: {{{{ .name | Quote }}}}, image: {{{{ .image | Quote }}}}, ready: false, restartCount: 0,
   started: false, state: {{terminated: {{exitCode: {exit_code}, reason: {reason},
   startedAt: {{{{ $now | Quote }}}}, finishedAt: {{{{ $now | Quote }}}}}}}}}}
{{{{ end }}}}
phase: {phase}
"""
        )

    def stage(name: str, expressions: list[dict], nxt: dict, delay_ms: int = 0) -> dict:
        spec: dict[str, Any] = {
            "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
            "selector": {"matchExpressions": expressions},
            "next": nxt,
        }
        if delay_ms:
            spec["delay"] = {"durationMilliseconds": delay_ms}
        return {
            "apiVersion": "kwok.x-k8s.io/v1alpha1",
            "kind": "Stage",
            "metadata": {"name": name},
            "spec": spec,
        }

    alive = {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"}
    running = {"key": ".status.phase", "operator": "In", "values": ["Running"]}
    job_owned = {"key": ".metadata.ownerReferences.[].kind", "operator": "In", "values": ["Job"]}
    fail_code = '.metadata.annotations["gft.dev/kwok-exit-code"]'
    keep_running = '.metadata.annotations["gft.dev/kwok-keep-running"]'
    exit_expr = '{{ index $.metadata.annotations "gft.dev/kwok-exit-code" }}'
    reason_expr = '{{ or (index $.metadata.annotations "gft.dev/kwok-reason") "Error" }}'
    return [
        stage(
            "pod-ready",
            [alive, {"key": ".status.podIP", "operator": "DoesNotExist"}],
            {"statusTemplate": ready},
        ),
        stage(
            "pod-fail-on-purpose",
            [alive, running, {"key": fail_code, "operator": "Exists"}],
            {"statusTemplate": finished(exit_expr, reason_expr, "Failed")},
            delay_ms=500,
        ),
        stage(
            "pod-complete",
            [
                alive,
                running,
                job_owned,
                {"key": fail_code, "operator": "DoesNotExist"},
                {"key": keep_running, "operator": "DoesNotExist"},
            ],
            {"statusTemplate": finished("0", "Completed", "Succeeded")},
            delay_ms=500,
        ),
        stage(
            "pod-delete",
            [{"key": ".metadata.deletionTimestamp", "operator": "Exists"}],
            {"finalizers": {"empty": True}, "delete": True},
        ),
    ]


def start(state_dir: Path | None = None, say=print, runner: bool = True) -> Cluster:
    """Bring the proving ground up; raise ClusterError (with a log excerpt) if it cannot."""
    state_dir = (state_dir or default_state_dir()).resolve()
    existing = Cluster.load(state_dir)
    if existing is not None:
        alive = [n for n, up in existing.alive().items() if up]
        if alive:
            raise ClusterError(
                f"a proving ground is already running from {state_dir} "
                f"({', '.join(alive)} alive); use it (KUBECONFIG={existing.kubeconfig}) "
                "or stop it first with `make cluster-down`"
            )
        stop(state_dir, say=lambda *_: None)

    t0 = time.monotonic()
    bin_dir = build.build(say=say)
    # Proving grounds that start at once (the suite's sessions) would pick the same free pod
    # range before either made its bridge: one starts at a time.
    with starting_alone():
        _check_netns_permitted()
        kwok_range = ipaddress.ip_network(KWOK_POD_CIDR)
        hidden = [ns for ns in nameservers() if ipaddress.ip_address(ns) in kwok_range]
        if hidden:
            raise ClusterError(
                f"this machine's DNS resolver {hidden[0]} (/etc/resolv.conf) is inside KWOK's pod "
                f"range {KWOK_POD_CIDR}, which the proving ground routes as unreachable: every "
                "lookup would fail while it runs; change KWOK_POD_CIDR in devcluster/cluster.py"
            )
        pod_net = choose_pod_cidr(_routes(), [f"{ns}/32" for ns in nameservers()])
        node_ip = str(next(pod_net.hosts()))
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "logs").mkdir(exist_ok=True)
        components = ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")
        ports = {name: component_port() for name in components}
        cluster = Cluster(
            state_dir=state_dir,
            bin_dir=bin_dir,
            server=f"https://127.0.0.1:{ports['apiserver']}",
            node_ip=node_ip,
            pod_cidr=str(pod_net),
            bridge=bridge_name(state_dir),
            ports=ports,
        )
        cluster.save()
        try:
            _start_processes(cluster, runner)
        except BaseException:
            stop(state_dir, say=lambda *_: None)
            raise
    say(
        f"proving ground up in {time.monotonic() - t0:.1f}s: {cluster.server}, "
        f"runner node {RUNNER_NODE} on {cluster.pod_cidr}"
    )
    return cluster


@functools.cache
def _api(kubeconfig: str, server: str) -> kubeapi.Api:
    """``server`` keys it too: a proving ground started again in the same folder has new ports."""
    from devcluster import kubeapi

    return kubeapi.Api(kubeconfig)


@contextlib.contextmanager
def starting_alone() -> Iterator[None]:
    """Hold this machine's proving-ground start lock (beside the built binaries: one place
    whatever TMPDIR a session has)."""
    path = build.cache_root() / "proving-ground-start.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _start_processes(c: Cluster, runner: bool) -> None:
    pki_dir = c.pki_dir
    pki.make_pki(pki_dir, ["127.0.0.1", c.node_ip])
    (c.state_dir / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))
    pki.write_kubeconfig(c.kubeconfig, c.server, pki_dir, "admin", "kubernetes-admin")
    for component in ("controller-manager", "scheduler"):
        pki.write_kubeconfig(
            c.state_dir / f"{component}.kubeconfig",
            c.server,
            pki_dir,
            component,
            f"system:kube-{component}",
        )

    _spawn(
        c,
        "etcd",
        [
            str(c.bin_dir / "etcd"),
            "--name=gft",
            f"--data-dir={c.state_dir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{c.ports['etcd']}",
            f"--advertise-client-urls=http://127.0.0.1:{c.ports['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{c.ports['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{c.ports['etcd-peer']}",
            f"--initial-cluster=gft=http://127.0.0.1:{c.ports['etcd-peer']}",
            # A throwaway cluster: durability is not worth an fsync per write.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
    )
    _wait("etcd", lambda: _http_ok(f"http://127.0.0.1:{c.ports['etcd']}/health"), 30, c, "etcd")
    _spawn(c, "kube-apiserver", _apiserver_cmd(c))
    _wait("kube-apiserver", lambda: _https_ok(c, "/readyz"), 90, c, "kube-apiserver")

    common = [
        f"--authentication-kubeconfig={c.state_dir / 'controller-manager.kubeconfig'}",
        f"--authorization-kubeconfig={c.state_dir / 'controller-manager.kubeconfig'}",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
    ]
    _spawn(
        c,
        "kube-controller-manager",
        [
            str(c.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={c.state_dir / 'controller-manager.kubeconfig'}",
            *common,
            f"--secure-port={c.ports['controller-manager']}",
            f"--service-account-private-key-file={pki_dir / 'sa.key'}",
            f"--root-ca-file={pki_dir / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki_dir / 'ca.crt'}",
            f"--cluster-signing-key-file={pki_dir / 'ca.key'}",
            "--use-service-account-credentials=true",
            "--controllers=*,bootstrapsigner,tokencleaner",
            "--enable-hostpath-provisioner=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
        ],
    )
    sched_common = [
        a.replace("controller-manager.kubeconfig", "scheduler.kubeconfig") for a in common
    ]
    _spawn(
        c,
        "kube-scheduler",
        [
            str(c.bin_dir / "kube-scheduler"),
            f"--kubeconfig={c.state_dir / 'scheduler.kubeconfig'}",
            *sched_common,
            f"--secure-port={c.ports['scheduler']}",
        ],
    )

    subprocess.run(
        ["ip", "route", "replace", "unreachable", KWOK_POD_CIDR], check=True, capture_output=True
    )
    stages = c.state_dir / "kwok.yaml"
    kwok_config = {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokConfiguration",
        "options": {
            "manageAllNodes": False,
            "manageNodesWithAnnotationSelector": "kwok.x-k8s.io/node=fake",
            "cidr": KWOK_POD_CIDR,
            "nodeIP": str(ipaddress.ip_network(KWOK_POD_CIDR)[-2]),
            "serverAddress": f"127.0.0.1:{c.ports['kwok']}",
            "nodeLeaseDurationSeconds": 40,
        },
    }
    stages.write_text(yaml.safe_dump_all([kwok_config, *_kwok_stages()], sort_keys=False))
    _spawn(
        c, "kwok", [str(c.bin_dir / "kwok"), f"--kubeconfig={c.kubeconfig}", f"--config={stages}"]
    )

    if runner:
        runner_env = _clean_env()
        runner_env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        # The programs of images other than ours that pods here run by name: oauth2-proxy (the
        # dashboard's sidecar with dashboard.auth=proxy), built by `make tools`.
        runner_env["PATH"] = os.pathsep.join(
            [str(build.tool("oauth2-proxy").parent), runner_env.get("PATH", os.defpath)]
        )
        _spawn(
            c,
            "runner",
            [
                sys.executable,
                "-m",
                "devcluster.runner",
                "--kubeconfig",
                str(c.kubeconfig),
                "--node-name",
                RUNNER_NODE,
                "--node-ip",
                c.node_ip,
                "--pod-cidr",
                c.pod_cidr,
                "--bridge",
                c.bridge,
                "--state-dir",
                str(c.state_dir / "runner"),
                "--port-forward",
                str(build.port_forward_binary()),
                # CoreDNS listens on the node's bridge address once the runner has made it.
                "--cluster-dns",
                c.node_ip,
            ],
            env=runner_env,
        )

    objects = [*BOOTSTRAP_OBJECTS, *_fake_nodes()]
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))

    want = {*KWOK_CPU_NODES, *KWOK_GPU_NODES} | ({RUNNER_NODE} if runner else set())
    missing: list[str] = []

    def settled() -> bool:
        try:
            nodes = c.kubectl_json("get", "nodes")["items"]
        except (subprocess.SubprocessError, ValueError):
            missing[:] = ["an answer to `kubectl get nodes`"]
            return False
        ready = {
            n["metadata"]["name"]
            for n in nodes
            if any(
                cond["type"] == "Ready" and cond["status"] == "True"
                for cond in n.get("status", {}).get("conditions", [])
            )
        }
        sa = c.kubectl("get", "serviceaccount", "default", "-n", "default", check=False)
        missing[:] = [f"node {n} Ready" for n in sorted(want - ready)]
        if sa.returncode != 0:
            missing.append("ServiceAccount default/default (kube-controller-manager makes it)")
        return not missing

    components = ("kube-controller-manager", "kube-scheduler", "kwok") + (
        ("runner",) if runner else ()
    )
    try:
        # A component that dies (say, its port was taken meanwhile) is named, with its log.
        _wait("nodes Ready and the default ServiceAccount", settled, 90, c, components)
    except ClusterError as e:
        raise ClusterError(f"{e}\n  still missing: {', '.join(missing)}") from None
    for name in components:
        if not _pid_alive(c.pids[name]):
            _wait(name, lambda: False, 0, c, name)  # raises, with its log
    if runner:
        from devcluster import dns

        dns.start(c)


# ---------------------------------------------------------------------------------------------
# Stopping


def _terminate(pid: int, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.05)


def _hostpath_volumes(c: Cluster) -> list[Path]:
    """Folders the host-path provisioner made for this cluster's volumes (under /tmp)."""
    try:
        pvs = c.kubectl_json("get", "pv")["items"]
    except (subprocess.SubprocessError, OSError, ValueError):
        return []
    paths = [Path(pv["spec"].get("hostPath", {}).get("path", "")) for pv in pvs]
    return [p for p in paths if str(p).startswith("/tmp/hostpath_pv/")]


def stop(state_dir: Path | None = None, say=print) -> None:
    """Stop every process of this proving ground and remove its state; safe to repeat."""
    state_dir = (state_dir or default_state_dir()).resolve()
    cluster = Cluster.load(state_dir)
    if cluster is None:
        if state_dir.exists():
            shutil.rmtree(state_dir, ignore_errors=True)
        say(f"no proving ground at {state_dir}")
        return
    volumes = _hostpath_volumes(cluster) if cluster.alive().get("kube-apiserver") else []
    forwards = state_dir / "demo-port-forward.pid"  # the demo's port-forwards, left running
    for pid in (int(x) for x in (forwards.read_text().split() if forwards.exists() else [])):
        if _pid_alive(pid):
            _terminate(pid, grace=5)
    for name in STOP_ORDER:
        pid = cluster.pids.get(name)
        if pid and _pid_alive(pid):
            # The runner stops its pods (each with its grace period) before it exits.
            _terminate(pid, grace=30 if name == "runner" else 10)
    for path in volumes:
        shutil.rmtree(path, ignore_errors=True)
    _remove_network_leftovers(cluster)
    shutil.rmtree(state_dir, ignore_errors=True)
    say(f"proving ground at {state_dir} stopped")


def _kwok_range_shared(c: Cluster) -> bool:
    """Whether another proving ground on this machine runs KWOK on the same pod range (its
    config file, named on its command line, says which)."""
    ours = str(c.state_dir)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if not args[0].endswith("kwok") or any(ours in a for a in args):
                continue
            config = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
            options = next(yaml.safe_load_all(Path(config).read_text()))["options"]
        except (OSError, StopIteration, KeyError, TypeError, yaml.YAMLError):
            continue
        if options.get("cidr") == KWOK_POD_CIDR:
            return True
    return False


def _remove_network_leftovers(c: Cluster) -> None:
    """The runner removes its bridge and namespaces on exit; this catches a crashed runner."""
    subprocess.run(["ip", "link", "del", c.bridge], capture_output=True)
    if not _kwok_range_shared(c):  # the range's route is every proving ground's that uses it
        subprocess.run(["ip", "route", "del", "unreachable", KWOK_POD_CIDR], capture_output=True)
    marker = c.state_dir / "runner" / "netns.txt"
    if marker.exists():
        for ns in marker.read_text().split():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# ---------------------------------------------------------------------------------------------
# Command line


def ensure_up(state_dir: Path, say=print) -> Cluster:
    """The proving ground, reusing one that is fully running; one half-dead (a component
    stopped, or a machine restarted under it) is replaced."""
    existing = Cluster.load(state_dir)
    if existing is not None:
        alive = existing.alive()
        if (
            all(alive.values())
            and existing.kubectl("get", "--raw", "/readyz", check=False).returncode == 0
        ):
            say(f"reusing the proving ground running from {state_dir}")
            return existing
        stopped = ", ".join(n for n, up in alive.items() if not up) or "the API server"
        say(f"the proving ground at {state_dir} is not healthy ({stopped} down): restarting it")
        stop(state_dir, say=lambda *_: None)
    return start(state_dir, say=say)


def cli(command: str) -> int:
    state_dir = default_state_dir()
    try:
        if command == "up":
            cluster = ensure_up(state_dir)
            print(f"kubectl: {cluster.bin_dir / 'kubectl'}")
            print(f"logs:    {cluster.state_dir / 'logs'}")
            print(cluster.kubeconfig)
        elif command == "down":
            stop(state_dir)
        elif command == "status":
            cluster = Cluster.load(state_dir)
            if cluster is None:
                print(f"no proving ground at {state_dir}")
                return 1
            for name, up in cluster.alive().items():
                print(f"{name:24s} {'running' if up else 'STOPPED'} (pid {cluster.pids[name]})")
            print(cluster.kubeconfig)
        elif command == "demo":
            from devcluster import demo

            return demo.main()
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
