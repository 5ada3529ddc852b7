"""Each callback alone: the log line, TensorBoard scalars, the Prometheus endpoint, the summary."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from gft_api.contract import TERMINATION_MESSAGE_LIMIT, Outcome, TrainerSummary
from gft_trainer.callbacks import (
    TensorBoardScalars,
    format_duration,
    format_log_line,
    tensorboard_run_dir,
)
from gft_trainer.data import Truncation
from gft_trainer.metrics import PrometheusMetrics
from prometheus_client.parser import text_string_to_metric_families
from transformers import TrainerControl, TrainerState, TrainingArguments

LOGS = {
    "loss": 1.5,
    "token_accuracy": 0.25,
    "learning_rate": 2e-4,
    "grad_norm": 0.5,
    "tokens_per_second": 1234.0,
    "samples_per_second": 3.0,
    "step_time_seconds": 0.4,
    "eta_seconds": 83.0,
    "epoch": 0.5,
    "tokens_total": 5000.0,
    "samples_total": 40.0,
}


def state(step: int = 10, total: int = 50) -> TrainerState:
    s = TrainerState()
    s.global_step, s.max_steps, s.is_world_process_zero = step, total, True
    return s


def scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_log_line_is_readable() -> None:
    line = format_log_line(10, 50, LOGS)
    assert line == (
        "step 10/50 (20%) | epoch 0.50 | loss 1.5000 | acc 0.2500 | lr 2.00e-04 | "
        "grad 0.500 | 1,234 tok/s | ETA 1m23s"
    )
    assert "eval_acc 0.6000" in format_log_line(
        10, 50, {"eval_loss": 1.0, "eval_token_accuracy": 0.6}
    )
    assert format_duration(3725) == "1h02m"


def test_prometheus_serves_gft_metrics_and_no_gpu_series(tmp_path: Path) -> None:
    metrics = PrometheusMetrics("ns/run")
    metrics.set_data(120, Truncation(examples=7, answers_cut=2))
    port = metrics.serve("127.0.0.1", 0)
    try:
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
        metrics.on_train_begin(args, state(), TrainerControl())
        metrics.on_log(args, state(), TrainerControl(), logs=dict(LOGS))
        metrics.on_log(
            args, state(), TrainerControl(), logs={"eval_loss": 1.25, "eval_token_accuracy": 0.5}
        )
        metrics.on_save(args, state(step=10), TrainerControl())
        got = scrape(port)
    finally:
        metrics.shutdown()
    value = {name: samples[0].value for name, samples in got.items() if samples}
    assert value["gft_train_loss"] == 1.5 and value["gft_eval_loss"] == 1.25
    assert value["gft_train_tokens"] == 5000  # counter family; sample gft_train_tokens_total
    assert got["gft_train_tokens"][0].name == "gft_train_tokens_total"
    assert value["gft_total_steps"] == 50 and value["gft_global_step"] == 10
    assert value["gft_last_checkpoint_step"] == 10 and value["gft_eta_seconds"] == 83
    assert got["gft_train_loss"][0].labels == {"run": "ns/run"}
    data = {sample.labels["kind"]: sample.value for sample in got["gft_data_examples"]}
    assert data == {"total": 120, "truncated": 7, "answer_cut": 2}
    # This machine has no GPU: the GPU series are absent, and scraping did not fail.
    assert not [n for n in got if n.startswith("gft_gpu_")]


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardScalars(tmp_path / "tb")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    tb.on_log(args, state(step=2), TrainerControl(), logs=dict(LOGS))
    tb.on_log(args, state(step=4), TrainerControl(), logs={**LOGS, "loss": 1.0})
    tb.on_log(args, state(step=4), TrainerControl(), logs={"eval_loss": 0.9})
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(2, 1.5), (4, 1.0)]
    assert abs(acc.Scalars("eval/loss")[0].value - 0.9) < 1e-6
    assert {
        "train/learning_rate",
        "train/tokens_per_second",
        "train/token_accuracy",
        "train/grad_norm",
        "train/step_time_seconds",
    } <= set(acc.Tags()["scalars"])


def test_tensorboard_lists_the_run_by_the_finetunes_name(tmp_path: Path) -> None:
    root = tmp_path / "tensorboard"
    assert tensorboard_run_dir(root, "team-a/pip") == root / "team-a" / "pip"
    # A name never leaves the TensorBoard folder, and an empty one still gets a folder.
    assert tensorboard_run_dir(root, "../../etc/./x") == root / "etc" / "x"
    assert tensorboard_run_dir(root, "/") == root / "run"


def test_termination_message_fits() -> None:
    s = TrainerSummary(
        outcome=Outcome.FAILED,
        exit_code=1,
        reason="TrainerFailed",
        message="x" * 2048,
        artifacts={f"a{i}": "/p" * 200 for i in range(8)},
    )
    assert len(s.to_termination_message().encode()) <= TERMINATION_MESSAGE_LIMIT
