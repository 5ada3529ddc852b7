"""Fixtures shared by the whole suite: the proving ground and a fresh namespace per test."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster import cluster as pg

REPO = Path(__file__).resolve().parent.parent


def _test_state_dir() -> Path:
    """One state folder per checkout, apart from the one `make cluster-up` uses."""
    digest = hashlib.sha256(str(REPO).encode()).hexdigest()[:8]
    return Path(os.environ.get("GFT_TEST_CLUSTER_DIR", f"/tmp/gft-pg-test-{digest}"))


@pytest.fixture(scope="session")
def cluster() -> Iterator[pg.Cluster]:
    """A real control plane for the session; stopped (no process left) when the session ends."""
    state_dir = _test_state_dir()
    # A previous session killed before its teardown leaves processes behind: stop them first.
    pg.stop(state_dir, say=lambda *_: None)
    # GFT_PG_RUNNER=0 leaves the runner out (KWOK nodes only), for work on the control plane.
    started = pg.start(
        state_dir,
        say=lambda msg: print(f"[proving ground] {msg}"),
        runner=os.environ.get("GFT_PG_RUNNER", "1") != "0",
    )
    try:
        yield started
    finally:
        pg.stop(state_dir, say=lambda *_: None)


def wait_for(what: str, check, timeout: float = 60, interval: float = 0.5, on_timeout=None):
    """Poll ``check`` until it returns something truthy; fail the test naming ``what`` (and
    adding what ``on_timeout()`` returns, e.g. a log tail)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    extra = f"\n{on_timeout()}" if on_timeout else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r}){extra}")


@pytest.fixture
def namespace(cluster: pg.Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace enforcing the ``restricted`` PodSecurity level, deleted afterwards."""
    base = request.node.name.lower().replace("_", "-")
    name = f"t-{base[:40].strip('-')}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl(
        "label",
        "namespace",
        name,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    )
    # Pods cannot be created until the ServiceAccount controller made `default`.
    wait_for(
        "the default ServiceAccount",
        lambda: cluster.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
        timeout=30,
        interval=0.2,
    )
    yield name
    subprocess.run(
        [
            str(cluster.bin_dir / "kubectl"),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "delete",
            "namespace",
            name,
            "--wait=false",
        ],
        capture_output=True,
    )
