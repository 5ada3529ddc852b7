"""A ``gft-dashboard`` process for the tests, a client that behaves as the dashboard's page
does (CSRF cookie echoed in a header), and the fine-tunes the tests make."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import wait_for

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dashboard(cluster, log, *args: str) -> tuple[subprocess.Popen, str]:
    """``gft-dashboard`` on a free loopback port with the admin's kubeconfig as its own
    credentials; returned (with its root URL, without the path prefix) once its watch is
    synced."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'operator'}:{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gft_dashboard", "--address", f"127.0.0.1:{port}",
         "--kubeconfig", str(cluster.kubeconfig), *args],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    prefix = args[args.index("--path-prefix") + 1] if "--path-prefix" in args else ""

    def healthy():
        try:
            return requests.get(f"{base}{prefix}/healthz", timeout=2).status_code == 200
        except requests.ConnectionError:
            return proc.poll() is not None and pytest.fail(log.read_text())

    wait_for("the dashboard's watch synced", healthy, timeout=60, on_timeout=log.read_text)
    return proc, base


def finetune(name: str, namespace: str, **training) -> dict:
    return {
        "apiVersion": "finetune.gemma.dev/v1alpha1",
        "kind": "GemmaFineTune",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"name": "google/gemma-3-270m"},
            "dataset": {"hub": {"id": "HuggingFaceH4/no_robots"}, "format": "chat"},
            "training": {"maxSteps": 10, **training},
            "resources": {"gpus": 1},
        },
    }


class Browser:
    """A requests session that behaves as the page does: CSRF cookie from the first page,
    echoed in a header on every change."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base
        self.s = requests.Session()
        self.s.get(f"{base}/", timeout=10)
        if token:
            r = self.post("/api/login", {"token": token})
            assert r.status_code == 200, r.text

    def headers(self) -> dict[str, str]:
        return {"X-CSRF-Token": self.s.cookies.get("gft_csrf", "")}

    def get(self, path: str, **kw):
        return self.s.get(self.base + path, timeout=30, **kw)

    def post(self, path: str, body: dict | None = None):
        return self.s.post(self.base + path, json=body or {}, headers=self.headers(), timeout=30)

    def delete(self, path: str):
        return self.s.delete(self.base + path, headers=self.headers(), timeout=30)
