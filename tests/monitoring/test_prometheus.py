"""The trainer's /metrics through a real Prometheus, as the PodMonitor has it scraped, and the
dashboard's training and GPU panels answered from it.

One ``gft-train`` run (a tiny random Gemma on CPU) serves the whole module: it trains until the
module ends and is then stopped with SIGTERM, so every query finds it alive. No GPU here: a
stand-in exporter serves the trainer's own GPU collector over made-up NVML readings.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_harness import (
    REPO,
    Prometheus,
    dashboard,
    expressions,
    free_port,
    http_get,
    is_operator_query,
    load_manifest,
    pod_target,
    promtool_problems,
    scrape_config,
    substitute,
    training_pod,
    variable_queries,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

NAMESPACE = "ml-team"
FINETUNE = "support-bot"
RUN = f"{NAMESPACE}/{FINETUNE}"  # the run name the operator gives the trainer
VALUES = {"namespace": NAMESPACE, "finetune": FINETUNE}


@dataclass
class Endpoint:
    url: str
    target: dict  # the static target, with the pod's discovery labels


def trainer_target(address: str) -> dict:
    """The training pod the operator makes for FINETUNE, as discovery shows its metrics port."""
    pod = training_pod(FINETUNE, NAMESPACE)
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "trainer"]
    assert "metrics" in [p["name"] for p in container["ports"]]
    return pod_target(
        address,
        namespace=NAMESPACE,
        pod=f"{pod['job']}-x7k2p",
        container=container["name"],
        port="metrics",
        labels=pod["metadata"]["labels"],
    )


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    """``gft-train`` on a tiny Gemma with its endpoint on loopback, stopped at the module's end."""
    from gft_api.contract import TrainerConfig
    from trainer.tiny import DATA, make_model_dir

    tmp = tmp_path_factory.mktemp("trainer")
    port = free_port()
    config = {
        "runName": RUN,
        "model": {"nameOrPath": str(make_model_dir(tmp, "gemma3_text"))},
        "dataset": {"trainFiles": [str(DATA / "chat_small.jsonl")]},
        "data": {"maxSeqLength": 128, "evalFraction": 0.2, "packing": True},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "training": {
            # Far more than the module lasts: it trains while Prometheus scrapes, then is stopped.
            "maxSteps": 1_000_000,
            "batchSize": 2,
            "gradientAccumulationSteps": 1,
            "learningRate": 1e-3,
            "warmupRatio": 0.0,
            "loggingEverySteps": 5,
            "evalEverySteps": 50,
            "evalOnStart": True,
            "gradientCheckpointing": False,
        },
        "output": {"dir": str(tmp / "out"), "checkpointEverySteps": 0, "keepCheckpoints": 1},
        "observability": {
            "metricsPort": port,
            "metricsBindAddress": "127.0.0.1",
            "terminationMessagePath": str(tmp / "termination-log"),
        },
    }
    TrainerConfig.model_validate(config)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    exe = Path(sys.executable).parent / "gft-train"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    log = tmp / "train.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            # Niced: the test and Prometheus get the CPU they need to keep to time.
            ["nice", "-n", "10", str(exe), "--config", str(tmp / "config.yaml")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        yield Endpoint(f"http://127.0.0.1:{port}/metrics", trainer_target(f"127.0.0.1:{port}"))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # checkpoint, then exit 75
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        print(f"gft-train exited {proc.returncode}; log tail:\n{log.read_text()[-1500:]}")


@pytest.fixture(scope="module")
def gpu_exporter() -> Iterator[Endpoint]:
    """The trainer's GpuCollector over two made-up GPUs (NVML is what cannot run here)."""
    from gft_trainer import gpu
    from gft_trainer.gpu import GpuReading
    from prometheus_client import CollectorRegistry, start_http_server

    readings = [
        GpuReading(0, 0.97, 61 * 2**30, 80 * 2**30, 412.5, 71.0),
        GpuReading(1, 0.93, 58 * 2**30, 80 * 2**30, 398.0, 69.0),
    ]
    registry = CollectorRegistry()
    registry.register(gpu.GpuCollector(RUN))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu, "read_gpus", lambda: readings)
        server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
        port = server.server_address[1]
        try:
            yield Endpoint(f"http://127.0.0.1:{port}/metrics", trainer_target(f"127.0.0.1:{port}"))
        finally:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def prometheus(
    trainer: Endpoint, gpu_exporter: Endpoint, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    monitor = load_manifest("podmonitor-trainers.yaml")
    prom = Prometheus(
        tmp_path_factory.mktemp("prometheus"),
        [scrape_config(monitor, [trainer.target, gpu_exporter.target])],
    ).start()
    try:
        yield prom
    finally:
        prom.stop()


def test_series_carry_the_labels_the_podmonitor_gives(
    prometheus: Prometheus, trainer: Endpoint
) -> None:
    step = prometheus.wait_for(
        "a scrape of the trainer", lambda: prometheus.query("gft_global_step")
    )
    gpus = prometheus.wait_for(
        "a scrape of the GPU exporter", lambda: prometheus.query("gft_gpu_utilization_ratio")
    )
    expected = {
        "namespace": NAMESPACE,
        "pod": trainer.target["labels"]["__meta_kubernetes_pod_name"],
        "finetune": FINETUNE,
        "job": "gft-trainer",
        "container": "trainer",
        "endpoint": "metrics",
        "run": RUN,
    }
    for series in step + gpus:
        labels = series["metric"]
        assert {k: labels.get(k) for k in expected} == expected, labels
        assert not any(k.startswith("exported_") for k in labels), labels
    assert sorted(s["metric"]["gpu"] for s in gpus) == ["0", "1"]


def test_prometheus_sees_the_run_train_and_evaluate(prometheus: Prometheus) -> None:
    # Several scrapes, each a few steps further on: the trainer reports live, not at the end.
    prometheus.wait_for(
        "three scrapes showing progress",
        lambda: prometheus.query(
            "count_over_time(gft_global_step[1m]) >= 3"
            " and max_over_time(gft_global_step[1m]) > min_over_time(gft_global_step[1m])"
        ),
    )
    for expr in ("gft_eval_loss > 0", "gft_train_loss > 0", "gft_total_steps == 1000000"):
        assert prometheus.query(expr), expr


def test_dashboard_variables_list_the_finetune(prometheus: Prometheus) -> None:
    queries = variable_queries(dashboard())
    assert set(queries) == {"namespace", "finetune"}
    for name, (selector, label) in queries.items():
        selector = substitute(selector, VALUES)
        values = prometheus.wait_for(
            f"label_values({selector}, {label})",
            lambda selector=selector, label=label: prometheus.label_values(label, selector),
        )
        assert values == [VALUES[name]]


def test_training_and_gpu_panels_have_data(prometheus: Prometheus) -> None:
    """Every dashboard query on trainer series answers (the operator's: the other module)."""
    exprs = {
        name: substitute(expr, VALUES)
        for name, expr in expressions(dashboard())
        if not is_operator_query(expr)
    }
    assert len(exprs) >= 12
    results = prometheus.wait_for_results(exprs)
    progress = results["Progress [A]"][0]
    assert 0 < float(progress["value"][1]) < 1
    assert {s["metric"]["gpu"] for s in results["GPU memory [B]"]} == {"0", "1"}


def scrape(url: str) -> str | None:
    """The /metrics text once the trainer (which imports torch first) serves its numbers."""
    try:
        text = http_get(url)
    except OSError:
        return None
    return text if "gft_" in text else None


@pytest.mark.parametrize("endpoint", ["trainer", "gpu_exporter"])
def test_promtool_accepts_the_metrics(
    endpoint: str, prometheus: Prometheus, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(endpoint).url
    text = prometheus.wait_for(f"{url} to serve", lambda: scrape(url))
    assert promtool_problems(text) == ""
