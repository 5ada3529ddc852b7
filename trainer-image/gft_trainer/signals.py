"""Stop requests: SIGTERM (the kubelet, ``kubectl delete``, a suspend) and SIGINT (Ctrl-C).

The handler only sets a flag. Before training starts there is nothing to save, so the stop is
immediate; once the loop runs, ``StopOnSignal`` (a callback) turns the flag into "save a
checkpoint, then stop" at the next step end. With several ranks, every rank agrees on the flag
(a max all-reduce) so that all stop at the same step.
"""

from __future__ import annotations

import signal
from types import FrameType

from gft_trainer.errors import StopRequested


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self.training = False  # set once the loop runs; before that a signal stops at once

    def install(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> StopFlag:
        self._previous = {s: signal.signal(s, self._handle) for s in signals}
        return self

    def uninstall(self) -> None:
        for s, handler in getattr(self, "_previous", {}).items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if not self.training:
            raise StopRequested(f"{self.signal_name} before training started")


def agreed(local: bool) -> bool:
    """True on every rank if it is true on any rank (no-op without torch.distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return local
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if local else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
