"""From the text of a trainer's /metrics endpoint to the GemmaFineTune's live status.

Pure: ``parse`` turns the Prometheus text format into a ``Reading`` (or raises ``BadMetrics``
naming what is wrong), ``live_status`` turns a reading into the ``progress``, ``metrics`` and
``lastCheckpoint`` parts of the status, and ``metrics_condition`` says whether the endpoint
answers. The reading loop (``scraper``) does the I/O and the timing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gft_operator.status import condition, timestamp

Manifest = dict[str, Any]

METRICS_CONDITION = "MetricsAvailable"

# trainer metric -> status.metrics field
_METRIC_FIELDS = {
    "gft_train_loss": "loss",
    "gft_eval_loss": "evalLoss",
    "gft_train_token_accuracy_ratio": "tokenAccuracy",
    "gft_eval_token_accuracy_ratio": "evalTokenAccuracy",
    "gft_eval_exact_match_ratio": "evalExactMatch",
    "gft_learning_rate": "learningRate",
    "gft_tokens_per_second": "tokensPerSecond",
    "gft_samples_per_second": "samplesPerSecond",
}
_PROGRESS = (
    "gft_global_step",
    "gft_total_steps",
    "gft_epoch",
    "gft_eta_seconds",
    "gft_last_checkpoint_step",
    "gft_last_log_timestamp_seconds",
    "gft_last_checkpoint_timestamp_seconds",
)
_GPU = ("gft_gpu_utilization_ratio", "gft_gpu_memory_used_bytes")


class BadMetrics(ValueError):
    """The endpoint answered, but not with a trainer's metrics."""


@dataclass(frozen=True)
class Reading:
    """The numbers of one read of a trainer's /metrics."""

    values: dict[str, float]
    """Single-series trainer metrics by name (absent: the trainer has not reported it yet)."""

    gpus: dict[str, list[float]] = field(default_factory=dict)
    """Per-GPU series by metric name, one value per GPU."""

    peer_gpus: tuple[dict[str, list[float]], ...] = ()
    """The same, from each other pod of a multi-node run that answered."""

    @property
    def step(self) -> int | None:
        value = self.values.get("gft_global_step")
        return None if value is None else int(value)

    @property
    def logged_at(self) -> float | None:
        """Unix time of the trainer's logging step these numbers come from."""
        return self.values.get("gft_last_log_timestamp_seconds")


def parse(text: str) -> Reading:
    """Parse the Prometheus text format; ``BadMetrics`` says why when it is not a trainer's."""
    values: dict[str, float] = {}
    gpus: dict[str, list[float]] = {}
    for name, value in _samples(text):
        if name in _GPU:
            gpus.setdefault(name, []).append(value)
        elif name in _METRIC_FIELDS or name in _PROGRESS:
            values[name] = value
    if "gft_global_step" not in values:
        raise BadMetrics(
            "no gft_global_step series: the endpoint is not a gft trainer's /metrics "
            "(check the metrics port of the trainer container)"
        )
    return Reading(values=values, gpus=gpus)


def parse_gpus(text: str) -> dict[str, list[float]]:
    """The per-GPU series of one pod of a multi-node run other than pod 0 (it serves its GPUs'
    readings alone; none at all without a GPU)."""
    gpus: dict[str, list[float]] = {}
    for name, value in _samples(text):
        if name in _GPU:
            gpus.setdefault(name, []).append(value)
    return gpus


def _samples(text: str) -> Iterator[tuple[str, float]]:
    """(name, value) of every finite sample; ``BadMetrics`` when it is not the text format."""
    try:
        samples = [
            (sample.name, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if math.isfinite(sample.value)
        ]
    except (ValueError, TypeError, IndexError) as e:
        first = text.strip().splitlines()[0][:120] if text.strip() else "(empty)"
        raise BadMetrics(
            f"not the Prometheus text format ({e}); it starts with: {first!r}"
        ) from None
    yield from samples


def _number(value: float) -> float:
    """Six significant digits: more is noise in a status, and it keeps equal readings equal."""
    return float(f"{value:.6g}")


def live_status(reading: Reading) -> Manifest:
    """``progress``, ``metrics`` and ``lastCheckpoint`` for the status (without ``updatedAt``,
    so that two readings of the same numbers compare equal)."""
    v = reading.values
    progress: Manifest = {}
    step = reading.step
    total = v.get("gft_total_steps")
    if step is not None:
        progress["step"] = step
    if total:
        progress["totalSteps"] = int(total)
        if step is not None:
            progress["percent"] = round(min(100.0, 100.0 * step / total), 1)
    if "gft_epoch" in v:
        progress["epoch"] = round(max(0.0, v["gft_epoch"]), 3)
    if "gft_eta_seconds" in v:
        progress["etaSeconds"] = max(0, int(v["gft_eta_seconds"]))

    metrics: Manifest = {
        name: _number(v[metric]) for metric, name in _METRIC_FIELDS.items() if metric in v
    }
    # The mean over every GPU of the run: pod 0's and those of the other pods that answered.
    pods = (reading.gpus, *reading.peer_gpus)
    util = [u for gpus in pods for u in gpus.get("gft_gpu_utilization_ratio", [])]
    if util:
        metrics["gpuUtilization"] = round(sum(util) / len(util), 3)
    memory = [m for gpus in pods for m in gpus.get("gft_gpu_memory_used_bytes", [])]
    if memory:
        metrics["gpuMemoryBytes"] = int(sum(memory) / len(memory))

    out: Manifest = {"progress": progress, "metrics": metrics}
    checkpoint = v.get("gft_last_checkpoint_step")
    if checkpoint:  # 0: no checkpoint saved by this attempt yet
        out["lastCheckpoint"] = {"step": int(checkpoint)}
        saved = v.get("gft_last_checkpoint_timestamp_seconds")
        if saved:
            out["lastCheckpoint"]["time"] = timestamp(saved)
    return out


def changed(written: Manifest | None, new: Manifest) -> bool:
    """Whether ``new`` says something the status does not (``updatedAt`` aside)."""
    if written is None:
        return True
    for key in ("metrics", "lastCheckpoint"):
        if any(written.get(key, {}).get(k) != val for k, val in new.get(key, {}).items()):
            return True
    old_progress = {k: val for k, val in written.get("progress", {}).items() if k != "updatedAt"}
    return any(old_progress.get(k) != val for k, val in new["progress"].items())


def metrics_condition(
    old_conditions: list[Manifest],
    state: tuple[str, str, str],
    generation: int,
    now: str,
) -> list[Manifest] | None:
    """The conditions with ``MetricsAvailable`` set to ``state`` (status, reason, message), or
    ``None`` when its status and reason are already those."""
    status, reason, message = state
    previous = next((c for c in old_conditions if c.get("type") == METRICS_CONDITION), None)
    if previous is not None and (previous.get("status"), previous.get("reason")) == (
        status,
        reason,
    ):
        return None
    others = [c for c in old_conditions if c.get("type") != METRICS_CONDITION]
    new = condition(previous, METRICS_CONDITION, status, reason, message, generation, now)
    return [*others, new]


def read_state(
    problem: tuple[str, str] | None, served_before: bool, seconds_running: float, grace: float
) -> tuple[str, str, str]:
    """``MetricsAvailable`` after a read: True when it worked; Unknown while a trainer that has
    never served yet is within ``grace`` seconds of starting (it is importing torch and loading
    the model); False otherwise, with the read's reason."""
    if problem is None:
        return "True", "MetricsRead", "the trainer's /metrics endpoint answers"
    reason, message = problem
    if reason == "MetricsUnreachable" and not served_before and seconds_running < grace:
        return (
            "Unknown",
            "TrainerStarting",
            f"the trainer has not opened its metrics endpoint yet (loading); {message}",
        )
    return "False", reason, message
