"""The host never waits for the GPU on the trainer's account between logs: no ``int()``,
``.item()`` or ``bool()`` of a device tensor per micro-batch (each one stops the CPU from queueing
the next kernels until the GPU has caught up), and batches are made by DataLoader workers into
pinned memory on GPUs.

A wait for the device is the ``aten._local_scalar_dense`` operator (what ``item``, ``int`` and
``bool`` of a tensor call), so a dispatch mode sees every one, on CPU as on CUDA, with the Python
frame that asked for it."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from gft_api.contract import ModelSource, TrainerConfig
from gft_api.training import Method, MethodType, Precision
from gft_trainer import data, modeling
from gft_trainer.train import GemmaTrainer, Plan, training_arguments
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.conftest import write_config

CPU = modeling.Hardware(cuda=False, bf16=False, flash_attn_version=None)


class HostWaits(TorchDispatchMode):
    """Records, for every read of a tensor's value by the host, the innermost frame of the code
    that asked for it (outside torch itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.callers: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename]
            self.callers.append(f"{frames[-2].filename}:{frames[-2].lineno}" if frames else "?")
        return func(*args, **(kwargs or {}))


def ours(callers: list[str]) -> list[str]:
    return [c for c in callers if "gft_trainer" in c]


@pytest.fixture(scope="module")
def trainer(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> GemmaTrainer:
    from trainer.tiny import make_model_dir

    path = make_model_dir(tiny_models, "gemma3_text")
    loaded = modeling.load(
        ModelSource(name_or_path=str(path)), Method(type=MethodType.LORA), Precision.AUTO, None, CPU
    )
    loaded.model.config.use_cache = False
    work = tmp_path_factory.mktemp("stalls")
    config = TrainerConfig.load(write_config(work / "c.yaml", path, work / "out"))
    args = training_arguments(config, Plan(1, 4, 8, 0), Precision.FP32, False, False)
    return GemmaTrainer(model=loaded.model, args=args, processing_class=loaded.tokenizer)


def batch() -> dict[str, torch.Tensor]:
    examples = [data.Example([2, *range(10, 10 + n)], [2, *range(10, 10 + n)]) for n in (9, 5, 7)]
    return data.Collator(0)(data.pack(examples, 12))


def test_the_loss_and_its_bookkeeping_never_wait_for_the_device(trainer: GemmaTrainer) -> None:
    trainer.model.train()
    inputs = batch()
    with HostWaits() as waits:
        for _ in range(3):  # three micro-batches
            loss = trainer.compute_loss(trainer.model, inputs)
            loss.backward()
    assert ours(waits.callers) == [], waits.callers


def test_the_numbers_are_read_once_per_log(trainer: GemmaTrainer) -> None:
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch())
    logs: dict[str, float] = {"loss": 1.0}
    with HostWaits() as waits:
        trainer._add_train_stats(logs)
    assert logs["samples_per_second"] > 0 and logs["tokens_per_second"] > 0
    assert len(ours(waits.callers)) <= 1, waits.callers


def test_batches_are_made_by_workers_into_pinned_memory_on_gpus(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(data, "cpu_count", lambda: 16)
    config = TrainerConfig.load(write_config(tmp_path / "c.yaml", "m", tmp_path / "out"))
    gpu = training_arguments(config, Plan(1, 4, 8, 0), Precision.FP32, True, False)
    assert gpu.dataloader_num_workers >= 1
    assert gpu.dataloader_pin_memory and gpu.dataloader_persistent_workers
    cpu = training_arguments(config, Plan(1, 4, 8, 0), Precision.FP32, False, False)
    assert cpu.dataloader_num_workers == 0  # on CPU the cores are the training's


@pytest.mark.parametrize(
    ("cpus", "ranks", "expected"), [(16, 1, 4), (16, 8, 1), (8, 8, 0), (1, 1, 0), (6, 2, 2)]
)
def test_loader_workers_share_the_cpus_with_the_ranks(cpus: int, ranks: int, expected: int):
    assert data.loader_workers(cpus, ranks) == expected


@pytest.mark.gpu
def test_on_a_gpu_the_loss_and_its_bookkeeping_never_wait(
    tiny_models: Path, tmp_path: Path
) -> None:
    from trainer.tiny import make_model_dir

    path = make_model_dir(tiny_models, "gemma3_text")
    hw = modeling.Hardware.detect()
    loaded = modeling.load(
        ModelSource(name_or_path=str(path)), Method(type=MethodType.LORA), Precision.FP32, None, hw
    )
    loaded.model.config.use_cache = False
    config = TrainerConfig.load(write_config(tmp_path / "c.yaml", path, tmp_path / "out"))
    args = training_arguments(config, Plan(1, 4, 8, 0), Precision.FP32, True, False)
    trainer = GemmaTrainer(model=loaded.model, args=args, processing_class=loaded.tokenizer)
    model = trainer.model.to("cuda").train()
    inputs = {k: v.cuda() for k, v in batch().items()}
    with HostWaits() as waits:
        for _ in range(3):
            trainer.compute_loss(model, inputs).backward()
    assert ours(waits.callers) == [], waits.callers
