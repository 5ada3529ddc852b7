"""The Prometheus endpoint: ``gft_``-prefixed metrics in base units, labelled with the run.

Training metrics are set from the logs at each logging step (no work per step). GPU metrics are
read from NVML when Prometheus scrapes, by ``gpu.GpuCollector``; without a GPU or NVML those
series are simply absent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gft_trainer.data import Truncation
from gft_trainer.gpu import GpuCollector

# logs key -> (metric name, help)
GAUGES = {
    "loss": ("gft_train_loss", "Training loss (mean over the last logging interval)."),
    "eval_loss": ("gft_eval_loss", "Evaluation loss."),
    "token_accuracy": ("gft_train_token_accuracy_ratio", "Next-token accuracy on training tokens."),
    "eval_token_accuracy": ("gft_eval_token_accuracy_ratio", "Next-token accuracy on eval tokens."),
    "eval_exact_match": (
        "gft_eval_exact_match_ratio",
        "Share of sampled eval answers equal to the reference.",
    ),
    "learning_rate": ("gft_learning_rate", "Current learning rate."),
    "grad_norm": ("gft_grad_norm", "Gradient norm before clipping."),
    "tokens_per_second": ("gft_tokens_per_second", "Training throughput in tokens per second."),
    "samples_per_second": (
        "gft_samples_per_second",
        "Training throughput in sequences per second.",
    ),
    "step_time_seconds": ("gft_step_time_seconds", "Wall time per optimizer step."),
    "eta_seconds": ("gft_eta_seconds", "Estimated seconds until the planned last step."),
    "epoch": ("gft_epoch", "Epochs done (fractional)."),
}


# Set at the start, at each logging step and at each save.
PROGRESS = {
    "global_step": ("gft_global_step", "Optimizer steps done."),
    "total_steps": ("gft_total_steps", "Optimizer steps planned."),
    # Lets a reader tell how old the numbers are (the operator's status-update lag).
    "last_log_time": (
        "gft_last_log_timestamp_seconds",
        "Unix time of the newest logging step these numbers come from.",
    ),
    "last_checkpoint_step": ("gft_last_checkpoint_step", "Global step of the newest checkpoint."),
    "last_checkpoint_time": (
        "gft_last_checkpoint_timestamp_seconds",
        "Unix time the newest checkpoint was saved.",
    ),
}


class TrainingCollector(Collector):
    """The training numbers, updated together at each logging step and collected as one
    snapshot, so a scrape never sees a new loss beside an old step. A number the trainer has
    not reported yet (eval loss before the first evaluation) is absent, not a misleading 0."""

    def __init__(self, run: str) -> None:
        self.run = run
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()

    def update(self, values: dict[str, float]) -> None:
        with self._lock:
            self._values.update(values)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            snapshot = dict(self._values)
        for key, (name, help_text) in {**GAUGES, **PROGRESS}.items():
            family = GaugeMetricFamily(name, help_text, labels=["run"])
            if key in snapshot:
                family.add_metric([self.run], snapshot[key])
            yield family


class PrometheusMetrics(TrainerCallback):
    """Owns the registry and the HTTP endpoint; updated from the trainer's logs."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.registry = CollectorRegistry()
        self.training = TrainingCollector(run)
        self.registry.register(self.training)
        self.tokens = Counter(
            "gft_train_tokens", "Tokens trained on.", ["run"], registry=self.registry
        ).labels(run)
        self.samples = Counter(
            "gft_train_samples", "Sequences trained on.", ["run"], registry=self.registry
        ).labels(run)
        self._counted = {"tokens_total": 0.0, "samples_total": 0.0}
        data = Gauge(
            "gft_data_examples",
            "Examples after tokenization (train and eval), and how many of them were truncated "
            "to data.maxSeqLength (kind=truncated) or lost answer tokens to it (kind=answer_cut).",
            ["run", "kind"],
            registry=self.registry,
        )
        self.data = {kind: data.labels(run, kind) for kind in ("total", "truncated", "answer_cut")}
        self.registry.register(GpuCollector(run))
        self.server: Any = None

    def set_data(self, examples: int, truncated: Truncation) -> None:
        self.data["total"].set(examples)
        self.data["truncated"].set(truncated.examples)
        self.data["answer_cut"].set(truncated.answers_cut)

    def serve(self, address: str, port: int) -> int:
        """Start the endpoint; returns the port it listens on."""
        self.server, _ = start_http_server(port, addr=address, registry=self.registry)
        return int(self.server.server_address[1])

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.training.update({"total_steps": state.max_steps, "global_step": state.global_step})

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        values = {
            key: float(value)
            for key, value in logs.items()
            if key in GAUGES and isinstance(value, int | float)
        }
        values.update(
            global_step=state.global_step, total_steps=state.max_steps, last_log_time=time.time()
        )
        self.training.update(values)
        for key, counter in (("tokens_total", self.tokens), ("samples_total", self.samples)):
            if key in logs and logs[key] > self._counted[key]:
                counter.inc(logs[key] - self._counted[key])
                self._counted[key] = logs[key]

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.training.update(
            {
                "last_checkpoint_step": state.global_step,
                "last_checkpoint_time": time.time(),
                "global_step": state.global_step,
            }
        )
