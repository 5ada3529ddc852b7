"""The trainer's benchmark scripts still run (smoke runs on CPU, tiny settings): the figures in
docs/benchmarks.md come from them, so they must not rot between measurements."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run(module: str, *args: str) -> str:
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_cpu_loop_benchmark_reports_its_ratios_and_the_monitoring_share():
    out = run("benchmarks.trainer_cpu", "--rounds", "1", "--steps", "5")
    assert "ours / bare" in out and "ours-quiet / bare" in out
    share = [line for line in out.splitlines() if line.startswith("monitoring's own time")]
    assert share and "over 1 rounds" in share[0], out


# The GPU benchmark's smoke run (--tiny, every loop in its own process) is a step of
# tests/benchmarks/test_gpu_session.py.


def test_the_step_timer_waits_for_the_gpu(monkeypatch):
    # Without the wait, a step's unfinished backward is paid inside the next step's window,
    # and its own time looks shorter than the plain loop's (which does wait).
    from benchmarks import trainer_cpu

    calls: list[str] = []
    monkeypatch.setattr(trainer_cpu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trainer_cpu.torch.cuda, "synchronize", lambda: calls.append("sync"))
    timer = trainer_cpu.StepTimer()
    timer.on_step_begin()
    calls.append("step")
    timer.on_step_end()
    assert calls == ["sync", "step", "sync"] and len(timer.times) == 1


def test_packed_attention_benchmark_reports_both_layouts():
    out = run(
        "benchmarks.packed_attention",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--batch",
        "2",
        "--seq",
        "128",
    )
    assert "round 0 flattened" in out and "round 0 rows" in out, out
    assert "rows / flattened: step time" in out, out


def test_soak_benchmark_smoke_run(tmp_path):
    """A tiny soak (its own proving ground, KWOK nodes, fake trainers): the script runs end to
    end and reports what docs/benchmarks.md quotes."""
    out = run(
        "benchmarks.soak",
        *("--finetunes", "24", "--minutes", "0.4", "--namespaces", "2", "--first", "10"),
        *("--run-seconds", "8", "--retention", "5", "--window", "10"),
        # Its own folder: a real soak running on this machine meanwhile is not stopped or met
        # (before: "a proving ground is already running from /tmp/gft-bench-soak").
        *("--state-dir", str(tmp_path / "proving-ground")),
    )
    result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
    assert result["finetunes"] == 24 and result["duplicate_jobs"] == 0, result
    assert result["rss_after_first_mb"] > 0 and result["rss_end_mb"] > 0, result
    assert result["tracebacks_in_log"] == 0, result
