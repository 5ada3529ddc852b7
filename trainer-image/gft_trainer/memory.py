"""What a run needs on each GPU, estimated before any weight is loaded; gradient checkpointing
chosen by that need, and a run that cannot fit refused up front, naming what to change.

``shape_of`` reads the model's size from its config (the model is built on the ``meta`` device:
no memory, no weights); ``need`` is a pure function of that shape and the run's settings. The
parts, per GPU:

- weights: a LoRA base in the compute dtype (2 bytes a parameter in bf16), a QLoRA base's linear
  layers in 4 bits (about 0.53 bytes with the quantization constants) and the rest in bf16;
  full fine-tuning keeps fp32 master weights (4 bytes) plus the bf16 copies autocast caches for
  the whole forward pass (2 bytes; checkpointing or not), while the gradients of the earlier
  micro-batches of the step are still held (18 bytes a parameter in all, with AdamW);
- gradients: 4 bytes a trained parameter (fp32);
- optimizer: AdamW's two fp32 moments, 8 bytes a trained parameter (2 in 8 bits);
  full fine-tuning over several GPUs shards weights, gradients and optimizer (FSDP);
- activations kept for the backward: per token and layer, in the compute dtype, the norms'
  inputs and outputs (6 x hidden), q, the attention output and o_proj's input (4 x q width),
  k and v (2 x kv width) and the MLP's gate, up, activation and product (4 x intermediate), plus
  the dropped-out inputs of LoRA's adapters when dropout is on; with checkpointing, each
  layer's input and one layer's worth recomputed;
- attention scores, for eager attention only (SDPA, FlashAttention and FlexAttention never keep
  them): per row, layer and head, length^2 x (scores + fp32 softmax + probabilities, and
  Gemma 2's soft-capping copies); the masks transformers builds (one byte a query-key pair per
  row and mask kind) for every kernel but FlashAttention-2;
- logits: none with Liger's fused loss (it works through the vocabulary chunk by chunk);
  otherwise tokens x vocabulary x (the compute-dtype logits, the loss's fp32 copy, its
  log-softmax and their gradients: 12 bytes + 2 x the dtype);
- overhead: 1 GiB (CUDA context, cuBLAS workspace) and 5% of the rest (allocator fragmentation).

Rows of packed data are ``data.maxSeqLength`` long (packing fills them); unpacked rows are at
most that. A batch is ``training.batchSize`` rows per GPU.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from gft_api.training import Method, MethodType, Optimizer

from gft_trainer.errors import UnsupportedError

GIB = 2**30
CHECKPOINT_ABOVE = 0.6  # gradient checkpointing by need: on above this share of the GPU
FITS_BELOW = 0.95  # refused above this share of the GPU, even with checkpointing


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimate needs, from the model's config."""

    params: int  # every parameter
    trainable: int  # those the method trains (LoRA: the adapters' A and B)
    linear: int  # parameters of linear layers but the output head (what QLoRA stores in 4 bits)
    embedding: int  # the input embedding (tied to the output head in Gemma)
    frozen_towers: int  # vision/audio towers: loaded, never trained
    layers: int
    hidden: int
    intermediate: int
    q_width: int  # heads x head dim
    kv_width: int  # key-value heads x head dim
    heads: int
    vocab: int
    soft_capping: bool  # Gemma 2's attention logit soft-capping (eager keeps more copies)


@dataclass(frozen=True)
class Need:
    """Bytes per GPU, by part."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    attention: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def describe(self) -> str:
        parts = [f"{f.name} {getattr(self, f.name) / GIB:.1f}" for f in fields(self)]
        return f"{self.total / GIB:.1f} GiB ({', '.join(parts)})"


@dataclass(frozen=True)
class RunShape:
    """What decides memory besides the model: the method and the run's settings."""

    method: MethodType
    optimizer: Optimizer
    half: bool  # bf16/fp16 compute; fp32 otherwise
    rows: int  # rows per micro-batch per GPU
    row_tokens: int  # tokens per row
    attention: str
    liger_loss: bool  # Liger's fused linear cross-entropy: no logits
    lora_dropout: bool
    world_size: int = 1


def shape_of(path: Path, method: Method) -> ModelShape:
    """The model's sizes, from its config: the model is built on the ``meta`` device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return shape_of_model(model, method)


def shape_of_model(model: Any, method: Method) -> ModelShape:
    """The sizes of a built model (on any device, ``meta`` included), before the method."""
    from gft_trainer import modeling

    text = model.config.get_text_config()
    params = frozen = linear = 0
    linears: dict[str, torch.nn.Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears[name] = module
    for name, p in model.named_parameters():
        params += p.numel()
        if modeling._excluded(name) and not name.startswith("lm_head"):
            frozen += p.numel()
    for name, m in linears.items():
        if "lm_head" not in name:
            linear += m.weight.numel()
    embedding = model.get_input_embeddings().weight.numel()
    if method.type == MethodType.FULL:
        trainable = params - frozen
    else:
        targets = modeling.lora_target_regex(list(linears), method.lora.target_modules)
        chosen = [m for n, m in linears.items() if re.match(targets, n)]
        trainable = sum(method.lora.r * (m.in_features + m.out_features) for m in chosen)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    intermediate = text.intermediate_size
    if isinstance(intermediate, list | tuple):  # Gemma 3n: one width per layer
        intermediate = max(intermediate)
    return ModelShape(
        params=params,
        trainable=trainable,
        linear=linear,
        embedding=embedding,
        frozen_towers=frozen,
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=intermediate,
        q_width=text.num_attention_heads * head_dim,
        kv_width=text.num_key_value_heads * head_dim,
        heads=text.num_attention_heads,
        vocab=text.vocab_size,
        soft_capping=bool(getattr(text, "attn_logit_softcapping", None)),
    )


def need(m: ModelShape, r: RunShape, checkpointing: bool) -> Need:
    """The estimate, in bytes per GPU (see the module's docstring for each part)."""
    b = 2 if r.half else 4
    full = r.method == MethodType.FULL
    shards = r.world_size if full and r.world_size > 1 else 1
    if full:
        # Under FSDP the bf16 copies are made from each layer's gathered weights as it runs.
        copies = m.trainable * 2 / shards if r.half else 0
        weights = (m.trainable + m.frozen_towers) * 4 / shards + copies
    elif r.method == MethodType.QLORA:
        weights = m.linear * 0.53 + (m.params - m.linear) * 2 + m.trainable * 4
    else:
        weights = m.params * b + m.trainable * 4
    gradients = m.trainable * 4 / shards
    moments = 8 if r.optimizer == Optimizer.ADAMW else 2
    optimizer = m.trainable * moments / shards
    tokens = r.rows * r.row_tokens
    per_layer = b * (6 * m.hidden + 4 * m.q_width + 2 * m.kv_width + 4 * m.intermediate)
    if r.lora_dropout and not full:
        per_layer += b * (5 * m.hidden + m.q_width + m.intermediate)
    if checkpointing:
        activations = tokens * (b * m.hidden * m.layers + per_layer)
    else:
        activations = tokens * per_layer * m.layers
    pairs = r.rows * r.row_tokens**2
    attention = 0.0 if r.attention == "flash_attention_2" else 2.0 * pairs  # the masks
    if r.attention == "eager":
        per_head = 2 * b + 4 + (2 * b if m.soft_capping else 0)
        attention += pairs * m.heads * per_head * (1 if checkpointing else m.layers)
    logits = 0.0 if r.liger_loss else tokens * m.vocab * (12 + 2 * b)
    rest = weights + gradients + optimizer + activations + attention + logits
    return Need(weights, gradients, optimizer, activations, attention, logits, GIB + 0.05 * rest)


def plan(m: ModelShape, r: RunShape, requested: bool | None, gpu_memory: int | None) -> bool:
    """Gradient checkpointing: the user's choice if given; else on when the run without it
    would pass 60% of the GPU. Raises ``UnsupportedError`` when the run cannot fit even so."""
    if gpu_memory is None:
        return bool(requested)  # on CPU memory is the host's, and time is what is short
    checkpointing = requested
    if checkpointing is None:
        checkpointing = need(m, r, False).total > CHECKPOINT_ABOVE * gpu_memory
    got = need(m, r, checkpointing)
    if got.total > FITS_BELOW * gpu_memory:
        raise UnsupportedError(refusal(m, r, checkpointing, got, gpu_memory))
    return checkpointing


def refusal(m: ModelShape, r: RunShape, checkpointing: bool, got: Need, gpu_memory: int) -> str:
    """What does not fit, and what each setting that would help brings the need to."""
    options: list[tuple[str, Need]] = []
    if not checkpointing:
        options.append(("training.gradientCheckpointing: true (or unset)", need(m, r, True)))
    ckpt = True
    if r.method == MethodType.FULL and r.optimizer == Optimizer.ADAMW and r.world_size == 1:
        eight = RunShape(**{**vars(r), "optimizer": Optimizer.ADAMW_8BIT})
        options.append(("training.optimizer: adamw_8bit", need(m, eight, ckpt)))
    if r.method == MethodType.FULL:
        gpus = next(
            (
                n
                for n in range(2 * r.world_size, 17)
                if need(m, RunShape(**{**vars(r), "world_size": n}), ckpt).total
                <= FITS_BELOW * gpu_memory
            ),
            None,
        )
        if gpus is not None:
            sharded = RunShape(**{**vars(r), "world_size": gpus})
            options.append(
                (
                    f"{gpus} GPUs in all (resources.gpus x nodes; FSDP shards full fine-tuning)",
                    need(m, sharded, ckpt),
                )
            )
        lora = RunShape(**{**vars(r), "method": MethodType.LORA})
        adapters = ModelShape(**{**vars(m), "trainable": m.trainable // 100})
        options.append(("method.type: lora", need(adapters, lora, ckpt)))
    if not r.liger_loss and got.logits:
        liger = RunShape(**{**vars(r), "liger_loss": True})
        options.append(
            ("training.ligerKernels (its fused loss makes no logits)", need(m, liger, ckpt))
        )
    if r.rows > 1:
        fewer = RunShape(**{**vars(r), "rows": max(1, r.rows // 2)})
        options.append((f"training.batchSize: {fewer.rows}", need(m, fewer, ckpt)))
    return (
        f"method.type {r.method.value}, training.optimizer {r.optimizer.value}, "
        f"training.batchSize {r.rows} x data.maxSeqLength {r.row_tokens} need about "
        f"{got.describe()} on each GPU, but the GPU has {gpu_memory / GIB:.1f} GiB (at most "
        f"{FITS_BELOW:.0%} of it is planned). About what each change needs: "
        + "; ".join(f"{text}: {n.total / GIB:.1f} GiB" for text, n in options)
    )


def check_optimizer(optimizer: Optimizer, cuda: bool, sharded: bool) -> None:
    """An 8-bit optimizer needs bitsandbytes and a CUDA GPU, and cannot run on FSDP's shards."""
    if optimizer == Optimizer.ADAMW:
        return
    if not cuda:
        raise UnsupportedError(
            f"training.optimizer: {optimizer.value} runs on CUDA GPUs only; use adamw here"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UnsupportedError(
            f"training.optimizer: {optimizer.value} needs the bitsandbytes package, which this "
            "image lacks; use the trainer image, or adamw"
        )
    if sharded:
        raise UnsupportedError(
            f"training.optimizer: {optimizer.value} cannot run on FSDP's sharded weights (full "
            "fine-tuning over several GPUs, whose optimizer state is sharded already); use adamw"
        )


TRANSFORMERS_OPTIMIZER = {
    Optimizer.ADAMW: "adamw_torch",
    Optimizer.ADAMW_8BIT: "adamw_bnb_8bit",
    Optimizer.PAGED_ADAMW_8BIT: "paged_adamw_8bit",
}


def transformers_optimizer(optimizer: Optimizer, cuda: bool) -> str:
    """The name transformers' ``TrainingArguments.optim`` gives it (AdamW: torch's fused kernel
    on GPUs)."""
    if optimizer == Optimizer.ADAMW and cuda:
        return "adamw_torch_fused"
    return TRANSFORMERS_OPTIMIZER[optimizer]
