"""Best evaluation, early stopping and divergence: the decisions, on log histories."""

from __future__ import annotations

import math

import pytest
from gft_api.contract import Sample, TrainerSummary
from gft_api.training import BestMetric
from gft_trainer import judge


def evals(*values: float, start: int = 2, every: int = 2) -> list[dict[str, float]]:
    history: list[dict[str, float]] = []
    for i, v in enumerate(values):
        step = start + i * every
        history.append({"loss": 3.0, "step": step})
        history.append({"eval_loss": v, "eval_token_accuracy": 1 - v / 10, "step": step})
    return history


def test_best_is_the_lowest_loss_and_the_earliest_of_equals() -> None:
    top = judge.best(evals(2.0, 1.5, 1.7, 1.5), BestMetric.EVAL_LOSS)
    assert top is not None and (top.step, top.value) == (4, 1.5)
    assert top.entry["eval_token_accuracy"] == pytest.approx(0.85)


def test_best_accuracy_is_the_highest() -> None:
    top = judge.best(evals(2.0, 1.5, 1.7), BestMetric.EVAL_TOKEN_ACCURACY)
    assert top is not None and top.step == 4


def test_evaluation_on_start_and_nan_are_never_best() -> None:
    history = [{"eval_loss": 0.1, "step": 0}, *evals(2.0, math.nan)]
    top = judge.best(history, BestMetric.EVAL_LOSS)
    assert top is not None and top.step == 2
    assert judge.best([{"loss": 1.0, "step": 1}], BestMetric.EVAL_LOSS) is None


@pytest.mark.parametrize(
    ("values", "delta", "stale"),
    [
        ([2.0, 1.9, 1.8], 0.0, 0),
        ([2.0, 1.9, 1.95, 1.92], 0.0, 2),
        ([2.0, 1.99, 1.98], 0.05, 2),  # small gains do not count
        ([2.0, 2.1, 1.5, 1.6], 0.0, 1),  # a real gain resets the count
        ([], 0.0, 0),
    ],
)
def test_evaluations_without_improvement(values: list[float], delta: float, stale: int) -> None:
    assert judge.evaluations_without_improvement(values, False, delta) == stale


def test_early_stopping_needs_patience_evaluations() -> None:
    history = evals(2.0, 1.9, 1.95, 1.92)
    assert judge.should_stop_early(history, BestMetric.EVAL_LOSS, 2, 0.0)
    assert not judge.should_stop_early(history, BestMetric.EVAL_LOSS, 3, 0.0)


@pytest.mark.parametrize(
    ("loss", "nonfinite", "grad", "start", "factor", "why"),
    [
        (2.0, 0, 1.0, 2.5, 4.0, None),
        (2.0, 3, 1.0, 2.5, 4.0, "NaN or infinite in 3 micro-batch"),
        (math.nan, 0, 1.0, 2.5, 4.0, "the loss is nan"),
        (2.0, 0, math.inf, 2.5, 4.0, "gradient norm is inf"),
        (10.1, 0, 1.0, 2.5, 4.0, "more than 4 times the run's first logged loss 2.5"),
        (10.1, 0, 1.0, 2.5, 0.0, None),  # factor off
        (10.1, 0, 1.0, None, 4.0, None),  # the first log has nothing to compare with
    ],
)
def test_divergence(
    loss: float, nonfinite: int, grad: float, start: float | None, factor: float, why: str | None
) -> None:
    found = judge.divergence(loss, nonfinite, grad, start, factor)
    assert (found is None) == (why is None)
    if why:
        assert why in found


def test_first_loss_survives_a_resume() -> None:
    history = [{"eval_loss": 5.0, "step": 0}, {"loss": math.nan, "step": 1}, {"loss": 4.0}]
    assert judge.first_loss(history) == 4.0


def test_termination_message_drops_samples_before_it_cuts_the_message() -> None:
    summary = TrainerSummary(
        outcome="Succeeded",
        exit_code=0,
        reason="Completed",
        message="trained 10 steps",
        samples=[Sample(prompt="p" * 240, answer="a" * 2000, reference="r" * 240)] * 3,
    )
    text = summary.to_termination_message()
    back = TrainerSummary.from_termination_message(text)
    assert len(text.encode()) <= 4096 and back is not None
    assert back.message == "trained 10 steps" and 0 < len(back.samples) < 3
