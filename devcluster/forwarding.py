"""``kubectl port-forward`` as a user runs it, for tests and the demo: through the API server to
the runner's kubelet API and its port-forward helper, into the pod's network namespace."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

FORWARDING = re.compile(rb"Forwarding from 127\.0\.0\.1:(\d+) ->")


class PortForwardError(RuntimeError):
    """kubectl port-forward did not start; the message has its output."""


def port_forward(
    cluster,
    namespace: str,
    target: str,
    remote_port: int,
    local_port: int = 0,
    log: Path | None = None,
    timeout: float = 30,
) -> tuple[subprocess.Popen, int]:
    """Start ``kubectl port-forward -n NAMESPACE TARGET LOCAL:REMOTE`` (TARGET as kubectl takes
    it: ``pod/x``, ``svc/y``) and return the process and the local port it listens on. With
    ``log``, its output goes there and it runs in its own session, so that it outlives the
    caller (the demo leaves it running for the user)."""
    cmd = [
        str(cluster.bin_dir / "kubectl"),
        "--kubeconfig",
        str(cluster.kubeconfig),
        "port-forward",
        "-n",
        namespace,
        "--address",
        "127.0.0.1",
        target,
        f"{local_port or ''}:{remote_port}",
    ]
    if log is None:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # kubectl prints this line once it listens
        found = FORWARDING.search(first)
        if not found:
            proc.kill()
            said = (first + proc.stdout.read()).decode(errors="replace")
            raise PortForwardError(f"{' '.join(cmd[3:])}: {said}")
        return proc, int(found.group(1))
    out = open(log, "wb")  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = FORWARDING.search(log.read_bytes())
        if found:
            return proc, int(found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise PortForwardError(f"{' '.join(cmd[3:])}: {log.read_text(errors='replace')[-2000:]}")
