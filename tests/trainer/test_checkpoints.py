"""Checkpoint validity, newest-valid selection and rotation, on real folders."""

from __future__ import annotations

import json
from pathlib import Path

from gft_trainer import checkpoints
from gft_trainer.launcher import combine_exit_codes


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / checkpoints.TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    if complete:
        checkpoints.mark_complete(path, step)
    return path


def test_truncated_newest_is_skipped(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 10)
    good = fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, complete=False)  # killed mid-save: no marker
    assert checkpoints.newest_valid(tmp_path) == good


def test_garbled_state_or_wrong_step_is_invalid(tmp_path: Path) -> None:
    bad = fake_checkpoint(tmp_path, 5)
    (bad / checkpoints.TRAINER_STATE).write_text('{"global_st')
    other = fake_checkpoint(tmp_path, 6)
    (other / checkpoints.TRAINER_STATE).write_text(json.dumps({"global_step": 7}))
    assert not checkpoints.is_valid(bad) and not checkpoints.is_valid(other)
    assert checkpoints.newest_valid(tmp_path) is None


def test_rotation_keeps_newest_valid(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 4, complete=False)  # being written now: never deleted
    fake_checkpoint(tmp_path, 0, complete=False)  # an old leftover: deleted
    checkpoints.rotate(tmp_path, keep=2)
    assert [p.name for p in checkpoints.all_checkpoints(tmp_path)] == [
        "checkpoint-2",
        "checkpoint-3",
        "checkpoint-4",
    ]


def test_rank_exit_codes_combine_by_contract() -> None:
    assert combine_exit_codes([0, 0]) == 0
    assert combine_exit_codes([75, 75]) == 75
    assert combine_exit_codes([75, 0]) == 75
    assert combine_exit_codes([1, 65]) == 65
    assert combine_exit_codes([0, 1]) == 1
    assert combine_exit_codes([75, 137]) == 137


def test_rotation_never_deletes_the_best(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    checkpoints.rotate(tmp_path, keep=1, protect=4)
    assert [p.name for p in checkpoints.all_checkpoints(tmp_path)] == [
        "checkpoint-4",
        "checkpoint-8",
    ]
    checkpoints.rotate(tmp_path, keep=1, protect=8)  # a later best frees the old one
    assert [p.name for p in checkpoints.all_checkpoints(tmp_path)] == ["checkpoint-8"]
