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


# One timeout per kind of test, far below a quarter of an hour, so that a stuck test fails with
# its stack (pytest-timeout) in minutes. A test that needs longer says so itself with
# @pytest.mark.timeout(N) and why. Fixture set-up counts: the first test of a module pays for
# its module's operator, the first cluster test for the proving ground.
TIMEOUTS = {"unit": 60, "slow": 300, "cluster": 300}

# `make test` runs the proving-ground tests as two sessions side by side, each on a proving
# ground of its own (GFT_TEST_SHARD names the session's share; unset, a session takes them all).
# Most of a cluster test's time is waiting on the cluster, so two at once fill the 2 cores.
# One rule splits them, so that the shares always add up to the whole.
SHARDS = ("operator", "main")


def shard_of(item: pytest.Item) -> str:
    """The operator's own modules in one share (test_multinode's long run in the other, which
    has the demo), everything else on the proving ground in the other."""
    try:
        parts = Path(str(item.path)).resolve().relative_to(REPO / "tests").parts
    except ValueError:
        return "main"  # a cluster test outside tests/
    return "operator" if parts[0] == "operator" and parts[-1] != "test_multinode.py" else "main"


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    shard = os.environ.get("GFT_TEST_SHARD", "")
    if shard and shard not in SHARDS:
        raise pytest.UsageError(f"GFT_TEST_SHARD={shard!r}: say one of {', '.join(SHARDS)}")
    for item in items:
        # Every test on the shared proving ground is marked `cluster`, so that `make test` can
        # run them (-m cluster) beside the rest (-m "not cluster").
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
        if item.get_closest_marker("timeout") is None:
            kind = (
                "cluster"
                if item.get_closest_marker("cluster")
                else "slow"
                if item.get_closest_marker("slow") or item.get_closest_marker("e2e")
                else "unit"
            )
            item.add_marker(pytest.mark.timeout(TIMEOUTS[kind]))
    if shard:
        ours, others = [], []
        for item in items:
            theirs = item.get_closest_marker("cluster") and shard_of(item) != shard
            (others if theirs else ours).append(item)
        if others:
            config.hook.pytest_deselected(items=others)
            items[:] = ours


def _test_state_dir() -> Path:
    """One state folder per checkout, apart from the one `make cluster-up` uses."""
    digest = hashlib.sha256(str(REPO).encode()).hexdigest()[:8]
    shard = os.environ.get("GFT_TEST_SHARD", "")
    base = os.environ.get("GFT_TEST_CLUSTER_DIR", f"/tmp/gft-pg-test-{digest}")
    return Path(base + (f"-{shard}" if shard else ""))


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


def wait_for(
    what: str,
    check,
    timeout: float = 60,
    interval: float = 0.5,
    on_timeout=None,
    give_up=None,
    give_up_every: float = 2.0,
):
    """Poll ``check`` until it returns something truthy; fail the test naming ``what`` (and
    adding what ``on_timeout()`` returns, e.g. a log tail). ``give_up()``, asked every
    ``give_up_every`` seconds, returns a reason when waiting longer is pointless (a pod that
    can never start): the test fails at once with it instead of waiting out the timeout."""
    deadline = time.monotonic() + timeout
    next_give_up = time.monotonic()
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        if give_up is not None and time.monotonic() >= next_give_up:
            reason = give_up()
            if reason:
                pytest.fail(f"gave up waiting for {what}: {reason}")
            next_give_up = time.monotonic() + give_up_every
        time.sleep(interval)
    extra = f"\n{on_timeout()}" if on_timeout else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r}){extra}")


# The kubelet's reasons for a container that will not start without someone changing something
# (its command, its image, a Secret it names): a test waiting for it to run has failed already.
NEVER_STARTS = {
    "StartError",
    "ContainerCannotRun",
    "ImageEntrypointUnknown",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
}


def pod_that_cannot_start(cluster: pg.Cluster, namespace: str, selector: str = "") -> str | None:
    """The first container of the pods in ``namespace`` (matching ``selector``) that cannot
    start, named with the kubelet's reason and message; None when there is none."""
    import urllib3

    from devcluster.kubeapi import ApiError

    try:
        pods = cluster.api.request(
            "GET", f"/api/v1/namespaces/{namespace}/pods", query={"labelSelector": selector or None}
        )["items"]
    except (ApiError, OSError, urllib3.exceptions.HTTPError, ValueError):
        return None  # an API hiccup is not a verdict on the pods
    for pod in pods:
        status = pod.get("status") or {}
        for cs in [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]:
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                detail = state.get("waiting") or state.get("terminated") or {}
                if detail.get("reason") in NEVER_STARTS:
                    return (
                        f"pod {namespace}/{pod['metadata']['name']}, container {cs['name']}: "
                        f"{detail['reason']}: {detail.get('message', '')}".rstrip(": ")
                    )
    return None


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
