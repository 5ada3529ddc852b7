"""Fake trainers for the pods on KWOK's nodes: ``kwok_pods_served`` routes KWOK's pod range
into a network namespace made here, whose loopback owns the whole range (``ip route add local
RANGE dev lo``); one process there answers on every address of the range as that pod's trainer
(the address a request came to says which pod it plays). So an operator reading pod IPs, or the
API server proxying to them, reaches a "trainer" for every KWOK pod, and nothing leaves this
machine. Needs root, like the runner.

Each pod's step advances once a second from its own offset, so the reader can tell exactly
when any step happened: step ``s`` of the pod at ``ip`` happened at ``step_time(t0, ip, s)``.

A JSON file ``{"IP": behaviour}`` (``--behaviours``, read at every request) makes a pod's trainer
misbehave: ``slow`` (answers after 60 s), ``garbage`` (an HTML page), ``error`` (HTTP 500).

    python -m devcluster.fake_trainers --t0 UNIX_TIME --port 9090 --total-steps 100000
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import ipaddress
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from devcluster.cluster import KWOK_POD_CIDR

# A /30 between this machine and the namespace, one per KWOK range: two proving grounds' fake
# trainers (the suite's two shares) would otherwise route one address to two links.
_LINK_BASE = 4 * (int(ipaddress.ip_network(KWOK_POD_CIDR).network_address) >> 16 & 0x3F)
LINK_NET = tuple(str(ipaddress.ip_address("169.254.231.0") + _LINK_BASE + i) for i in (1, 2))


def offset(ip: str) -> float:
    """A per-pod phase in [0, 1) s, so that the pods do not all step at the same instant."""
    return (int(ipaddress.ip_address(ip)) * 7919 % 1000) / 1000


def step_at(t0: float, ip: str, now: float) -> int:
    return max(0, math.floor(now - t0 - offset(ip)))


def step_time(t0: float, ip: str, step: int) -> float:
    return t0 + offset(ip) + step


def metrics_text(t0: float, ip: str, now: float, total: int) -> str:
    step = step_at(t0, ip, now)
    run = f"fake/{ip}"
    values = {
        "gft_global_step": step,
        "gft_total_steps": total,
        "gft_train_loss": 3.0 / (1 + step / 100),
        "gft_learning_rate": 2e-4,
        "gft_tokens_per_second": 1000.0 + step % 7,
        "gft_samples_per_second": 4.0,
        "gft_epoch": step / 1000,
        "gft_eta_seconds": max(0, total - step),
        "gft_last_log_timestamp_seconds": step_time(t0, ip, step),
    }
    lines = []
    for name, value in values.items():
        lines += [f"# HELP {name} {name}", f"# TYPE {name} gauge", f'{name}{{run="{run}"}} {value}']
    return "\n".join(lines) + "\n"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def kwok_pods_served(t0: float, behaviours: Path | None = None) -> Iterator[None]:
    """While inside, every KWOK pod address answers on port 9090 as a trainer stepping from
    ``t0`` (misbehaving as ``behaviours`` says); afterwards the range is unreachable again (as
    the proving ground leaves it)."""
    netns, veth = f"gftfake{os.getpid()}", f"gftfv{os.getpid() % 100000}"
    host, inside = LINK_NET
    proc = None
    try:
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("addr", "add", f"{host}/30", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", netns, "addr", "add", f"{inside}/30", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "route", "add", "local", KWOK_POD_CIDR, "dev", "lo")
        _ip("route", "replace", KWOK_POD_CIDR, "via", inside, "dev", veth)
        root = str(Path(__file__).resolve().parents[1])
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                netns,
                sys.executable,
                "-m",
                "devcluster.fake_trainers",
                "--t0",
                str(t0),
                *(["--behaviours", str(behaviours)] if behaviours else []),
            ],
            env={**os.environ, "PYTHONPATH": root},
            start_new_session=True,
        )
        time.sleep(1.0)
        yield
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        subprocess.run(["ip", "route", "replace", "unreachable", KWOK_POD_CIDR])
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--t0", type=float, required=True)
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--total-steps", type=int, default=100_000)
    p.add_argument("--behaviours", type=Path, default=None)
    args = p.parse_args()

    def behaviour(ip: str) -> str:
        try:
            return json.loads(args.behaviours.read_text()).get(ip, "ok")
        except (AttributeError, OSError, ValueError):
            return "ok"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ip = self.connection.getsockname()[0]
            how = behaviour(ip)
            if how == "slow":
                time.sleep(60)
            if how == "error":
                self.send_error(500, "the trainer's exporter failed")
                return
            body = metrics_text(args.t0, ip, time.time(), args.total_steps).encode()
            if how == "garbage":
                body = b"<html><body><h1>It works!</h1></body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
