"""Where a run starts, on a real tiny Gemma: never past its plan, never again once it
succeeded, and from another run's work only when ``output.resumeFrom`` names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gft_api.contract import ExitCode
from gft_trainer import checkpoints

from trainer.conftest import log_history, write_config
from trainer.test_cli import run_cli


def _config(tmp_path: Path, model: Path, out: Path, name: str = "c.yaml", **overrides):
    overrides.setdefault(
        "output", {"dir": str(out), "checkpointEverySteps": 3, "keepCheckpoints": 2}
    )
    return write_config(tmp_path / name, model, out, **overrides)


def _trained_steps(out: Path, step: int) -> list[int]:
    return [e["step"] for e in log_history(out, step) if "loss" in e]


def test_a_rerun_of_a_finished_run_trains_nothing(tmp_path: Path, tiny_gemma3: Path, capsys):
    """Issue 9: a Job re-created for a finished run resumed from the checkpoint at maxSteps and
    trained on past it (14 steps of 10). Now the same config in the same folder reports the
    outcome it had; and with the summary gone, a checkpoint at the last step is finished from,
    not trained past."""
    out = tmp_path / "out"
    cfg = _config(tmp_path, tiny_gemma3, out, training={"maxSteps": 6, "loggingEverySteps": 1})
    code, first = run_cli(cfg)
    assert code == 0 and first.global_step == 6 and first.last_checkpoint_step == 6

    capsys.readouterr()
    code, again = run_cli(cfg)
    log = capsys.readouterr().out
    assert code == 0 and again == first
    assert "already succeeded" in log and "resuming from" not in log

    (out / "summary.json").unlink()  # as if the first run was cut off after its last checkpoint
    code, finished = run_cli(cfg)
    log = capsys.readouterr().out
    assert code == 0 and finished.global_step == 6 and finished.total_steps == 6
    assert "finishing without training" in log and "step 7/" not in log
    assert not list((out / "checkpoints").glob("checkpoint-7"))
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert finished.train_loss is not None and finished.eval_loss is not None


def test_resume_from_another_runs_checkpoint_only_when_named(
    tmp_path: Path, tiny_gemma3: Path, capsys
):
    first = tmp_path / "runs" / "first"
    code, _ = run_cli(_config(tmp_path, tiny_gemma3, first, training={"maxSteps": 6}))
    assert code == 0
    assert [checkpoints.step_of(p) for p in checkpoints.all_checkpoints(first / "checkpoints")] == [
        3,
        6,
    ]

    # A second run in its own folder starts fresh unless told otherwise...
    second = tmp_path / "runs" / "second"
    code, _ = run_cli(_config(tmp_path, tiny_gemma3, second, "s.yaml", training={"maxSteps": 3}))
    assert code == 0 and _trained_steps(second, 3) == [2]

    # ...and continues the first run's step 3 when resumeFrom names it.
    third = tmp_path / "runs" / "third"
    named = first / "checkpoints" / "checkpoint-3"
    cfg = _config(
        tmp_path,
        tiny_gemma3,
        third,
        "t.yaml",
        training={"maxSteps": 6},
        output={"dir": str(third), "checkpointEverySteps": 3, "resumeFrom": str(named)},
    )
    capsys.readouterr()
    code, summary = run_cli(cfg)
    log = capsys.readouterr().out
    assert code == 0 and summary.global_step == 6
    assert f"resuming from {named}" in log and "step 4/6" in log and "step 2/6" not in log
    assert _trained_steps(third, 6) == [2, 4, 6]  # the first run's history up to 3, then 4..6
    assert (named / checkpoints.MARKER).exists()  # the named checkpoint is read, never rotated
    assert sorted(p.name for p in (third / "checkpoints").iterdir()) == ["checkpoint-6"]

    # Its own checkpoint wins over resumeFrom on a retry.
    (third / "summary.json").unlink()
    code, summary = run_cli(cfg)
    assert code == 0 and summary.global_step == 6


def test_resume_from_an_adapter_starts_from_its_weights(tmp_path: Path, tiny_gemma3: Path):
    trained = tmp_path / "trained"
    cfg = _config(tmp_path, tiny_gemma3, trained, training={"maxSteps": 6, "learningRate": 5e-3})
    code, first = run_cli(cfg)
    assert code == 0 and first.eval_loss is not None

    def eval_loss_at_start(out: Path, name: str, **output) -> float:
        cfg = _config(
            tmp_path,
            tiny_gemma3,
            out,
            name,
            training={"maxSteps": 1, "evalOnStart": True, "learningRate": 1e-9},
            output={"dir": str(out), "checkpointEverySteps": 1, **output},
        )
        code, _ = run_cli(cfg)
        assert code == 0
        state = json.loads(
            (out / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text()
        )
        return next(e["eval_loss"] for e in state["log_history"] if e.get("step") == 0)

    base = eval_loss_at_start(tmp_path / "fresh", "f.yaml")
    warm = eval_loss_at_start(tmp_path / "warm", "w.yaml", resumeFrom=str(trained / "adapter"))
    assert warm == pytest.approx(first.eval_loss, rel=1e-4), (warm, first.eval_loss, base)
    assert abs(warm - base) > 1e-3


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "output.resumeFrom: .*no such folder"),
        ("not-a-checkpoint", "neither a checkpoint .* nor an adapter"),
        ("other-rank", "does not fit this fine-tune's method.lora settings"),
    ],
)
def test_a_bad_resume_from_is_a_config_error(
    tmp_path: Path, tiny_gemma3: Path, case: str, message: str
):
    import re

    target = tmp_path / case
    if case == "not-a-checkpoint":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
    if case == "other-rank":
        source = tmp_path / "source"
        cfg = _config(tmp_path, tiny_gemma3, source, "src.yaml", training={"maxSteps": 1})
        assert run_cli(cfg)[0] == 0
        target = source / "adapter"
    out = tmp_path / "out"
    cfg = _config(
        tmp_path,
        tiny_gemma3,
        out,
        method={"type": "lora", "lora": {"r": 8}},
        output={"dir": str(out), "resumeFrom": str(target)},
    )
    code, summary = run_cli(cfg)
    assert code == ExitCode.CONFIG_ERROR, summary
    assert re.search(message, summary.message), summary.message
