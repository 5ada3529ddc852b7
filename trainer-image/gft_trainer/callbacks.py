"""Side concerns of the loop, each a small ``TrainerCallback``: the log line, TensorBoard scalars
and text, the best checkpoint and early stopping, and stop-on-signal. (Prometheus lives in
``metrics.py``.)

They read the ``logs`` dict that ``GemmaTrainer.log`` fills: ``loss``, ``token_accuracy``,
``learning_rate``, ``grad_norm``, ``tokens_per_second``, ``samples_per_second``,
``step_time_seconds``, ``eta_seconds``, ``tokens_total``, ``samples_total``, and for evaluation
``eval_loss``, ``eval_token_accuracy``, ``eval_exact_match``, ``eval_samples_seconds``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gft_api.contract import Sample
from gft_api.training import BestMetric, EarlyStopping
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gft_trainer import judge, samples
from gft_trainer.errors import StopRequested
from gft_trainer.gpu import read_gpus
from gft_trainer.signals import StopFlag, agreed

log = logging.getLogger("gft")


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_log_line(step: int, total: int, logs: dict[str, float]) -> str | None:
    """One line a human reads: step/total, loss, accuracy, lr, tokens/s, ETA."""
    pct = f" ({100 * step / total:.0f}%)" if total else ""
    if "eval_loss" in logs:
        acc = logs.get("eval_token_accuracy")
        match = logs.get("eval_exact_match")
        return (
            f"eval  step {step}/{total} | eval_loss {logs['eval_loss']:.4f}"
            + (f" | eval_acc {acc:.4f}" if acc is not None else "")
            + (f" | exact_match {match:.3f}" if match is not None else "")
            + f" | {logs.get('eval_runtime', 0.0):.1f}s"
            + (
                f" + samples {logs['eval_samples_seconds']:.1f}s"
                if "eval_samples_seconds" in logs
                else ""
            )
        )
    if "loss" not in logs:
        return None
    parts = [f"step {step}/{total}{pct}", f"epoch {logs.get('epoch', 0.0):.2f}"]
    parts.append(f"loss {logs['loss']:.4f}")
    if "token_accuracy" in logs:
        parts.append(f"acc {logs['token_accuracy']:.4f}")
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if "grad_norm" in logs:
        parts.append(f"grad {logs['grad_norm']:.3f}")
    if "tokens_per_second" in logs:
        parts.append(f"{logs['tokens_per_second']:,.0f} tok/s")
    parts.append(f"ETA {format_duration(logs.get('eta_seconds'))}")
    return " | ".join(parts)


class LogLine(TrainerCallback):
    """A readable line per logging step (and per evaluation), on the main process."""

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
        line = format_log_line(state.global_step, state.max_steps, logs)
        if line:
            log.info(line)


TB_TRAIN = {
    "loss": "train/loss",
    "token_accuracy": "train/token_accuracy",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_second": "train/tokens_per_second",
    "samples_per_second": "train/samples_per_second",
    "step_time_seconds": "train/step_time_seconds",
    "epoch": "train/epoch",
}
TB_EVAL = {
    "eval_loss": "eval/loss",
    "eval_token_accuracy": "eval/token_accuracy",
    "eval_exact_match": "eval/exact_match",
}


def tensorboard_run_dir(root: Path, run_name: str) -> Path:
    """Where this run's event files go under ``root``: a folder per run name (the operator
    passes ``namespace/name``), so TensorBoard lists the run by the fine-tune's name, not "."."""
    parts = [p for p in run_name.split("/") if p not in ("", ".", "..")]
    return root.joinpath(*parts) if parts else root / "run"


class TensorBoardScalars(TrainerCallback):
    """Scalars for TensorBoard, flushed at every log so the sidecar shows them live."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer: Any = None

    def _writer(self) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir))
        return self.writer

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
        w = self._writer()
        step = state.global_step
        tags = TB_EVAL if "eval_loss" in logs else TB_TRAIN
        for key, tag in tags.items():
            if isinstance(logs.get(key), int | float):
                w.add_scalar(tag, float(logs[key]), step)
        if "loss" in logs:
            for g in read_gpus():
                w.add_scalar(f"gpu{g.index}/utilization_ratio", g.utilization_ratio, step)
                w.add_scalar(f"gpu{g.index}/memory_used_bytes", g.memory_used_bytes, step)
                if g.power_watts is not None:
                    w.add_scalar(f"gpu{g.index}/power_watts", g.power_watts, step)
                if g.temperature_celsius is not None:
                    w.add_scalar(f"gpu{g.index}/temperature_celsius", g.temperature_celsius, step)
        w.flush()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.close()

    def samples(self, step: int, answers: list[Sample]) -> None:
        """Sample answers for TensorBoard's text tab, one tag per prompt."""
        w = self._writer()
        for i, sample in enumerate(answers, 1):
            w.add_text(f"samples/{i}", samples.markdown(sample), step)
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class KeepBest(TrainerCallback):
    """After each evaluation: a new best ``metricForBest`` is checkpointed at once (so the best
    weights can be exported and never rotated away), and with ``earlyStopping`` training
    stops once the metric has stalled for ``patience`` evaluations."""

    def __init__(self, metric: BestMetric, early: EarlyStopping | None) -> None:
        self.metric = metric
        self.early = early
        self.stopped_early = False

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if state.global_step == 0:
            return
        top = judge.best(state.log_history, self.metric)
        if top is not None and top.step == state.global_step:
            state.best_metric = top.value
            state.best_global_step = top.step
            control.should_save = True
        if self.early and judge.should_stop_early(
            state.log_history, self.metric, self.early.patience, self.early.min_delta
        ):
            self.stopped_early = True
            control.should_training_stop = True


class StopOnSignal(TrainerCallback):
    """On a stop request: save a checkpoint at this step end, then stop. Mid-evaluation: abort
    the evaluation (raise), and the caller saves the checkpoint of the step just finished."""

    def __init__(self, flag: StopFlag) -> None:
        self.flag = flag

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.flag.training = True

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if agreed(self.flag.requested):
            self.flag.requested = True
            control.should_evaluate = False
            control.should_save = True
            control.should_training_stop = True

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if agreed(self.flag.requested):
            self.flag.requested = True
            raise StopRequested("stop requested during evaluation")
