# ruff: noqa: F811  (model_dir, a fixture, is a parameter here)
"""Nothing depends on where the checkout lives. CI clones the project into a fresh folder of
the system temp folder, where a training pod mounts its own scratch volume over /tmp: this test
copies the checkout there, sets it up as a user does (``make venv``, ``make cluster-up``), and
has its operator run a fine-tune that trains for real on its runner node."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from operator_process import apply, install, start_operator, wait_phase
from runner_runs import STARTUP, model_dir, on_runner  # noqa: F401

from devcluster import cluster as pg

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]


def copy_checkout(dest: Path) -> None:
    """The working tree as git sees it (tracked and untracked files, nothing ignored): what a
    clone of it would hold, uncommitted changes included."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = REPO / name
        if source.is_file():  # a file deleted but not yet committed is listed, and gone
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def make(checkout: Path, target: str, **env: str) -> None:
    done = subprocess.run(
        ["make", "-C", str(checkout), target],
        env={**os.environ, "PYTHONPATH": "", "VIRTUAL_ENV": "", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout[-2000:] + done.stderr[-3000:]
    assert done.returncode == 0, f"make {target} failed:\n{output}"


def test_a_checkout_in_the_temp_folder_trains_through_its_operator(model_dir, tmp_path_factory):
    # /tmp, whatever TMPDIR says: that is where the training pod mounts its scratch emptyDir.
    checkout = Path(tempfile.mkdtemp(prefix="gft-clone-", dir="/tmp"))
    state = Path(tempfile.mkdtemp(prefix="gft-clone-pg-", dir="/tmp"))
    try:
        copy_checkout(checkout)
        make(checkout, "venv")
        make(checkout, "cluster-up", GFT_CLUSTER_DIR=str(state))
        cluster = pg.Cluster.load(state)
        assert cluster is not None and all(cluster.alive().values()), cluster
        install(cluster, checkout / "manifests")
        op = start_operator(cluster, tmp_path_factory, venv=checkout / ".venv")
        try:
            cluster.kubectl("create", "namespace", "anywhere")
            manifest = on_runner("anywhere", model_dir, max_steps=6)
            manifest["spec"]["dataset"]["path"] = str(checkout / "tests/data/chat_small.jsonl")
            apply(cluster, "anywhere", manifest)
            status = wait_phase(cluster, "anywhere", "anywhere", "Succeeded", timeout=STARTUP)
            assert status["result"]["globalStep"] == 6, status
        finally:
            op.kill(signal.SIGTERM)
    finally:
        make(checkout, "cluster-down", GFT_CLUSTER_DIR=str(state))
        shutil.rmtree(checkout, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
