"""The operator's own Prometheus metrics: reconciles, errors, durations, fine-tunes by phase,
status-update lag and trainer metrics reads. Served by ``serve`` on ``--metrics-address``."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()

RECONCILES = Counter("gft_operator_reconciles", "Reconciles of GemmaFineTunes.", registry=REGISTRY)
RECONCILE_ERRORS = Counter(
    "gft_operator_reconcile_errors",
    "Reconciles that raised (retried by the next event or resync).",
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "gft_operator_reconcile_duration_seconds",
    "Wall time of one reconcile.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
STATUS_LAG = Histogram(
    "gft_operator_status_update_lag_seconds",
    "Seconds from the trainer's logging step to the status write that carried it.",
    buckets=(0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300),
    registry=REGISTRY,
)
METRICS_READS = Counter(
    "gft_operator_metrics_reads", "Reads of trainers' /metrics endpoints.", registry=REGISTRY
)
METRICS_READ_FAILURES = Counter(
    "gft_operator_metrics_read_failures",
    "Reads of trainers' /metrics that failed, by reason (unreachable, timeout, invalid).",
    ["reason"],
    registry=REGISTRY,
)
STATUS_WRITES = Counter(
    "gft_operator_status_writes",
    "Status writes to GemmaFineTunes, by kind (phase: a reconcile; metrics: live numbers).",
    ["kind"],
    registry=REGISTRY,
)
for _reason in ("unreachable", "timeout", "invalid"):
    METRICS_READ_FAILURES.labels(_reason)
for _kind in ("phase", "metrics"):
    STATUS_WRITES.labels(_kind)


class PhaseCollector(Collector):
    """``gft_operator_finetunes{namespace,phase}`` from the phases the operator last wrote."""

    def __init__(self) -> None:
        self.phases: dict[tuple[str, str], str] = {}

    def set(self, namespace: str, name: str, phase: str | None) -> None:
        if phase is None:
            self.phases.pop((namespace, name), None)
        else:
            self.phases[(namespace, name)] = phase

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "gft_operator_finetunes",
            "GemmaFineTunes by namespace and phase.",
            labels=["namespace", "phase"],
        )
        counts: dict[tuple[str, str], int] = {}
        for (namespace, _), phase in list(self.phases.items()):
            counts[(namespace, phase)] = counts.get((namespace, phase), 0) + 1
        for (namespace, phase), count in sorted(counts.items()):
            family.add_metric([namespace, phase], count)
        yield family


PHASES = PhaseCollector()
REGISTRY.register(PHASES)


def serve(address: str) -> None:
    """Serve /metrics on ``host:port`` in a background thread."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=REGISTRY)
