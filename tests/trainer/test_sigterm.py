"""SIGTERM in the middle of a real ``gft-train`` process: checkpoint, exit 75 within the grace
period, and a second run resumes at the same global step and ends at the planned total.
The same with two CPU ranks (gloo) under the trainer's own launcher."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from gft_api.contract import ExitCode, TrainerSummary
from gft_trainer import checkpoints

from trainer.conftest import REPO, child_env, gft_train_cmd, write_config

GRACE_SECONDS = 30  # Kubernetes' default terminationGracePeriodSeconds
TOTAL = 120


def start(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        gft_train_cmd(config, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(),
        cwd=REPO,
    )


def wait_for_step(proc: subprocess.Popen, step: int, seen: list[str]) -> None:
    for line in proc.stdout:
        seen.append(line)
        m = re.search(r"step (\d+)/", line)
        if m and int(m.group(1)) >= step:
            return
    raise AssertionError("trainer ended before the step:\n" + "".join(seen[-30:]))


def stop_and_resume(tmp_path: Path, model: Path, *extra: str) -> None:
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml",
        model,
        out,
        training={"maxSteps": TOTAL, "loggingEverySteps": 2, "batchSize": 1},
        data={"packing": False, "evalFraction": 0.2, "maxSeqLength": 128},
        output={"dir": str(out), "checkpointEverySteps": 0},
    )
    term = out.parent / f"{out.name}.termination-log"
    lines: list[str] = []
    proc = start(cfg, *extra)
    wait_for_step(proc, 4, lines)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    rest, _ = proc.communicate(timeout=GRACE_SECONDS + 30)
    elapsed = time.monotonic() - sent
    log = "".join(lines) + rest
    assert proc.returncode == ExitCode.STOPPED, log[-3000:]
    if "--nproc" in extra:
        assert "launched 2 ranks" in log and "[rank 1]" in log
    assert elapsed < GRACE_SECONDS
    summary = TrainerSummary.from_termination_message(term.read_text())
    ckpt = checkpoints.newest_valid(out / "checkpoints")
    assert ckpt is not None and summary.outcome == "Stopped"
    stopped_at = checkpoints.step_of(ckpt)
    assert summary.last_checkpoint_step == summary.global_step == stopped_at
    assert 4 <= stopped_at < TOTAL

    rerun = subprocess.run(
        gft_train_cmd(cfg, *extra),
        capture_output=True,
        text=True,
        timeout=240,
        env=child_env(),
        cwd=REPO,
    )
    log2 = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log2[-3000:]
    assert f"resuming from {ckpt}" in log2
    first = int(re.search(r"step (\d+)/", log2).group(1))
    assert stopped_at < first <= stopped_at + 2  # carried on, not from 0
    summary = TrainerSummary.from_termination_message(term.read_text())
    assert summary.global_step == summary.total_steps == TOTAL
    state = (
        json.loads((out / "checkpoints" / f"checkpoint-{TOTAL}" / "trainer_state.json").read_text())
        if (out / "checkpoints" / f"checkpoint-{TOTAL}").exists()
        else None
    )
    assert state is None or state["global_step"] == TOTAL


@pytest.mark.slow
@pytest.mark.e2e
def test_sigterm_checkpoints_and_resumes(tmp_path: Path, tiny_gemma3: Path) -> None:
    stop_and_resume(tmp_path, tiny_gemma3)


@pytest.mark.slow
@pytest.mark.e2e
def test_sigterm_with_two_ranks(tmp_path: Path, tiny_gemma3: Path) -> None:
    stop_and_resume(tmp_path, tiny_gemma3, "--nproc", "2")
