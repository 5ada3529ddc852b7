"""What a run needs on each GPU: the estimate by part, gradient checkpointing chosen by it, and a
run that cannot fit refused before its weights load, with the settings that would make it fit.

The shapes are the published configs of real Gemmas, built on the ``meta`` device (no memory,
no weights); the GPUs are their memory sizes."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from benchmarks.trainer_gpu import SHAPES
from gft_api.contract import ExitCode, TrainerConfig
from gft_api.training import Method, MethodType, Optimizer, Precision
from gft_trainer import memory
from gft_trainer.errors import UnsupportedError, exit_code_for
from gft_trainer.train import Plan, training_arguments
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

from trainer.conftest import write_config
from trainer.tiny import MODEL_TYPES, make_model_dir

GIB = 2**30
H100 = int(79.19 * GIB)  # what torch reports for an 80 GB H100
A100_40GB = int(39.39 * GIB)
T4 = int(14.6 * GIB)
MORE = {
    "gemma-2-9b": (
        Gemma2Config,
        dict(
            vocab_size=256000,
            hidden_size=3584,
            intermediate_size=14336,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            attn_logit_softcapping=50.0,
        ),
    ),
    "gemma-3-12b": (
        Gemma3TextConfig,
        dict(
            vocab_size=262208,
            hidden_size=3840,
            intermediate_size=15360,
            num_hidden_layers=48,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
        ),
    ),
}


@functools.cache
def shape(name: str, method: str = "lora") -> memory.ModelShape:
    cls, kwargs = MORE[name] if name in MORE else SHAPES[name][:2]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cls(**kwargs))
    return memory.shape_of_model(model, Method.model_validate({"type": method}))


def run(method: str = "lora", **settings) -> memory.RunShape:
    base = dict(
        method=MethodType(method),
        optimizer=Optimizer.ADAMW,
        half=True,
        rows=4,
        row_tokens=2048,
        attention="sdpa",
        liger_loss=True,
        lora_dropout=method != "full",
    )
    return memory.RunShape(**{**base, **settings})


def test_the_shape_is_read_from_the_config_without_weights() -> None:
    m = shape("gemma-2-2b")
    assert 2.5e9 < m.params < 2.7e9 and m.embedding == 256000 * 2304
    assert m.layers == 26 and m.heads == 8 and m.q_width == 2048 and m.soft_capping
    assert 1e7 < m.trainable < 3e7  # LoRA r=16 on all linear layers: 21M
    assert shape("gemma-2-2b", "full").trainable == m.params


def test_eager_attention_keeps_its_scores_and_they_are_counted() -> None:
    # Gemma 2 runs eager attention (soft-capping) where flash-attn is missing: per row, layer
    # and head a 2048 x 2048 score matrix in several copies. At 4 x 2048 that alone passes an
    # H100, so the plan checkpoints; SDPA keeps only the masks.
    m = shape("gemma-2-2b")
    eager = memory.need(m, run(attention="eager"), checkpointing=False)
    sdpa = memory.need(m, run(attention="sdpa"), checkpointing=False)
    assert eager.attention > 35 * GIB and sdpa.attention < 0.1 * GIB
    assert memory.plan(m, run(attention="eager"), None, H100) is True
    with_checkpoints = memory.need(m, run(attention="eager"), checkpointing=True)
    assert with_checkpoints.attention < 2 * GIB  # one layer's scores at a time


def test_liger_makes_no_logits_and_the_plain_loss_does() -> None:
    m = shape("gemma-3-1b")
    assert memory.need(m, run(liger_loss=True), False).logits == 0
    plain = memory.need(m, run(liger_loss=False), False).logits
    assert plain == 4 * 2048 * 262144 * 16  # bf16 logits, fp32 copy, log-softmax, gradients
    # Small LoRA: without the logits it fits easily, so no checkpointing; with them it would.
    assert memory.plan(m, run(liger_loss=True), None, H100) is False
    assert memory.plan(m, run(liger_loss=False), None, H100) is True


def test_full_finetuning_counts_master_weights_copies_gradients_and_adam() -> None:
    m = shape("gemma-3-4b", "full")
    need = memory.need(m, run("full", rows=1), checkpointing=True)
    assert need.weights == m.trainable * (4 + 2)  # fp32 master weights, autocast's bf16 copies
    assert need.gradients == m.trainable * 4 and need.optimizer == m.trainable * 8
    eight = memory.need(m, run("full", rows=1, optimizer=Optimizer.ADAMW_8BIT), True)
    assert eight.optimizer == m.trainable * 2
    sharded = memory.need(m, run("full", rows=1, world_size=4), True)
    assert sharded.gradients == m.trainable  # FSDP: a quarter on each of 4 GPUs


def test_full_finetuning_that_cannot_fit_is_refused_naming_what_would_fit() -> None:
    m = shape("gemma-2-9b", "full")
    with pytest.raises(UnsupportedError) as refused:
        memory.plan(m, run("full", rows=1, attention="eager"), None, H100)
    message = str(refused.value)
    assert exit_code_for(refused.value) == ExitCode.UNSUPPORTED
    assert "method.type full, training.optimizer adamw" in message
    assert "the GPU has 79.2 GiB" in message
    assert "training.optimizer: adamw_8bit" in message
    assert "GPUs in all (resources.gpus" in message and "method.type: lora" in message


def test_an_8bit_optimizer_makes_full_finetuning_fit_a_smaller_gpu() -> None:
    m = shape("gemma-2-2b", "full")
    eager = run("full", rows=1, attention="eager")
    with pytest.raises(UnsupportedError, match=r"training\.optimizer: adamw_8bit: 3\d\.\d GiB"):
        memory.plan(m, eager, None, A100_40GB)
    eight = run("full", rows=1, attention="eager", optimizer=Optimizer.ADAMW_8BIT)
    memory.plan(m, eight, None, A100_40GB)  # fits: no refusal


@pytest.mark.parametrize(
    ("name", "method", "requested", "gpu", "expected"),
    [
        ("gemma-3-1b", "lora", None, H100, False),  # small LoRA: memory allows
        ("gemma-3-4b", "lora", None, H100, True),  # 4 x 2048 of a 4B's activations do not
        ("gemma-3-1b", "lora", None, T4, True),  # a small GPU
        ("gemma-3-1b", "full", None, None, False),  # CPU: memory is the host's
        ("gemma-3-1b", "lora", True, H100, True),  # the user's choice wins
        ("gemma-3-4b", "lora", False, H100, False),
    ],
)
def test_gradient_checkpointing_is_chosen_by_need(name, method, requested, gpu, expected) -> None:
    assert memory.plan(shape(name, method), run(method), requested, gpu) is expected


def test_an_8bit_optimizer_needs_a_gpu_and_unsharded_weights() -> None:
    with pytest.raises(UnsupportedError, match=r"training\.optimizer: adamw_8bit runs on CUDA"):
        memory.check_optimizer(Optimizer.ADAMW_8BIT, cuda=False, sharded=False)
    if memory.importlib.util.find_spec("bitsandbytes") is not None:
        with pytest.raises(UnsupportedError, match="cannot run on FSDP"):
            memory.check_optimizer(Optimizer.PAGED_ADAMW_8BIT, cuda=True, sharded=True)
        memory.check_optimizer(Optimizer.ADAMW_8BIT, cuda=True, sharded=False)
    memory.check_optimizer(Optimizer.ADAMW, cuda=False, sharded=True)


@pytest.mark.parametrize(
    ("optimizer", "cuda", "expected"),
    [
        ("adamw", True, "adamw_torch_fused"),
        ("adamw", False, "adamw_torch"),
        ("adamw_8bit", True, "adamw_bnb_8bit"),
        ("paged_adamw_8bit", True, "paged_adamw_8bit"),
    ],
)
def test_the_optimizer_is_handed_to_transformers(tmp_path: Path, optimizer, cuda, expected):
    config = TrainerConfig.load(
        write_config(tmp_path / "c.yaml", "m", tmp_path / "out", training={"optimizer": optimizer})
    )
    args = training_arguments(config, Plan(1, 4, 8, 0), Precision.FP32, cuda, False)
    assert args.optim == expected


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_shape_of_a_model_folder_counts_what_loading_it_gives(
    tiny_models: Path, model_type: str, method: str
) -> None:
    from gft_trainer import modeling

    path = make_model_dir(tiny_models, model_type)
    m = memory.shape_of(path, Method.model_validate({"type": method}))
    model = AutoModelForCausalLM.from_pretrained(path)
    trained = modeling.apply_method(model, Method.model_validate({"type": method}))
    trainable, total = modeling.count_parameters(trained)
    assert m.trainable == trainable
    assert m.params == (total if method == "full" else total - trainable)
