"""Where a pod's ranks sit in a multi-node run, and when the launcher starts them again."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from gft_api.contract import ExitCode
from gft_trainer.launcher import MAX_ROUNDS, Group, GroupError, again, serve_pod_gpus

from trainer.conftest import write_config

MULTI = {"GFT_NODES": "2", "JOB_COMPLETION_INDEX": "1", "GFT_MASTER_ADDR": "mn-0.mn-nodes"}


def test_one_pod_meets_on_a_local_port():
    g = Group.from_env(2, {})
    assert (g.world_size, g.nodes, g.master_addr, g.master_port) == (2, 1, "127.0.0.1", 0)
    assert g.rank_env(1, 4242)["RANK"] == "1"


def test_pod_index_decides_the_global_ranks():
    g = Group.from_env(4, {**MULTI, "GFT_MASTER_PORT": "29600"})
    assert (g.world_size, g.node, g.master_port) == (8, 1, 29600)
    env = g.rank_env(3, g.master_port)
    assert env["RANK"] == "7" and env["LOCAL_RANK"] == "3" and env["GROUP_RANK"] == "1"
    assert env["WORLD_SIZE"] == "8" and env["LOCAL_WORLD_SIZE"] == "4"
    assert env["MASTER_ADDR"] == "mn-0.mn-nodes" and env["MASTER_PORT"] == "29600"


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"GFT_NODES": "2", "GFT_MASTER_ADDR": "a"}, "JOB_COMPLETION_INDEX"),
        ({"GFT_NODES": "2", "JOB_COMPLETION_INDEX": "0"}, "GFT_MASTER_ADDR"),
        ({**MULTI, "JOB_COMPLETION_INDEX": "2"}, "outside 0..1"),
    ],
)
def test_a_multi_node_pod_without_its_place_is_refused(env, says):
    with pytest.raises(GroupError, match=says):
        Group.from_env(1, env)


def test_only_a_multi_node_pod_restarts_its_ranks_and_only_for_a_retryable_failure():
    multi, single = Group.from_env(1, MULTI), Group(2)
    assert again(ExitCode.RETRYABLE, multi, stopping=False, rounds=0)
    assert again(137, multi, stopping=False, rounds=MAX_ROUNDS - 1)
    assert not again(137, multi, stopping=False, rounds=MAX_ROUNDS)
    assert not again(ExitCode.RETRYABLE, single, stopping=False, rounds=0)
    assert not again(ExitCode.RETRYABLE, multi, stopping=True, rounds=0)
    for code in (ExitCode.SUCCESS, ExitCode.STOPPED, ExitCode.DATA_ERROR, ExitCode.DIVERGED):
        assert not again(code, multi, stopping=False, rounds=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_pod_past_the_first_serves_its_own_gpus(tmp_path, monkeypatch):
    """Pods 1.. of a multi-node run serve their GPUs' readings on the run's metrics port for
    the pod's whole life, so every pod is a live target (NVML is what cannot run here)."""
    from gft_trainer import gpu

    readings = [gpu.GpuReading(0, 0.75, 3 * 2**30, 80 * 2**30, 350.0, 61.0)]
    monkeypatch.setattr(gpu, "read_gpus", lambda: readings)
    port = _free_port()
    config = write_config(
        tmp_path / "c.yaml",
        "m",
        tmp_path / "out",
        observability={"metricsBindAddress": "127.0.0.1", "metricsPort": port},
    )
    server = serve_pod_gpus(config)
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'gft_gpu_utilization_ratio{gpu="0",run="test/run"} 0.75' in text, text
    assert "gft_global_step" not in text  # training metrics come from rank 0 alone


def test_no_pod_endpoint_without_a_metrics_port_or_a_readable_config(tmp_path):
    config = write_config(tmp_path / "c.yaml", "m", tmp_path / "out")  # metricsPort 0: off
    assert serve_pod_gpus(config) is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    assert serve_pod_gpus(bad) is None  # the ranks report the bad config with its exit code
