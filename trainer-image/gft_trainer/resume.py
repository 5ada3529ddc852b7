"""Where a run starts, and whether it has anything left to do.

A run owns its output folder. It resumes from its own newest complete checkpoint; only while it
has none does it start from what ``output.resumeFrom`` names on purpose (another run's
checkpoint, or its adapter). A run whose ``summary.json`` says it succeeded, with every
artifact in place and the same config (kept beside it as ``config.yaml``), is done: started
again, it reports the same outcome and trains nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gft_api.contract import (
    SUMMARY_FILE_NAME,
    ConfigError,
    ExitCode,
    Outcome,
    TrainerSummary,
)
from gft_api.training import MethodType

from gft_trainer import checkpoints

log = logging.getLogger("gft")

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "config.yaml"


@dataclass(frozen=True)
class Start:
    checkpoint: Path | None = None
    """A complete checkpoint to resume from (step count, optimizer, scheduler, RNG)."""
    adapter: Path | None = None
    """Adapter weights to start from (training itself starts at step 0)."""
    own: bool = False
    """The checkpoint is this run's own (a retry or a resume after a stop)."""


def earlier(out: Path, config_text: str) -> TrainerSummary | None:
    """The summary an earlier attempt left in this folder, if it ran with this config."""
    try:
        summary = TrainerSummary.model_validate(json.loads((out / SUMMARY_FILE_NAME).read_text()))
        same = (out / RUN_CONFIG).read_text() == config_text
    except (OSError, ValueError):
        return None
    return summary if same else None


def finished(summary: TrainerSummary | None) -> bool:
    """The earlier attempt succeeded and its artifacts on the volume are all there."""
    if summary is None or summary.outcome != Outcome.SUCCEEDED:
        return False
    local = [p for p in summary.artifacts.values() if "://" not in p]  # not the bucket's copies
    return all(Path(p).exists() for p in local)


def diverged(summary: TrainerSummary | None) -> bool:
    return summary is not None and summary.exit_code == ExitCode.DIVERGED


def keep_config(out: Path, config_text: str) -> None:
    """The config this folder's results come from, beside them."""
    tmp = out / f".{RUN_CONFIG}.tmp"
    tmp.write_text(config_text)
    tmp.replace(out / RUN_CONFIG)


def choose(checkpoint_dir: Path, resume_from: str | None, method: MethodType) -> Start:
    """This run's newest complete checkpoint, else what ``resumeFrom`` names, else nothing."""
    own = checkpoints.newest_valid(checkpoint_dir)
    if own is not None:
        return Start(checkpoint=own, own=True)
    if not resume_from:
        return Start()
    path = Path(resume_from)
    where = f"output.resumeFrom: {path}"
    if not path.is_dir():
        raise ConfigError(f"{where}: no such folder on the output volume")
    if checkpoints.is_valid(path):
        return Start(checkpoint=path)
    if (path / checkpoints.TRAINER_STATE).exists():
        raise ConfigError(
            f"{where}: this checkpoint is incomplete (cut short while it was being saved); "
            "name an earlier one"
        )
    if (path / ADAPTER_CONFIG).exists():
        if method == MethodType.FULL:
            raise ConfigError(
                f"{where} is an adapter, but method.type is full: start from an adapter with "
                "lora or qlora, or name a checkpoint of a full fine-tune"
            )
        return Start(adapter=path)
    raise ConfigError(
        f"{where}: neither a checkpoint (checkpoint-<step> with trainer_state.json) nor an "
        f"adapter ({ADAPTER_CONFIG})"
    )


def load_adapter(model: Any, path: Path) -> None:
    """Put the weights of a saved LoRA adapter into the model's (freshly made) adapter."""
    from peft import load_peft_weights, set_peft_model_state_dict

    where = f"output.resumeFrom: {path}"
    weights = load_peft_weights(str(path), device="cpu")
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as e:  # shapes differ: another rank or other target modules
        raise ConfigError(
            f"{where}: the adapter does not fit this fine-tune's method.lora settings "
            f"({str(e).splitlines()[0][:300]}); use the same r and targetModules"
        ) from None
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise ConfigError(
            f"{where}: the adapter has weights this model has no place for ({unexpected[0]}, "
            f"{len(unexpected)} in all): it was trained on another model or other modules"
        )
    log.info("starting from the adapter at %s (%d tensors)", path, len(weights))
