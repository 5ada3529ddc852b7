"""Is the fine-tune working? The best evaluation so far, when to stop early, when it diverged.

Pure functions over the trainer's log history (``TrainerState.log_history``, saved in every
checkpoint), so that a resumed run judges exactly as the run it continues would have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gft_api.training import BestMetric

History = Sequence[dict[str, Any]]


@dataclass(frozen=True)
class Best:
    step: int
    value: float
    entry: dict[str, Any]
    """The whole evaluation log entry at that step (eval_loss, eval_token_accuracy, ...)."""


def greater_is_better(metric: BestMetric) -> bool:
    return metric != BestMetric.EVAL_LOSS


def evaluations(history: History, metric: BestMetric) -> list[tuple[int, float, dict[str, Any]]]:
    """(step, value, entry) of every evaluation after training began that reported ``metric``.
    An evaluation at step 0 (``evalOnStart``) is the base model: a baseline, never the best."""
    found = []
    for entry in history:
        value = entry.get(metric.value)
        step = int(entry.get("step", 0))
        if step > 0 and isinstance(value, int | float) and math.isfinite(value):
            found.append((step, float(value), entry))
    return found


def best(history: History, metric: BestMetric) -> Best | None:
    """The evaluation with the best value; the earliest of equals (a later tie is no gain)."""
    greater = greater_is_better(metric)
    top: Best | None = None
    for step, value, entry in evaluations(history, metric):
        if top is None or (value > top.value if greater else value < top.value):
            top = Best(step, value, entry)
    return top


def evaluations_without_improvement(values: Sequence[float], greater: bool, delta: float) -> int:
    """How many evaluations in a row, up to the last, failed to beat the reference by more than
    ``delta``. The reference is the first value, then each value that did beat it."""
    stale = 0
    reference: float | None = None
    for value in values:
        gain = None if reference is None else (value - reference if greater else reference - value)
        if gain is None or gain > delta:
            reference, stale = value, 0
        else:
            stale += 1
    return stale


def should_stop_early(history: History, metric: BestMetric, patience: int, delta: float) -> bool:
    values = [v for _, v, _ in evaluations(history, metric)]
    stale = evaluations_without_improvement(values, greater_is_better(metric), delta)
    return stale >= patience


def first_loss(history: History) -> float | None:
    """The run's first logged training loss: where the fine-tune started."""
    for entry in history:
        value = entry.get("loss")
        if isinstance(value, int | float) and math.isfinite(value):
            return float(value)
    return None


def divergence(
    loss: float | None,
    nonfinite_steps: int,
    grad_norm: float | None,
    start: float | None,
    factor: float,
) -> str | None:
    """Why the run has diverged, or ``None`` while it has not.

    ``nonfinite_steps`` counts micro-batches whose loss was NaN or infinite since the last log:
    the logged loss is a mean and one of them poisons it, but say how many there were."""
    if nonfinite_steps:
        return f"the loss was NaN or infinite in {nonfinite_steps} micro-batch(es)"
    if loss is not None and not math.isfinite(loss):
        return f"the loss is {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    if factor and loss is not None and start is not None and start > 0 and loss > factor * start:
        return (
            f"the loss {loss:.4g} is more than {factor:g} times the run's first logged loss "
            f"{start:.4g} (training.divergenceFactor)"
        )
    return None
