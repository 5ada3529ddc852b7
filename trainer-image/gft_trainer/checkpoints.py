"""Checkpoints on the output volume: which are valid, which is newest, which to delete.

transformers' ``Trainer`` writes a checkpoint folder (``checkpoint-<step>``: weights or adapter,
optimizer, scheduler, RNG states, trainer state with the global step). The trainer adds a
completion marker, written last and atomically, once every rank has finished writing. A folder
without the marker, or whose trainer state does not parse, is a checkpoint that was cut short
(a pod killed mid-save) and is never resumed from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

MARKER = "gft-checkpoint-complete.json"
TRAINER_STATE = "trainer_state.json"
PATTERN = re.compile(r"^checkpoint-(\d+)$")


def step_of(path: Path) -> int | None:
    m = PATTERN.match(path.name)
    return int(m.group(1)) if m else None


def is_valid(path: Path) -> bool:
    """Marker present and trainer state readable, with the step the folder is named after."""
    try:
        marker = json.loads((path / MARKER).read_text())
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("global_step") == state.get("global_step") == step_of(path)


def all_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0)


def newest_valid(root: Path) -> Path | None:
    """The checkpoint to resume from: the newest valid one; cut-short ones are skipped."""
    for path in reversed(all_checkpoints(root)):
        if is_valid(path):
            return path
    return None


def mark_complete(path: Path, global_step: int) -> None:
    """Write the marker atomically (temp file, fsync, rename)."""
    tmp = path / f".{MARKER}.tmp"
    with tmp.open("w") as f:
        json.dump({"global_step": global_step, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MARKER)


def rotate(root: Path, keep: int, protect: int | None = None) -> list[Path]:
    """Keep the ``keep`` newest valid checkpoints, and the one of step ``protect`` (the best);
    delete older ones and cut-short ones older than the newest valid. Returns what was
    deleted."""
    checkpoints = all_checkpoints(root)
    valid = [p for p in checkpoints if is_valid(p)]
    keepers = set(valid[-keep:]) | {p for p in valid if step_of(p) == protect}
    newest = step_of(valid[-1]) if valid else None
    deleted = []
    for p in checkpoints:
        step = step_of(p) or 0
        if p in keepers or newest is None or step > newest:
            continue
        shutil.rmtree(p, ignore_errors=True)
        deleted.append(p)
    return deleted
