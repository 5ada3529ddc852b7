"""Fixtures for the trainer tests: tiny models, configs, and a way to run ``gft-train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from trainer.tiny import DATA, make_model_dir

REPO = Path(__file__).resolve().parents[2]
CHAT = DATA / "chat_small.jsonl"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run it on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_gemma3(tiny_models: Path) -> Path:
    return make_model_dir(tiny_models, "gemma3_text")


def write_config(path: Path, model: Path | str, out: Path, **overrides: Any) -> Path:
    """A small config; ``overrides`` are merged per section (camelCase keys)."""
    cfg: dict[str, Any] = {
        "runName": "test/run",
        "model": {"nameOrPath": str(model)},
        "dataset": {"trainFiles": [str(CHAT)]},
        "data": {"maxSeqLength": 128, "evalFraction": 0.2, "packing": True},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "training": {
            "maxSteps": 6,
            "batchSize": 2,
            "gradientAccumulationSteps": 1,
            "learningRate": 1e-3,
            "loggingEverySteps": 2,
            "gradientCheckpointing": False,
        },
        "output": {"dir": str(out), "checkpointEverySteps": 3, "keepCheckpoints": 2},
        "observability": {
            "metricsPort": 0,
            "terminationMessagePath": str(out.parent / f"{out.name}.termination-log"),
        },
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = values
    path.write_text(yaml.safe_dump(cfg))
    return path


def gft_train_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gft_trainer.cli", "--config", str(config), *extra]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


def run_gft_train(
    config: Path, *extra: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        gft_train_cmd(config, *extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(**(env or {})),
        cwd=REPO,
    )


def log_history(out: Path, step: int) -> list[dict[str, Any]]:
    """The trainer's log history as saved in the checkpoint at ``step``."""
    state = json.loads(
        (out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text()
    )
    return state["log_history"]


def series(history: list[dict[str, Any]], key: str) -> dict[int, float]:
    """One logged value (``loss``, ``eval_loss``, ...) by step."""
    return {e["step"]: e[key] for e in history if key in e}
