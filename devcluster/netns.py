"""The runner's network: one bridge carrying the node's address, one network namespace per pod.

Traffic never leaves this machine: the pods' only route is the bridge, and a policy-routing rule
sends anything arriving from the bridge that is not for this machine or the pod range to an
``unreachable`` route, so nothing is forwarded out even where IP forwarding is on.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import threading
import time
import zlib

from devcluster.podspec import overlapping_routes

log = logging.getLogger("runner.net")

NETNS_PREFIX = "gft-"


class NetworkError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetworkError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def _table(bridge: str) -> str:
    return str(10000 + zlib.crc32(bridge.encode()) % 50000)


def netns_name(uid: str) -> str:
    return NETNS_PREFIX + uid.replace("-", "")[:10]


def veth_name(uid: str) -> str:
    return "gv" + uid.replace("-", "")[:10]


class Network:
    def __init__(self, bridge: str, node_ip: str, pod_cidr: str, marker_file: str):
        self.bridge = bridge
        self.node_ip = node_ip
        self.net = ipaddress.ip_network(pod_cidr)
        self.marker_file = marker_file
        self.table = _table(bridge)
        self.lock = threading.Lock()

    # -- bridge ---------------------------------------------------------------------------------

    def setup(self) -> None:
        self.cleanup_stale()
        routes = ip("-4", "route", "show", "table", "all").stdout.splitlines()
        bad = overlapping_routes(routes, str(self.net), self.bridge)
        if bad:
            raise NetworkError(
                f"the pod range {self.net} overlaps routes of this machine: {bad}; choose "
                "a --pod-cidr that no route uses (ip -4 route show table all)"
            )
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.node_ip}/{self.net.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        # Nothing from the pods is ever forwarded off this machine.
        ip("rule", "add", "iif", self.bridge, "priority", self.table, "table", self.table)
        ip("route", "add", str(self.net), "dev", self.bridge, "table", self.table)
        ip("route", "add", "unreachable", "default", "table", self.table)
        log.info(
            "bridge %s up with %s/%d (pods get addresses from %s)",
            self.bridge,
            self.node_ip,
            self.net.prefixlen,
            self.net,
        )

    def teardown(self) -> None:
        for ns in self._recorded():
            self.delete_pod_netns(ns)
        for ns in self._namespaces_in_range():
            self.delete_pod_netns(ns)
        self._remove_bridge()

    def _remove_bridge(self) -> None:
        for _ in range(5):
            if ip("rule", "del", "iif", self.bridge, "table", self.table, check=False).returncode:
                break
        ip("route", "flush", "table", self.table, check=False)
        if ip("link", "show", self.bridge, check=False).returncode == 0:
            ip("link", "del", self.bridge, check=False)
            log.info("bridge %s removed", self.bridge)

    def cleanup_stale(self) -> None:
        """Leftovers of a crashed run: namespaces we recorded or whose address is in our range,
        host ends of veths without a peer, and the bridge itself."""
        stale = set(self._recorded()) | set(self._namespaces_in_range())
        for ns in sorted(stale):
            log.info("removing stale network namespace %s", ns)
            self.delete_pod_netns(ns)
        self._remove_bridge()
        self._remove_detached_rules()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.marker_file)

    def _remove_detached_rules(self) -> None:
        """Policy rules of runners that crashed with their bridge gone (``[detached]``)."""
        for line in ip("rule", "list", check=False).stdout.splitlines():
            words = line.split()
            if "iif" not in words or "[detached]" not in words or "lookup" not in words:
                continue
            dev = words[words.index("iif") + 1]
            table = words[words.index("lookup") + 1]
            if not dev.startswith("gftbr"):
                continue
            ip("rule", "del", "iif", dev, "table", table, check=False)
            ip("route", "flush", "table", table, check=False)
            log.info("removed the stale routing rule of bridge %s", dev)

    def _recorded(self) -> list[str]:
        try:
            with open(self.marker_file) as f:
                return f.read().split()
        except FileNotFoundError:
            return []

    def _record(self, ns: str, add: bool) -> None:
        with self.lock:  # pods are set up and torn down from many threads
            names = [n for n in self._recorded() if n != ns]
            if add:
                names.append(ns)
            tmp = self.marker_file + ".tmp"
            with open(tmp, "w") as f:
                f.write("\n".join(names) + ("\n" if names else ""))
            os.replace(tmp, self.marker_file)

    def _namespaces_in_range(self) -> list[str]:
        out = []
        for line in ip("netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if not name.startswith(NETNS_PREFIX):
                continue
            addrs = ip("-n", name, "-4", "-o", "addr", "show", check=False).stdout
            for a in addrs.split():
                if "/" in a:
                    try:
                        if ipaddress.ip_interface(a).ip in self.net:
                            out.append(name)
                            break
                    except ValueError:
                        pass
        return out

    # -- per pod --------------------------------------------------------------------------------

    def create_pod_netns(self, uid: str, pod_ip: str) -> str:
        ns, host = netns_name(uid), veth_name(uid)
        peer = "gp" + uid.replace("-", "")[:10]
        self.delete_pod_netns(ns)
        ip("link", "del", host, check=False)
        self._record(ns, True)
        ip("netns", "add", ns)
        ip("link", "add", host, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", ns)
        ip("link", "set", host, "master", self.bridge)
        ip("link", "set", host, "up")
        ip("-n", ns, "link", "set", peer, "name", "eth0")
        ip("-n", ns, "addr", "add", f"{pod_ip}/{self.net.prefixlen}", "dev", "eth0")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "route", "add", "default", "via", self.node_ip)
        return ns

    def delete_pod_netns(self, ns: str) -> None:
        """Kill whatever still runs in the namespace, then remove it (its veth goes with it)."""
        if ip("netns", "pids", ns, check=False).returncode == 0:
            for _ in range(3):
                pids = [
                    int(p)
                    for p in ip("netns", "pids", ns, check=False).stdout.split()
                    if p.isdigit()
                ]
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)
            ip("netns", "del", ns, check=False)
        suffix = ns[len(NETNS_PREFIX) :]
        ip("link", "del", "gv" + suffix, check=False)
        if os.path.exists(self.marker_file):
            self._record(ns, False)
