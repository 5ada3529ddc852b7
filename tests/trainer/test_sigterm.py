"""SIGTERM in the middle of a real ``gft-train`` process: checkpoint, exit 75 within the grace
period, and a second run resumes at the same global step and ends at the planned total.
The same with two CPU ranks (gloo) under the trainer's own launcher, and with the signal
landing while an evaluation runs."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from gft_api.contract import ExitCode, TrainerSummary
from gft_trainer import checkpoints

from trainer.conftest import CHAT, REPO, child_env, gft_train_cmd, write_config

GRACE_SECONDS = 30  # Kubernetes' default terminationGracePeriodSeconds
TOTAL = 120
TRAIN_LINE = r"INFO step (\d+)/"  # not "eval  step" nor "evaluating at step"


def start(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        gft_train_cmd(config, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(),
        cwd=REPO,
    )


def wait_for(proc: subprocess.Popen, pattern: str, seen: list[str]) -> re.Match:
    for line in proc.stdout:
        seen.append(line)
        if m := re.search(pattern, line):
            return m
    raise AssertionError(f"trainer ended before {pattern!r}:\n" + "".join(seen[-30:]))


def wait_for_step(proc: subprocess.Popen, step: int, seen: list[str]) -> None:
    while int(wait_for(proc, TRAIN_LINE, seen).group(1)) < step:
        pass


def terminate(proc: subprocess.Popen, seen: list[str], *extra: str) -> str:
    """SIGTERM now; the trainer must exit 75 within the grace period. Returns the whole log."""
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    rest, _ = proc.communicate(timeout=GRACE_SECONDS + 30)
    elapsed = time.monotonic() - sent
    log = "".join(seen) + rest
    assert proc.returncode == ExitCode.STOPPED, log[-3000:]
    if "--nproc" in extra:
        assert "launched 2 ranks" in log and "[rank 1]" in log
    assert elapsed < GRACE_SECONDS, log[-3000:]
    return log


def stopped_checkpoint(out: Path) -> tuple[Path, int]:
    """The checkpoint the stop left, checked against the summary; and its step."""
    term = out.parent / f"{out.name}.termination-log"
    summary = TrainerSummary.from_termination_message(term.read_text())
    ckpt = checkpoints.newest_valid(out / "checkpoints")
    assert ckpt is not None and summary.outcome == "Stopped"
    stopped_at = checkpoints.step_of(ckpt)
    assert summary.last_checkpoint_step == summary.global_step == stopped_at
    return ckpt, stopped_at


def resume_to_total(cfg: Path, out: Path, ckpt: Path, total: int, *extra: str) -> None:
    """A second run resumes from ``ckpt`` (not from 0) and ends at the planned total."""
    stopped_at = checkpoints.step_of(ckpt)
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
    first = int(re.search(TRAIN_LINE, log2).group(1))
    assert stopped_at < first <= stopped_at + 2  # carried on, not from 0
    term = out.parent / f"{out.name}.termination-log"
    summary = TrainerSummary.from_termination_message(term.read_text())
    assert summary.global_step == summary.total_steps == total
    state = (
        json.loads((out / "checkpoints" / f"checkpoint-{total}" / "trainer_state.json").read_text())
        if (out / "checkpoints" / f"checkpoint-{total}").exists()
        else None
    )
    assert state is None or state["global_step"] == total


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
    lines: list[str] = []
    proc = start(cfg, *extra)
    wait_for_step(proc, 4, lines)
    terminate(proc, lines, *extra)
    ckpt, stopped_at = stopped_checkpoint(out)
    assert 4 <= stopped_at < TOTAL
    resume_to_total(cfg, out, ckpt, TOTAL, *extra)


@pytest.mark.slow
@pytest.mark.e2e
def test_sigterm_checkpoints_and_resumes(tmp_path: Path, tiny_gemma3: Path) -> None:
    stop_and_resume(tmp_path, tiny_gemma3)


@pytest.mark.slow
@pytest.mark.e2e
def test_sigterm_with_two_ranks(tmp_path: Path, tiny_gemma3: Path) -> None:
    stop_and_resume(tmp_path, tiny_gemma3, "--nproc", "2")


EVAL_EVERY = 4
EVAL_ROWS = 400  # ~5 ms a row on a CPU core: a 2-6 s evaluation, ample to land the signal in


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("extra", [(), ("--nproc", "2")], ids=["one-process", "two-ranks"])
def test_sigterm_during_evaluation(
    tmp_path: Path, tiny_gemma3: Path, extra: tuple[str, ...]
) -> None:
    """The signal aborts the evaluation at its next batch (it does not wait for its end), the
    checkpoint is of the step the evaluation started at, and the rerun carries on from it."""
    records = CHAT.read_text().splitlines()
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(records[i % len(records)] + "\n" for i in range(EVAL_ROWS)))
    out = tmp_path / "out"
    total = 2 * EVAL_EVERY
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_gemma3,
        out,
        dataset={"trainFiles": [str(CHAT)], "evalFiles": [str(evals)]},
        training={
            "maxSteps": total,
            "loggingEverySteps": 2,
            "batchSize": 1,
            "evalEverySteps": EVAL_EVERY,
        },
        data={"packing": False, "maxSeqLength": 128},
        output={"dir": str(out), "checkpointEverySteps": 0},
    )
    lines: list[str] = []
    proc = start(cfg, *extra)
    eval_step = int(wait_for(proc, r"evaluating at step (\d+)/", lines).group(1))
    log = terminate(proc, lines, *extra)
    assert eval_step == EVAL_EVERY
    assert f"stop requested during evaluation; saving the checkpoint of step {eval_step}" in log
    assert f"eval  step {eval_step}/" not in log, "the evaluation ran to its end"
    ckpt, stopped_at = stopped_checkpoint(out)
    assert stopped_at == eval_step
    resume_to_total(cfg, out, ckpt, total, *extra)


def snapshot(ckpt: Path) -> dict[str, tuple[str, int]]:
    """Every file of a checkpoint: its SHA-256 and its mtime (ns)."""
    return {
        str(p.relative_to(ckpt)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(ckpt.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
@pytest.mark.e2e
def test_sigterm_during_evaluation_on_start_keeps_the_checkpoint(
    tmp_path: Path, tiny_gemma3: Path
) -> None:
    """A resumed run evaluating on start, at the step of its checkpoint, is stopped: that
    checkpoint is left as it is (not rewritten in place), and a later run resumes from it."""
    records = CHAT.read_text().splitlines()
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(records[i % len(records)] + "\n" for i in range(EVAL_ROWS)))
    out = tmp_path / "out"
    total = 12
    training = {"maxSteps": total, "loggingEverySteps": 2, "batchSize": 1}
    data = {"packing": False, "evalFraction": 0.0, "maxSeqLength": 128}
    output = {"dir": str(out), "checkpointEverySteps": 0}
    # No evaluation in the runs before and after: they only make and use the checkpoint.
    cfg = write_config(
        tmp_path / "c.yaml", tiny_gemma3, out, training=training, data=data, output=output
    )
    on_start = write_config(
        tmp_path / "on-start.yaml",
        tiny_gemma3,
        out,
        dataset={"trainFiles": [str(CHAT)], "evalFiles": [str(evals)]},
        training={**training, "evalOnStart": True},
        data=data,
        output=output,
    )
    lines: list[str] = []
    proc = start(cfg)
    wait_for_step(proc, 2, lines)
    terminate(proc, lines)
    ckpt, step = stopped_checkpoint(out)
    assert 2 <= step < total
    before = snapshot(ckpt)

    lines = []
    proc = start(on_start)
    evaluating = wait_for(proc, r"evaluating at step (\d+)/(\d+)", lines)
    log = terminate(proc, lines)
    assert evaluating.groups() == (str(step), str(total)), log[-3000:]
    assert f"resuming from {ckpt}" in log
    assert f"stop requested during evaluation; the checkpoint of step {step} exists" in log
    assert "saving the checkpoint" not in log
    assert f"eval  step {step}/" not in log, "the evaluation ran to its end"
    assert not re.search(TRAIN_LINE, log), "it trained"
    assert snapshot(ckpt) == before, "the checkpoint was rewritten"
    assert checkpoints.is_valid(ckpt)
    assert checkpoints.all_checkpoints(out / "checkpoints") == [ckpt]
    assert stopped_checkpoint(out) == (ckpt, step)

    resume_to_total(cfg, out, ckpt, total)
