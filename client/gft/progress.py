"""A fine-tune's progress as a tqdm bar: steps done of planned, the latest loss, the phase and
the operator's ETA, updated from the GemmaFineTune's status as the watch delivers it."""

from __future__ import annotations

import sys
from typing import IO, Any

from gft_api.v1alpha1 import GemmaFineTuneStatus, Phase

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:20}| step {n_fmt}/{total_fmt} [{elapsed}] {status}"


def duration(seconds: float | int | None) -> str:
    """``1h02m``, ``3m05s``, ``42s``."""
    if seconds is None:
        return "?"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def postfix(status: GemmaFineTuneStatus) -> str:
    """``Running loss=1.234 eval_loss=1.301 eta=3m05s``: what a user checks at a glance."""
    parts = [status.phase.value if status.phase else "Pending"]
    if status.reason and status.phase not in (Phase.RUNNING, Phase.SUCCEEDED):
        parts[0] += f"/{status.reason}"
    m = status.metrics
    if m is not None and m.loss is not None:
        parts.append(f"loss={m.loss:.4g}")
    if m is not None and m.eval_loss is not None:
        parts.append(f"eval_loss={m.eval_loss:.4g}")
    p = status.progress
    if status.phase == Phase.RUNNING and p is not None and p.eta_seconds is not None:
        parts.append(f"eta={duration(p.eta_seconds)}")
    return " ".join(parts)


def _bar_class() -> type:
    """tqdm with a ``{status}`` field of its own (tqdm's ``{postfix}`` comes with a comma)."""
    from tqdm import tqdm

    class StatusBar(tqdm):
        status = ""

        @property
        def format_dict(self) -> dict[str, Any]:
            return {**super().format_dict, "status": self.status}

    return StatusBar


class ProgressBar:
    """One bar per fine-tune; ``update`` with each status seen, ``close`` at the end."""

    def __init__(self, name: str, file: IO[str] | None = None, disable: bool = False) -> None:
        self.bar: Any = _bar_class()(
            total=None,
            desc=name,
            unit="step",
            bar_format=BAR_FORMAT,
            file=file or sys.stderr,
            disable=disable,
            mininterval=0,
        )

    def update(self, status: GemmaFineTuneStatus) -> None:
        p = status.progress
        total = p.total_steps if p is not None else None
        step = p.step if p is not None and p.step is not None else self.bar.n
        if status.phase == Phase.SUCCEEDED and status.result is not None:
            total = status.result.total_steps or total
            step = status.result.global_step or step
        if total and total != self.bar.total:
            self.bar.total = total
        self.bar.n = step
        self.bar.status = postfix(status)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
