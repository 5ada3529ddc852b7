"""The dashboard under test (one per module): a ``gft-dashboard`` process against the proving
ground, two users (service accounts bound to the built-in ``view`` and ``edit`` roles in one
namespace), a fine-tune they may see and one in a namespace they may not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import requests
from conftest import wait_for

from dashboard.client import REPO, finetune, free_port


def start_dashboard(cluster, log, *args: str) -> tuple[subprocess.Popen, str]:
    """``gft-dashboard`` on a free loopback port with the admin's kubeconfig as its own
    credentials; returned once its watch is synced."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'operator'}:{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gft_dashboard", "--address", f"127.0.0.1:{port}",
         "--kubeconfig", str(cluster.kubeconfig), *args],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return requests.get(f"{base}/healthz", timeout=2).status_code == 200
        except requests.ConnectionError:
            return proc.poll() is not None and pytest.fail(log.read_text())

    wait_for("the dashboard's watch synced", healthy, timeout=60, on_timeout=log.read_text)
    return proc, base


@pytest.fixture(scope="module")
def setup(cluster, tmp_path_factory):
    from operator_process import install

    install(cluster)
    stamp = uuid.uuid4().hex[:6]
    team, other = f"dash-team-{stamp}", f"dash-other-{stamp}"
    for ns in (team, other):
        cluster.kubectl("create", "namespace", ns)
    tokens = {}
    for user, role in (("viewer", "view"), ("editor", "edit")):
        cluster.kubectl("create", "serviceaccount", user, "-n", team)
        cluster.kubectl("create", "rolebinding", user, f"--clusterrole={role}",
                        f"--serviceaccount={team}:{user}", "-n", team)  # fmt: skip
        tokens[user] = cluster.kubectl("create", "token", user, "-n", team).stdout.strip()
    for ns, name in ((team, "seen"), (other, "hidden")):
        cluster.kubectl("apply", "-f", "-", input=json.dumps(finetune(name, ns)))
    log = tmp_path_factory.mktemp("dash") / "dashboard.log"
    proc, base = start_dashboard(cluster, log, "--auth", "token")
    yield {
        "base": base,
        "team": team,
        "other": other,
        "tokens": tokens,
        "log": log,
        "start": lambda *args: start_dashboard(cluster, log.with_name("other.log"), *args),
    }
    proc.terminate()
    proc.wait(timeout=10)
    for ns in (team, other):
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
