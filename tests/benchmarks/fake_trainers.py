"""Many fake trainers' /metrics from one process: run inside a network namespace whose loopback
owns a whole range of addresses (``ip route add local RANGE dev lo``), it answers on every
address of the range, and the address a request came to says which pod it plays.

Each pod's step advances once a second from its own offset, so the reader can tell exactly
when any step happened: step ``s`` of the pod at ``ip`` happened at ``step_time(t0, ip, s)``.

    python -m benchmarks.fake_trainers --t0 UNIX_TIME --port 9090 --total-steps 100000
"""

from __future__ import annotations

import argparse
import http.server
import ipaddress
import math
import time


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--t0", type=float, required=True)
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--total-steps", type=int, default=100_000)
    args = p.parse_args()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ip = self.connection.getsockname()[0]
            body = metrics_text(args.t0, ip, time.time(), args.total_steps).encode()
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
