"""The ML sections of a fine-tune: how to shape the data, which method, which hyperparameters.

These types appear in two places: inside ``GemmaFineTune.spec`` (the CRD is generated
from them) and inside the trainer's config file. Defining them once keeps the two from drifting.
Field docstrings become the CRD's descriptions, so ``kubectl explain`` shows them.
"""

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, model_validator

from gft_api.base import ApiModel

# Bounded strings keep CEL rules cheap enough for the API server's cost check.
ShortString = Annotated[str, Field(min_length=1, max_length=253)]
ModuleName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]


class DatasetFormat(StrEnum):
    """How the examples are shaped. ``auto`` looks at the first record's keys."""

    AUTO = "auto"
    CHAT = "chat"
    TEXT = "text"
    ALPACA = "alpaca"
    PROMPT_COMPLETION = "prompt-completion"


class DataShaping(ApiModel):
    """How examples are read, cut and batched; where they come from is said elsewhere."""

    format: DatasetFormat = DatasetFormat.AUTO
    """Record shape: chat (``messages`` list), text (``text``), alpaca (``instruction``,
    optional ``input``, ``output``), prompt-completion (``prompt``, ``completion``), or auto."""

    text_field: Annotated[str, Field(min_length=1, max_length=64)] = "text"
    """For the text format: which field holds the text."""

    eval_fraction: Annotated[float, Field(ge=0.0, le=0.5)] = 0.05
    """Share of the training records held out for evaluation when no eval source is given.
    0 turns evaluation off."""

    max_seq_length: Annotated[int, Field(ge=16, le=131072)] = 1024
    """Longest sequence in tokens; longer examples are truncated."""

    packing: bool = True
    """Pack several short examples into one sequence. Attention never crosses example
    boundaries (position ids restart per example, flash-attention style varlen masking)."""


class LoraParams(ApiModel):
    """Low-rank adapter settings for the ``lora`` and ``qlora`` methods."""

    r: Annotated[int, Field(ge=1, le=1024)] = 16
    """Rank of the adapter matrices."""

    alpha: Annotated[int, Field(ge=1, le=4096)] = 16
    """Scaling numerator: the adapter's output is multiplied by alpha / r."""

    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Dropout on the adapter's input."""

    target_modules: Annotated[list[ModuleName], Field(min_length=1, max_length=64)] = Field(
        default_factory=lambda: ["all-linear"]
    )
    """Module names to adapt; ``all-linear`` means every linear layer of the language model
    (never the vision tower or the output head)."""


class MethodType(StrEnum):
    LORA = "lora"
    QLORA = "qlora"
    FULL = "full"


class Method(ApiModel):
    """Which weights are trained."""

    type: MethodType = MethodType.LORA
    """``lora`` trains an adapter on frozen weights; ``qlora`` the same on 4-bit NF4 weights
    (needs a CUDA GPU); ``full`` trains every weight."""

    lora: LoraParams = Field(default_factory=LoraParams)
    """Adapter settings, used by ``lora`` and ``qlora``."""

    merge_adapter: bool = False
    """After training, also save the base model with the adapter merged in."""


class Precision(StrEnum):
    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class LrScheduler(StrEnum):
    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"


class Optimizer(StrEnum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw_8bit"
    PAGED_ADAMW_8BIT = "paged_adamw_8bit"


class BestMetric(StrEnum):
    EVAL_LOSS = "eval_loss"
    EVAL_TOKEN_ACCURACY = "eval_token_accuracy"
    EVAL_EXACT_MATCH = "eval_exact_match"


class ExportChoice(StrEnum):
    BEST = "best"
    LAST = "last"


class EarlyStopping(ApiModel):
    """Stop when the evaluation has not improved for a while."""

    patience: Annotated[int, Field(ge=1, le=1000)] = 3
    """Evaluations in a row without an improvement of more than ``minDelta`` before the run
    stops (as Succeeded, reason ``EarlyStopped``)."""

    min_delta: Annotated[float, Field(ge=0.0, le=1000.0)] = 0.0
    """The smallest change of ``metricForBest`` that counts as an improvement."""


class Samples(ApiModel):
    """Answers generated greedily at each evaluation, to read how the model is doing."""

    count: Annotated[int, Field(ge=0, le=32)] = 3
    """How many prompts to answer: the first ``prompts``, then the first evaluation records
    (their last model turn or completion is the reference). 0 turns samples off."""

    prompts: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=4096)]], Field(max_length=32)
    ] = Field(default_factory=list)
    """Fixed prompts, asked as a user turn of a chat (chat and alpaca data) or as raw text."""

    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 64
    """Longest answer in tokens."""

    max_seconds: Annotated[float, Field(gt=0.0, le=3600.0)] = 30.0
    """Time budget for all answers of one evaluation; prompts left when it is spent are
    skipped and answers cut short, so evaluation stays cheap."""

    max_share: Annotated[float, Field(gt=0.0, le=1.0)] = 0.05
    """Sample answers never take more than this share of the run's wall time so far: on slow
    hardware they are cut short (or skipped) rather than slow the run down."""

    exact_match_examples: Annotated[int, Field(ge=0, le=10_000)] = 0
    """Also answer this many evaluation records (within the same budget) and report
    ``eval_exact_match``: the share whose answer equals the reference, ignoring surrounding
    whitespace. 0 turns it off."""


class Hyperparameters(ApiModel):
    """The optimisation settings. Give exactly one of ``epochs`` and ``maxSteps``."""

    epochs: Annotated[float, Field(gt=0, le=1000)] | None = None
    """Passes over the training data (fractions allowed)."""

    max_steps: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    """Optimizer steps to run, instead of epochs."""

    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 2e-4
    """Peak learning rate."""

    lr_scheduler: LrScheduler = LrScheduler.LINEAR
    """Shape of the learning-rate curve after warmup."""

    warmup_ratio: Annotated[float, Field(ge=0.0, le=0.5)] = 0.03
    """Share of the steps spent warming the learning rate up from zero."""

    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """AdamW weight decay."""

    batch_size: Annotated[int, Field(ge=1, le=4096)] = 4
    """Sequences per device per micro-batch."""

    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=4096)] = 4
    """Micro-batches per optimizer step."""

    max_grad_norm: Annotated[float, Field(ge=0.0, le=1000.0)] = 1.0
    """Gradient clipping threshold; 0 turns clipping off."""

    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass: less memory, about 30% more compute. Unset:
    on when the weights, optimizer state, activations and logits of a micro-batch would take
    more than 60% of the GPU's memory (full fine-tuning, big models, long rows), off otherwise
    (LoRA on small models) and on CPU."""

    torch_compile: bool = False
    """Compile the model with ``torch.compile`` (inductor) before training: faster steps once
    compiled, for a compile at the start of every attempt (minutes for a large model, and
    again for each new shape until it compiles them as dynamic)."""

    liger_kernels: bool | None = None
    """Liger's Triton kernels for Gemma: fused linear cross-entropy (the vocabulary-wide logits
    are never materialised, token accuracy comes from inside the loss), RMSNorm, GeGLU and RoPE.
    Unset: on when the trainer has a CUDA GPU and Liger supports the model (every generation
    but Gemma 3n), off otherwise. ``true`` where they cannot run is refused before training."""

    optimizer: Optimizer = Optimizer.ADAMW
    """``adamw`` keeps two fp32 moments per trained weight (8 bytes; torch's fused kernel on
    GPUs). ``adamw_8bit`` keeps them in 8 bits (2 bytes, bitsandbytes, CUDA only): full
    fine-tuning then needs 10 bytes a parameter instead of 16, what lets a model fit a GPU it
    would not. ``paged_adamw_8bit`` also lets the state spill to host memory under pressure.
    Not with full fine-tuning over several GPUs, which shards the state already."""

    precision: Precision = Precision.AUTO
    """``auto`` picks bf16 on GPUs that have it, fp32 on CPU. fp16 is refused for Gemma 3
    and newer, whose activations overflow it."""

    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 42
    """Seed for weights init of the adapter, data order and dropout."""

    eval_every_steps: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    """Evaluate every N steps (0: at the end of each epoch and of the run)."""

    logging_every_steps: Annotated[int, Field(ge=1, le=100_000)] = 10
    """Log and export metrics every N steps."""

    eval_on_start: bool = False
    """Also evaluate before the first step, so the run reports where it started from."""

    metric_for_best: BestMetric = BestMetric.EVAL_LOSS
    """Which evaluation metric picks the best checkpoint (lower loss, higher accuracy or exact
    match is better). A checkpoint is saved whenever it improves, rotation never deletes the
    best one, and it is what is exported unless ``output.export`` is ``last``."""

    early_stopping: EarlyStopping | None = None
    """Stop when ``metricForBest`` has stopped improving; off when unset."""

    divergence_factor: Annotated[float, Field(ge=0.0, le=1e6)] = 4.0
    """Stop the run as ``Diverged`` (not retried; the last good checkpoint is kept) when a
    logged training loss passes this many times the run's first logged loss. A NaN or infinite
    loss always stops it. 0 turns the factor check off."""

    samples: Samples = Field(default_factory=Samples)
    """Sample answers at each evaluation (TensorBoard's text tab, the log, the result)."""

    @model_validator(mode="after")
    def _exact_match_for_best(self) -> "Hyperparameters":
        if self.metric_for_best == BestMetric.EVAL_EXACT_MATCH and not (
            self.samples.exact_match_examples
        ):
            raise ValueError("metricForBest eval_exact_match needs samples.exactMatchExamples > 0")
        if self.divergence_factor and self.divergence_factor <= 1.0:
            raise ValueError(
                "divergenceFactor must be above 1 (a loss above its start), or 0 to turn it off"
            )
        return self

    @model_validator(mode="after")
    def _one_length(self) -> "Hyperparameters":
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("give exactly one of epochs and maxSteps")
        return self


Attention = Literal["auto", "eager", "sdpa", "flash_attention_2"]
