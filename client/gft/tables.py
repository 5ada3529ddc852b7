"""Tables a user reads: a run's metrics history (from its TensorBoard event files) and a side by
side comparison of runs (from their specs and statuses), as pandas DataFrames."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Point:
    tag: str
    step: int
    wall_time: float
    value: float


def read_events(folder: Path) -> list[Point]:
    """Every scalar in the event files under ``folder`` (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    points: list[Point] = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = float(value.simple_value)
                elif value.HasField("tensor"):
                    array = tensor_util.make_ndarray(value.tensor)
                    if array.size != 1 or array.dtype.kind not in "fiub":
                        continue  # text samples, histograms: not a scalar
                    number = float(array.reshape(()).item())
                else:
                    continue
                points.append(Point(value.tag, int(event.step), float(event.wall_time), number))
    return points


def metrics_frame(points: Iterable[Point]) -> Any:
    """One row per step, one column per tag (``train/loss``, ``eval/loss``, ...); where an
    attempt logged a step again (a resume), its newest value."""
    import pandas as pd

    rows = sorted(points, key=lambda p: p.wall_time)
    if not rows:
        return pd.DataFrame(index=pd.Index([], name="step", dtype="int64"))
    frame = pd.DataFrame([(p.tag, p.step, p.value) for p in rows], columns=["tag", "step", "v"])
    wide = frame.pivot_table(index="step", columns="tag", values="v", aggfunc="last")
    wide.columns.name = None
    return wide.sort_index()


COMPARED = [
    ("phase", lambda f: f.status.phase.value if f.status.phase else None),
    ("model", lambda f: f.spec.model.name),
    ("method", lambda f: f.spec.method.type.value),
    ("lora r", lambda f: f.spec.method.lora.r if f.spec.method.type.value != "full" else None),
    ("dataset", lambda f: describe_dataset(f.spec)),
    ("learning rate", lambda f: f.spec.training.learning_rate),
    ("batch size", lambda f: _batch(f.spec.training)),
    ("steps", lambda f: _result(f, "global_step")),
    ("epochs", lambda f: _result(f, "epoch")),
    ("train loss", lambda f: _result(f, "train_loss")),
    ("eval loss", lambda f: _result(f, "eval_loss") or _metric(f, "eval_loss")),
    ("eval token accuracy", lambda f: _result(f, "eval_token_accuracy")),
    ("best step", lambda f: _result(f, "best_step")),
    ("tokens/s", lambda f: _result(f, "tokens_per_second")),
    ("runtime (s)", lambda f: _result(f, "runtime_seconds")),
]  # fmt: skip


def _batch(training: Any) -> int:
    return training.batch_size * training.gradient_accumulation_steps


def _result(finetune: Any, name: str) -> Any:
    result = finetune.status.result
    return getattr(result, name) if result is not None else None


def _metric(finetune: Any, name: str) -> Any:
    metrics = finetune.status.metrics
    return getattr(metrics, name) if metrics is not None else None


def describe_dataset(spec: Any) -> str:
    ds = spec.dataset
    if ds.s3 is not None:
        return ds.s3.uri()
    if ds.volume is not None:
        return f"pvc://{ds.volume.claim_name}/{ds.volume.path}"
    if ds.config_map is not None:
        return f"configmap/{ds.config_map.name}:{ds.config_map.key}"
    if ds.hub is not None:
        return f"hf://{ds.hub.id}"
    return str(ds.path)


def compare_frame(finetunes: list[Any]) -> Any:
    """One column per run, one row per setting or result (``COMPARED``)."""
    import pandas as pd

    columns = {f.name: [get(f) for _, get in COMPARED] for f in finetunes}
    return pd.DataFrame(columns, index=[label for label, _ in COMPARED])
