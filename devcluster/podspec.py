"""Pure decisions of the runner (no I/O): what a kubelet computes from a pod and its objects.

Everything here takes plain dicts (the API's JSON) and returns plain values, so it is tested
without a cluster (``tests/devcluster_tests/test_runner_units.py``).
"""

from __future__ import annotations

import base64
import ipaddress
import math
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

# The node's fake allocatable, also used for resourceFieldRef of containers without limits.
NODE_CAPACITY = {
    "cpu": "16",
    "memory": "64Gi",
    "pods": "110",
    "ephemeral-storage": "100Gi",
    "nvidia.com/gpu": "4",
}
TERMINATION_MESSAGE_LIMIT = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048


class ConfigError(Exception):
    """A container cannot be configured yet (missing ConfigMap/Secret/key): kubelet's
    CreateContainerConfigError. The message names what is missing."""


class VolumeError(Exception):
    """A volume cannot be set up (yet): the pod stays ContainerCreating with this message."""


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------------------------
# $(VAR) expansion, exactly like k8s.io/kubernetes/third_party/forked/golang/expansion


def expand(text: str, env: dict[str, str]) -> str:
    """Expand ``$(VAR)`` from ``env``; ``$$`` is a literal ``$``; unknown references stay."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    n = len(text)
    while cursor < n:
        if text[cursor] == "$" and cursor + 1 < n:
            out.append(text[checkpoint:cursor])
            nxt = text[cursor + 1]
            if nxt == "$":
                out.append("$")
                advance = 1
            elif nxt == "(":
                close = text.find(")", cursor + 2)
                if close == -1:
                    out.append("$(")
                    advance = 1
                else:
                    name = text[cursor + 2 : close]
                    out.append(env.get(name, f"$({name})"))
                    advance = close - cursor
            else:
                out.append("$" + nxt)
                advance = 1
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


# ---------------------------------------------------------------------------------------------
# Downward API


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity as a Decimal (``500m`` -> 0.5, ``1Gi`` -> 1073741824)."""
    from kubernetes.utils import parse_quantity as _pq

    return Decimal(_pq(value))


def field_value(pod: dict, path: str) -> str:
    """The value of a fieldRef ``fieldPath`` for this pod (status fields as currently known)."""
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    status = pod.get("status", {})
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f'{k}="{_escape(v)}"' for k, v in items)
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": status.get("podIP", ""),
        "status.hostIP": status.get("hostIP", ""),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or []),
        "status.hostIPs": ",".join(i["ip"] for i in status.get("hostIPs") or []),
    }
    if path not in simple:
        raise ConfigError(f"unsupported fieldRef fieldPath {path!r}")
    return simple[path]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def resource_value(
    pod: dict, container_name: str | None, resource: str, divisor: str | None = None
) -> str:
    """A resourceFieldRef value: ceil(quantity / divisor); unset limits fall back to the node's
    allocatable, unset requests to 0 (cpu requests to the cpu limit, as the kubelet does)."""
    containers = [*pod["spec"].get("containers", []), *pod["spec"].get("initContainers", [])]
    if container_name is None and containers:
        container_name = containers[0]["name"]
    container = next((c for c in containers if c["name"] == container_name), None)
    if container is None:
        raise ConfigError(f"resourceFieldRef names unknown container {container_name!r}")
    kind, _, name = resource.partition(".")
    res = container.get("resources") or {}
    value = (res.get(kind) or {}).get(name)
    if value is None and kind == "limits":
        value = NODE_CAPACITY.get(name, "0")
    if value is None:
        value = (res.get("limits") or {}).get(name, "0")
    qty = parse_quantity(value)
    div = parse_quantity(divisor or "1")
    if div == 0:
        div = Decimal(1)
    return str(math.ceil(qty / div))


# ---------------------------------------------------------------------------------------------
# Environment


def resolve_env(container: dict, pod: dict, lookup) -> dict[str, str]:
    """The container's environment as the kubelet builds it (envFrom, then env in order, each
    value expanded against what came before). ``lookup(kind, name)`` returns the object's data as
    ``{key: str}`` (``kind`` is ``configmap`` or ``secret``, secrets already decoded) or ``None``
    when the object does not exist. Raises ConfigError naming what is missing."""
    ns = pod["metadata"].get("namespace", "")
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            ref = src.get(key)
            if ref is None:
                continue
            data = lookup(kind, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{_kind_word(kind)} "{ref["name"]}" not found')
            for k, v in data.items():
                if "=" in (prefix + k):
                    continue
                env[prefix + k] = v
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item or "valueFrom" not in item:
            env[name] = expand(item.get("value", ""), env)
            continue
        vf = item["valueFrom"]
        if "fieldRef" in vf:
            env[name] = field_value(pod, vf["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in vf:
            r = vf["resourceFieldRef"]
            env[name] = resource_value(
                pod, r.get("containerName") or container["name"], r["resource"], r.get("divisor")
            )
        elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
            kind = "configmap" if "configMapKeyRef" in vf else "secret"
            ref = vf.get("configMapKeyRef") or vf.get("secretKeyRef")
            data = lookup(kind, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{_kind_word(kind)} "{ref["name"]}" not found')
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise ConfigError(
                    f"couldn't find key {ref['key']} in {_kind_title(kind)} {ns}/{ref['name']}"
                )
            env[name] = data[ref["key"]]
        else:
            raise ConfigError(f"env {name}: unsupported valueFrom {sorted(vf)}")
    return env


def _kind_word(kind: str) -> str:
    return "configmap" if kind == "configmap" else "secret"


def _kind_title(kind: str) -> str:
    return "ConfigMap" if kind == "configmap" else "Secret"


def decode_secret(obj: dict) -> dict[str, str]:
    out = {
        k: base64.b64decode(v).decode("utf-8", "replace")
        for k, v in (obj.get("data") or {}).items()
    }
    out.update(obj.get("stringData") or {})
    return out


def configmap_data(obj: dict) -> dict[str, str]:
    return dict(obj.get("data") or {})


def command_line(container: dict, env: dict[str, str]) -> list[str]:
    """command + args with $(VAR) expanded. The image is not used, so a container without a
    command cannot start: ConfigError-like ValueError."""
    command = container.get("command") or []
    if not command:
        raise ValueError(
            "the runner does not use images, so it cannot know the image's entrypoint: "
            "set spec.containers[].command to a program that exists on this machine"
        )
    return [expand(a, env) for a in [*command, *(container.get("args") or [])]]


# ---------------------------------------------------------------------------------------------
# Volume contents


def key_files(
    data: dict[str, bytes],
    items: list[dict] | None,
    default_mode: int | None,
    what: str,
    optional: bool,
) -> list[tuple[str, bytes, int]]:
    """Files (relative path, content, mode) for a configMap/secret volume or projection."""
    mode = 0o644 if default_mode is None else default_mode
    if not items:
        return [(k, v, mode) for k, v in sorted(data.items())]
    files = []
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise VolumeError(f"{what}: key {item['key']!r} not found")
        files.append((item["path"], data[item["key"]], item.get("mode", mode)))
    return files


def configmap_bytes(obj: dict) -> dict[str, bytes]:
    out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return out


def secret_bytes(obj: dict) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}


def downward_files(
    pod: dict, items: list[dict], default_mode: int | None
) -> list[tuple[str, bytes, int]]:
    mode = 0o644 if default_mode is None else default_mode
    files = []
    for item in items or []:
        if "fieldRef" in item:
            value = field_value(pod, item["fieldRef"]["fieldPath"])
        else:
            r = item["resourceFieldRef"]
            value = resource_value(pod, r.get("containerName"), r["resource"], r.get("divisor"))
        files.append((item["path"], value.encode(), item.get("mode", mode)))
    return files


def safe_relpath(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise VolumeError(f"invalid path {path!r} in volume items")
    return "/".join(parts)


# ---------------------------------------------------------------------------------------------
# Pod addresses


class IPAllocator:
    """Pod addresses from the pod range: never the network, broadcast or the node's address."""

    def __init__(self, cidr: str, node_ip: str):
        self.net = ipaddress.ip_network(cidr)
        self.node_ip = ipaddress.ip_address(node_ip)
        if self.node_ip not in self.net:
            raise ValueError(f"node IP {node_ip} is not inside the pod range {cidr}")
        self.used: dict[str, str] = {}  # ip -> owner
        self._next = int(self.net.network_address) + 1
        self._lock = threading.Lock()

    def allocate(self, owner: str) -> str:
        with self._lock:  # pods are set up from many threads
            return self._allocate(owner)

    def _allocate(self, owner: str) -> str:
        for ip, who in self.used.items():
            if who == owner:
                return ip
        first = int(self.net.network_address) + 1
        last = int(self.net.broadcast_address) - 1
        size = last - first + 1
        for i in range(size):
            cand = first + (self._next - first + i) % size
            addr = ipaddress.ip_address(cand)
            if addr == self.node_ip or str(addr) in self.used:
                continue
            self.used[str(addr)] = owner
            self._next = cand + 1
            return str(addr)
        raise RuntimeError(f"pod range {self.net} is exhausted")

    def release(self, owner: str) -> None:
        with self._lock:
            for ip in [ip for ip, who in self.used.items() if who == owner]:
                del self.used[ip]


def overlapping_routes(route_lines: list[str], cidr: str, own_device: str) -> list[str]:
    """Routes (lines of ``ip -4 route show table all``) that overlap ``cidr``, ignoring the
    default route and routes through our own bridge."""
    net = ipaddress.ip_network(cidr)
    bad = []
    for line in route_lines:
        words = line.split()
        if not words:
            continue
        if words[0] in (
            "local",
            "broadcast",
            "unicast",
            "multicast",
            "unreachable",
            "blackhole",
            "prohibit",
            "throw",
            "anycast",
        ):
            words = words[1:]
        if not words or words[0] == "default":
            continue
        if "dev" in words and words[words.index("dev") + 1] == own_device:
            continue
        try:
            dest = ipaddress.ip_network(
                words[0] if "/" in words[0] else f"{words[0]}/32", strict=False
            )
        except ValueError:
            continue
        if dest.version == 4 and dest.overlaps(net):
            bad.append(line.strip())
    return bad


# ---------------------------------------------------------------------------------------------
# Container and pod status


@dataclass
class ContainerRecord:
    """What the runner knows about one container of a pod."""

    name: str
    image: str
    kind: str = "main"  # main | init | sidecar
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "PodInitializing"
    message: str = ""
    exit_code: int | None = None
    signal: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    container_id: str = ""
    restart_count: int = 0
    last_state: dict | None = None
    ever_started: bool = False
    probe_ready: bool = True  # False until a readiness probe passes (no probe: ready)

    def waiting(self, reason: str, message: str = "") -> None:
        self.state, self.reason, self.message = "waiting", reason, message

    def terminated_dict(self) -> dict:
        d: dict[str, Any] = {
            "exitCode": self.exit_code if self.exit_code is not None else 0,
            "reason": self.reason,
        }
        if self.signal:
            d["signal"] = self.signal
        if self.message:
            d["message"] = self.message
        if self.started_at:
            d["startedAt"] = self.started_at
        d["finishedAt"] = self.finished_at or now_iso()
        if self.container_id:
            d["containerID"] = self.container_id
        return d

    def to_status(self) -> dict:
        if self.state == "running":
            state = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated_dict()}
        else:
            w: dict[str, str] = {"reason": self.reason}
            if self.message:
                w["message"] = self.message
            state = {"waiting": w}
        running = self.state == "running"
        st: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": self.image,
            "state": state,
            "lastState": {"terminated": self.last_state} if self.last_state else {},
            "ready": running and self.probe_ready,
            "restartCount": self.restart_count,
            "started": running,
        }
        if self.container_id:
            st["containerID"] = self.container_id
        return st


def exit_reason(exit_code: int) -> str:
    return "Completed" if exit_code == 0 else "Error"


def returncode_to_exit(returncode: int) -> tuple[int, int | None]:
    """Popen's returncode as (exit code, signal): a signal N death is 128+N, as runtimes say."""
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, None


def fallback_message(log_text: str) -> str:
    lines = log_text.splitlines()[-FALLBACK_LOG_LINES:]
    text = "\n".join(lines)
    return text[-FALLBACK_LOG_BYTES:]


def _condition(
    prev: dict[str, dict], ctype: str, ok: bool, reason: str = "", message: str = ""
) -> dict:
    status = "True" if ok else "False"
    old = prev.get(ctype)
    c: dict[str, Any] = {"type": ctype, "status": status, "lastProbeTime": None}
    c["lastTransitionTime"] = (
        old["lastTransitionTime"]
        if old and old.get("status") == status and old.get("lastTransitionTime")
        else now_iso()
    )
    if reason and not ok:
        c["reason"] = reason
    if message and not ok:
        c["message"] = message
    if ok and reason == "PodCompleted":
        c["reason"] = reason
    return c


def pod_phase(records: list[ContainerRecord], initialized: bool, terminal: str | None) -> str:
    if terminal:
        return terminal
    if not initialized:
        return "Pending"
    mains = [r for r in records if r.kind == "main"]
    if any(r.state == "running" or r.ever_started for r in mains):
        return "Running"
    return "Pending"


def terminal_phase(records: list[ContainerRecord]) -> str:
    """Succeeded when every main container exited 0, else Failed."""
    mains = [r for r in records if r.kind == "main"]
    ok = mains and all(r.state == "terminated" and r.exit_code == 0 for r in mains)
    return "Succeeded" if ok else "Failed"


def probe_target(probe: dict, container: dict) -> tuple[str, int, str] | None:
    """``("http", port, path)`` or ``("tcp", port, "")`` for a probe, named ports resolved from
    the container's ports; ``None`` for a probe this runner does not run (exec, grpc)."""
    kind = "http" if "httpGet" in probe else "tcp" if "tcpSocket" in probe else None
    if kind is None:
        return None
    action = probe["httpGet" if kind == "http" else "tcpSocket"]
    port = action.get("port")
    if isinstance(port, str) and not port.isdigit():
        named = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
        port = named.get(port)
    if port is None:
        return None
    return kind, int(port), action.get("path", "/") if kind == "http" else ""


def build_pod_status(
    pod: dict,
    records: list[ContainerRecord],
    *,
    pod_ip: str | None,
    host_ip: str,
    initialized: bool,
    sandbox_ready: bool,
    terminal: str | None = None,
    start_time: str | None = None,
    reason: str | None = None,
    message: str | None = None,
) -> dict:
    """The pod's status as a kubelet reports it."""
    prev = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
    phase = pod_phase(records, initialized, terminal)
    mains = [r for r in records if r.kind == "main"]
    sidecars = [r for r in records if r.kind == "sidecar"]
    unready = [r.name for r in [*sidecars, *mains] if r.state != "running" or not r.probe_ready]
    if terminal:
        ready, ready_reason, ready_msg = False, "PodCompleted", ""
    else:
        ready = not unready
        ready_reason = "ContainersNotReady"
        ready_msg = f"containers with unready status: [{' '.join(unready)}]"
    init_msg = (
        "containers with incomplete status: ["
        + " ".join(r.name for r in records if r.kind == "init" and r.state != "terminated")
        + "]"
    )
    conditions = [
        _condition(prev, "PodReadyToStartContainers", sandbox_ready and not terminal),
        _condition(
            prev,
            "Initialized",
            initialized,
            "ContainersNotInitialized",
            init_msg,
        ),
        _condition(prev, "Ready", ready, ready_reason, ready_msg),
        _condition(prev, "ContainersReady", ready, ready_reason, ready_msg),
    ]
    if terminal and all(r.state == "terminated" for r in mains):
        for c in conditions[2:]:
            c["reason"] = "PodCompleted"
            c.pop("message", None)
    sched = prev.get("PodScheduled") or {
        "type": "PodScheduled",
        "status": "True",
        "lastProbeTime": None,
        "lastTransitionTime": now_iso(),
    }
    conditions.append(sched)
    for ctype, c in prev.items():  # keep conditions others own (readiness gates, DisruptionTarget)
        if ctype not in {x["type"] for x in conditions}:
            conditions.append(c)
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "containerStatuses": [r.to_status() for r in mains],
    }
    inits = [r for r in records if r.kind in ("init", "sidecar")]
    if inits:
        statuses = []
        for r in inits:
            s = r.to_status()
            if r.kind == "init":
                s["ready"] = r.state == "terminated" and r.exit_code == 0
                s["started"] = r.state == "running"
            statuses.append(s)
        status["initContainerStatuses"] = statuses
    generation = (pod.get("metadata") or {}).get("generation")
    if generation:
        status["observedGeneration"] = generation
    if pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    if start_time:
        status["startTime"] = start_time
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    return status


@dataclass
class RestartBackoff:
    """CrashLoopBackOff delays: 10 s doubling to 5 min (the kubelet's defaults)."""

    base: float = 10.0
    cap: float = 300.0
    delays: dict[str, float] = field(default_factory=dict)

    def next(self, name: str) -> float:
        d = self.delays.get(name, 0.0)
        d = self.base if d == 0 else min(self.cap, d * 2)
        self.delays[name] = d
        return d


def should_restart(restart_policy: str, exit_code: int) -> bool:
    if restart_policy == "Always":
        return True
    if restart_policy == "OnFailure":
        return exit_code != 0
    return False
