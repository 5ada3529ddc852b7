"""How the trainer asks transformers to spread a run over ranks: FSDP2 for full fine-tuning on
several GPUs (sharded, rank 0 alone reading the weights, checkpoints of the full state), DDP
otherwise. FSDP itself needs GPUs (accelerate applies it to GPU ranks only), so these check
the arguments handed over, not a sharded run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from gft_api.contract import TrainerConfig
from gft_trainer.modeling import Precision
from gft_trainer.train import Plan, training_arguments

from trainer.conftest import write_config


def arguments(tmp_path: Path, method: str, world_size: int, cuda: bool):
    config = TrainerConfig.load(
        write_config(tmp_path / "c.yaml", "m", tmp_path / "out", method={"type": method})
    )
    # FP32: transformers refuses bf16 on a machine without a GPU, even for arguments alone.
    return training_arguments(config, Plan(world_size, 4, 8, 0), Precision.FP32, cuda, False)


def test_full_fine_tuning_on_several_gpus_is_sharded_with_fsdp2(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        args = arguments(tmp_path, "full", 2, cuda=True)
    plugin = args.fsdp_plugin_args
    assert args.fsdp and plugin["fsdp_version"] == 2
    assert plugin["reshard_after_forward"] is True  # full shard, not shard_grad_op
    assert plugin["cpu_ram_efficient_loading"] is True
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()], caplog.text


@pytest.mark.parametrize(
    ("method", "world_size", "cuda"),
    [("lora", 2, True), ("full", 1, True)],
    ids=["lora-is-ddp", "one-gpu"],
)
def test_otherwise_no_fsdp(tmp_path, method, world_size, cuda):
    args = arguments(tmp_path, method, world_size, cuda)
    assert not args.fsdp and not args.fsdp_plugin_args


def test_liger_is_never_handed_to_transformers(tmp_path):
    # transformers' Trainer would patch Liger into the model's classes, for every later model
    # of the process; modeling.load applies it to the instance instead.
    config = TrainerConfig.load(write_config(tmp_path / "c.yaml", "m", tmp_path / "out"))
    args = training_arguments(config, Plan(1, 4, 8, 0), Precision.FP32, True, False)
    assert args.use_liger_kernel is False
