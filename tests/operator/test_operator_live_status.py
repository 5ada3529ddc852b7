"""Live status without a cluster: the trainer's real /metrics text parsed into the status, the
MetricsAvailable condition, and the reading loop against real loopback endpoints (fast, slow,
dead, garbage) to show that one bad trainer never delays the others."""

from __future__ import annotations

import datetime
import http.server
import itertools
import logging
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from gft_operator import monitoring
from gft_operator.scraper import Access, Problem, Scraper, Target
from gft_operator.trainer_metrics import (
    BadMetrics,
    changed,
    live_status,
    metrics_condition,
    parse,
    parse_gpus,
    read_state,
)
from prometheus_client import CollectorRegistry, Gauge, generate_latest

NOW = "2026-01-01T00:10:00Z"


def trainer_text(tmp_path: Path, step: int = 10, total: int = 40) -> str:
    """What the trainer's own PrometheusMetrics callback serves after a logging step."""
    from gft_trainer.metrics import PrometheusMetrics
    from transformers import TrainerControl, TrainerState, TrainingArguments

    state = TrainerState()
    state.global_step, state.max_steps, state.is_world_process_zero = step, total, True
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    metrics = PrometheusMetrics("ml/demo")
    metrics.on_train_begin(args, state, TrainerControl())
    logs = {
        "loss": 1.234567891,
        "token_accuracy": 0.5,
        "learning_rate": 2e-4,
        "tokens_per_second": 1500.25,
        "samples_per_second": 3.5,
        "eta_seconds": 61.7,
        "epoch": 0.25,
    }
    metrics.on_log(args, state, TrainerControl(), logs=logs)
    metrics.on_log(args, state, TrainerControl(), logs={"eval_loss": 1.5})
    metrics.on_save(args, state, TrainerControl())
    return generate_latest(metrics.registry).decode()


def gpu_text() -> str:
    registry = CollectorRegistry()
    Gauge("gft_global_step", "", ["run"], registry=registry).labels("r").set(3)
    util = Gauge("gft_gpu_utilization_ratio", "", ["run", "gpu"], registry=registry)
    memory = Gauge("gft_gpu_memory_used_bytes", "", ["run", "gpu"], registry=registry)
    for gpu, (u, m) in enumerate([(0.9, 10e9), (0.7, 20e9)]):
        util.labels("r", str(gpu)).set(u)
        memory.labels("r", str(gpu)).set(m)
    return generate_latest(registry).decode()


def test_the_trainers_own_metrics_become_progress_and_metrics(tmp_path: Path) -> None:
    reading = parse(trainer_text(tmp_path))
    live = live_status(reading)
    assert live["progress"] == {
        "step": 10,
        "totalSteps": 40,
        "percent": 25.0,
        "epoch": 0.25,
        "etaSeconds": 61,
    }
    assert live["metrics"] == {
        "loss": 1.23457,  # six significant digits
        "evalLoss": 1.5,
        "tokenAccuracy": 0.5,
        "learningRate": 0.0002,
        "tokensPerSecond": 1500.25,
        "samplesPerSecond": 3.5,
    }
    assert live["lastCheckpoint"]["step"] == 10
    saved = datetime.datetime.strptime(live["lastCheckpoint"]["time"], "%Y-%m-%dT%H:%M:%SZ")
    assert abs(saved.replace(tzinfo=datetime.UTC).timestamp() - time.time()) < 60
    assert reading.logged_at is not None and abs(reading.logged_at - time.time()) < 60


def test_gpu_series_are_averaged_over_the_pods_gpus() -> None:
    metrics = live_status(parse(gpu_text()))["metrics"]
    assert metrics == {"gpuUtilization": 0.8, "gpuMemoryBytes": 15_000_000_000}


def gpu_only_text(util: float, memory: float) -> str:
    """What a multi-node run's pods past 0 serve: their GPUs' readings alone."""
    registry = CollectorRegistry()
    Gauge("gft_gpu_utilization_ratio", "", ["run", "gpu"], registry=registry).labels("r", "0").set(
        util
    )
    Gauge("gft_gpu_memory_used_bytes", "", ["run", "gpu"], registry=registry).labels("r", "0").set(
        memory
    )
    return generate_latest(registry).decode()


def test_a_multi_node_runs_gpus_are_averaged_over_every_pod() -> None:
    reading = parse(gpu_text())  # pod 0: 0.9 and 0.7, 10 GB and 20 GB
    peers = (parse_gpus(gpu_only_text(0.2, 30e9)), parse_gpus(""))  # pod 1; pod 2 has no GPU
    metrics = live_status(replace(reading, peer_gpus=peers))["metrics"]
    assert metrics == {"gpuUtilization": 0.6, "gpuMemoryBytes": 20_000_000_000}
    with pytest.raises(BadMetrics, match="not the Prometheus text format"):
        parse_gpus("<html>a login page</html>")


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "no gft_global_step"),
        ("<html><body>Welcome to nginx</body></html>", "not the Prometheus text format"),
        ("\x00\x01\x02 binary", "not the Prometheus text format"),
        ("# TYPE up gauge\nup 1\n", "no gft_global_step"),
        ('gft_global_step{run="x" 3\n', "not the Prometheus text format"),
    ],
)
def test_garbage_is_refused_saying_why(text: str, says: str) -> None:
    with pytest.raises(BadMetrics, match=says):
        parse(text)


def test_only_news_is_written(tmp_path: Path) -> None:
    live = live_status(parse(trainer_text(tmp_path)))
    written = {**live, "progress": {**live["progress"], "updatedAt": NOW}}
    assert changed(None, live)
    assert not changed(written, live_status(parse(trainer_text(tmp_path))))
    assert changed(written, live_status(parse(trainer_text(tmp_path, step=11))))


def test_metrics_condition_changes_only_when_its_reason_does() -> None:
    ok = read_state(None, served_before=True, seconds_running=5, grace=60)
    first = metrics_condition([{"type": "Ready", "status": "True"}], ok, 3, NOW)
    assert first is not None and first[0] == {"type": "Ready", "status": "True"}
    assert first[1]["type"] == "MetricsAvailable" and first[1]["status"] == "True"
    assert metrics_condition(first, ok, 3, "later") is None

    down = read_state(("MetricsUnreachable", "refused"), True, 5, 60)
    after = metrics_condition(first, down, 3, "later")
    assert after is not None and after[1]["status"] == "False"
    assert after[1]["reason"] == "MetricsUnreachable" and after[1]["lastTransitionTime"] == "later"


def test_a_loading_trainer_is_unknown_until_the_grace_period_ends() -> None:
    refused = ("MetricsUnreachable", "connection refused")
    assert read_state(refused, served_before=False, seconds_running=30, grace=60)[:2] == (
        "Unknown",
        "TrainerStarting",
    )
    assert read_state(refused, served_before=False, seconds_running=61, grace=60)[0] == "False"
    assert read_state(refused, served_before=True, seconds_running=30, grace=60)[0] == "False"
    garbage = ("MetricsInvalid", "not a trainer")
    assert read_state(garbage, served_before=False, seconds_running=1, grace=60)[0] == "False"


# ---------------------------------------------------------------------------------------------
# The reading loop against real endpoints on loopback
# ---------------------------------------------------------------------------------------------
class _Endpoint(http.server.BaseHTTPRequestHandler):
    body = b""
    delay = 0.0

    def do_GET(self) -> None:
        time.sleep(self.delay)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(self.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the reader gave up waiting: what a slow trainer sees

    def log_message(self, *args: object) -> None:
        pass


def serve(
    body: bytes, delay: float = 0.0, host: str = "127.0.0.1", port: int = 0
) -> http.server.ThreadingHTTPServer:
    handler = type("Handler", (_Endpoint,), {"body": body, "delay": delay})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def target(name: str, port: int) -> Target:
    return Target("ml", name, f"{name}-pod", "127.0.0.1", port, 1, time.time())


def test_one_slow_or_dead_trainer_never_delays_the_others(tmp_path: Path) -> None:
    good = serve(trainer_text(tmp_path).encode())
    slow = serve(trainer_text(tmp_path).encode(), delay=5.0)
    garbage = serve(b"<html>this is not it</html>")
    seen: dict[str, list[tuple[float, Problem | None]]] = {}

    def sink(t: Target, reading, problem) -> bool:
        seen.setdefault(t.name, []).append((time.monotonic(), problem))
        return False

    failures_before = {
        k: monitoring.METRICS_READ_FAILURES.labels(k)._value.get()
        for k in ("timeout", "unreachable", "invalid")
    }
    scraper = Scraper(None, Access.POD_IP, interval=0.5, timeout=0.4, sink=sink, workers=4)  # type: ignore[arg-type]
    scraper.track(target("good", good.server_address[1]))
    scraper.track(target("slow", slow.server_address[1]))
    scraper.track(target("dead", dead_port()))
    scraper.track(target("garbage", garbage.server_address[1]))
    stop = threading.Event()
    loop = threading.Thread(target=scraper.run, args=(stop,), daemon=True)
    started = time.monotonic()
    loop.start()
    time.sleep(3.2)
    stop.set()
    loop.join(5)
    for server in (good, slow, garbage):
        server.shutdown()

    good_reads = [at for at, problem in seen["good"] if problem is None]
    assert len(good_reads) >= 5, seen["good"]  # every 0.5 s over 3.2 s, slow neighbour or not
    gaps = [b - a for a, b in zip([started, *good_reads], good_reads, strict=False)]
    assert max(gaps[1:]) < 1.0, gaps  # never held up by the 5 s trainer
    assert {p.reason for _, p in seen["slow"] if p} == {"MetricsTimeout"}
    assert {p.reason for _, p in seen["dead"] if p} == {"MetricsUnreachable"}
    assert "Connection refused" in seen["dead"][0][1].message  # type: ignore[union-attr]
    assert {p.reason for _, p in seen["garbage"] if p} == {"MetricsInvalid"}
    assert "not the Prometheus text format" in seen["garbage"][0][1].message  # type: ignore[union-attr]
    for kind, name in (("timeout", "slow"), ("unreachable", "dead"), ("invalid", "garbage")):
        after = monitoring.METRICS_READ_FAILURES.labels(kind)._value.get()
        assert after - failures_before[kind] == len(seen[name])


def test_a_multi_node_read_takes_each_pods_gpus_and_leaves_out_a_silent_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    leader = serve(gpu_text().encode())
    port = leader.server_address[1]
    peer = serve(gpu_only_text(0.2, 30e9).encode(), host="127.0.0.2", port=port)
    scraper = Scraper(None, Access.POD_IP, interval=1, timeout=0.5, sink=lambda *a: False)  # type: ignore[arg-type]
    t = replace(target("mn", port), peers=(("mn-1-abc", "127.0.0.2"), ("mn-2-def", "127.0.0.3")))
    try:
        with caplog.at_level(logging.INFO, logger="gft_operator.scraper"):
            first, problem = scraper.read(t)
            second, _ = scraper.read(t)
    finally:
        leader.shutdown()
        peer.shutdown()
    assert problem is None and first is not None and second is not None
    assert first.peer_gpus == ({"gft_gpu_utilization_ratio": [0.2],
                                "gft_gpu_memory_used_bytes": [30e9]},)  # fmt: skip
    assert live_status(first)["metrics"]["gpuUtilization"] == 0.6
    warned = [r.getMessage() for r in caplog.records if "mn-2-def" in r.getMessage()]
    assert len(warned) == 1, warned  # once, not at every read
    assert "left out of the run's averages" in warned[0]


def test_reads_are_spaced_by_the_interval_after_a_write(tmp_path: Path) -> None:
    good = serve(trainer_text(tmp_path).encode())
    writes: list[float] = []

    def sink(t: Target, reading, problem) -> bool:
        writes.append(time.monotonic())
        return True

    scraper = Scraper(None, Access.POD_IP, interval=0.4, timeout=0.3, sink=sink)  # type: ignore[arg-type]
    scraper.track(target("good", good.server_address[1]))
    stop = threading.Event()
    loop = threading.Thread(target=scraper.run, args=(stop,), daemon=True)
    loop.start()
    time.sleep(2.5)
    stop.set()
    loop.join(5)
    good.shutdown()
    assert len(writes) >= 4
    assert min(b - a for a, b in itertools.pairwise(writes)) >= 0.4
