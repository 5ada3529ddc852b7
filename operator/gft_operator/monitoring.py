"""The operator's own Prometheus metrics: reconciles, errors, durations, fine-tunes by phase,
status-update lag and trainer metrics reads. Served by ``serve`` on ``--metrics-address``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()

RECONCILES = Counter("gft_operator_reconciles", "Reconciles of GemmaFineTunes.", registry=REGISTRY)
RESYNCS = Counter(
    "gft_operator_resyncs",
    "Passes of the periodic resync (each queues every unfinished fine-tune once).",
    registry=REGISTRY,
)
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
LEADER = Gauge(
    "gft_operator_leader",
    "1 while this replica holds the leader Lease (or runs without leader election), else 0.",
    registry=REGISTRY,
)
STATUS_CONFLICTS = Counter(
    "gft_operator_status_write_conflicts",
    "Status writes refused because the object changed since it was read (then recomputed).",
    registry=REGISTRY,
)
API_UNAVAILABLE = Counter(
    "gft_operator_api_unavailable",
    "Reconciles put off because the API server could not be reached or said not now.",
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

    def clear(self) -> None:
        """This replica stopped leading: the leader reports the fine-tunes now."""
        self.phases.clear()

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


class CacheCollector(Collector):
    """``gft_operator_cached_objects{kind}`` and ``gft_operator_remembered_writes``: how much
    the operator holds in memory (bounded by what is live)."""

    def __init__(self) -> None:
        self.counts: Callable[[], dict[str, int]] = dict

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = dict(self.counts())
        remembered = GaugeMetricFamily(
            "gft_operator_remembered_writes",
            "The operator's own writes whose echo from the watch it still waits for.",
        )
        remembered.add_metric([], counts.pop("remembered_writes", 0))
        yield remembered
        family = GaugeMetricFamily(
            "gft_operator_cached_objects",
            "Objects the operator keeps in memory, by kind (spec: specs kept with their "
            "children, one per unfinished fine-tune).",
            labels=["kind"],
        )
        for kind, count in sorted(counts.items()):
            family.add_metric([kind], count)
        yield family


CACHE_SIZES = CacheCollector()
REGISTRY.register(CACHE_SIZES)


def watch_cache(counts: Callable[[], dict[str, int]]) -> None:
    CACHE_SIZES.counts = counts


def serve(address: str, ready: Callable[[], tuple[bool, str]] = lambda: (True, "ready")) -> None:
    """Serve ``/metrics`` and ``/readyz`` on ``host:port`` in a background thread.

    ``/readyz`` answers 200 once the operator can do its work (connected, watching); a standby
    replica is ready too (it takes over the moment the leader's Lease lapses), and says so."""
    host, _, port = address.rpartition(":")

    class Handler(MetricsHandler.factory(REGISTRY)):  # type: ignore[misc]
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/readyz":
                return super().do_GET()
            ok, text = ready()
            body = (text + "\n").encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass  # probes every few seconds are not news

    server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="gft-metrics").start()
