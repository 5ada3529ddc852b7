"""The Prometheus endpoint: ``gft_``-prefixed metrics in base units, labelled with the run.

Training metrics are set from the logs at each logging step (no work per step). GPU metrics are
read from NVML when Prometheus scrapes, by a collector; without a GPU or NVML those series are
simply absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gft_trainer.gpu import read_gpus

# logs key -> (metric name, help)
GAUGES = {
    "loss": ("gft_train_loss", "Training loss (mean over the last logging interval)."),
    "eval_loss": ("gft_eval_loss", "Evaluation loss."),
    "token_accuracy": ("gft_train_token_accuracy_ratio", "Next-token accuracy on training tokens."),
    "eval_token_accuracy": ("gft_eval_token_accuracy_ratio", "Next-token accuracy on eval tokens."),
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


class GpuCollector(Collector):
    """Per-GPU readings at scrape time; yields nothing when there is no GPU or no NVML."""

    def __init__(self, run: str) -> None:
        self.run = run

    def collect(self) -> Iterator[GaugeMetricFamily]:
        readings = read_gpus()
        if not readings:
            return
        families = {
            "utilization_ratio": ("gft_gpu_utilization_ratio", "GPU busy share (0-1)."),
            "memory_used_bytes": ("gft_gpu_memory_used_bytes", "GPU memory in use."),
            "memory_total_bytes": ("gft_gpu_memory_total_bytes", "GPU memory in total."),
            "power_watts": ("gft_gpu_power_watts", "GPU power draw."),
            "temperature_celsius": ("gft_gpu_temperature_celsius", "GPU temperature."),
        }
        for attr, (name, help_text) in families.items():
            fam = GaugeMetricFamily(name, help_text, labels=["run", "gpu"])
            for g in readings:
                value = getattr(g, attr)
                if value is not None:
                    fam.add_metric([self.run, str(g.index)], float(value))
            yield fam


class PrometheusMetrics(TrainerCallback):
    """Owns the registry and the HTTP endpoint; updated from the trainer's logs."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.registry = CollectorRegistry()
        self.gauges = {
            key: Gauge(name, doc, ["run"], registry=self.registry).labels(run)
            for key, (name, doc) in GAUGES.items()
        }
        g = self.gauges
        g["global_step"] = Gauge(
            "gft_global_step", "Optimizer steps done.", ["run"], registry=self.registry
        ).labels(run)
        g["total_steps"] = Gauge(
            "gft_total_steps", "Optimizer steps planned.", ["run"], registry=self.registry
        ).labels(run)
        g["last_checkpoint_step"] = Gauge(
            "gft_last_checkpoint_step",
            "Global step of the newest checkpoint.",
            ["run"],
            registry=self.registry,
        ).labels(run)
        self.tokens = Counter(
            "gft_train_tokens", "Tokens trained on.", ["run"], registry=self.registry
        ).labels(run)
        self.samples = Counter(
            "gft_train_samples", "Sequences trained on.", ["run"], registry=self.registry
        ).labels(run)
        self._counted = {"tokens_total": 0.0, "samples_total": 0.0}
        self.registry.register(GpuCollector(run))
        self.server: Any = None

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
        self.gauges["total_steps"].set(state.max_steps)
        self.gauges["global_step"].set(state.global_step)

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
        for key, value in logs.items():
            if key in self.gauges and isinstance(value, int | float):
                self.gauges[key].set(float(value))
        for key, counter in (("tokens_total", self.tokens), ("samples_total", self.samples)):
            if key in logs and logs[key] > self._counted[key]:
                counter.inc(logs[key] - self._counted[key])
                self._counted[key] = logs[key]
        self.gauges["global_step"].set(state.global_step)
        self.gauges["total_steps"].set(state.max_steps)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.gauges["last_checkpoint_step"].set(state.global_step)
        self.gauges["global_step"].set(state.global_step)
