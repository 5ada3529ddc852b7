"""The model: which Gemma family, which precision and attention, load it, wrap it for the method.

The decisions (``family_of``, ``choose_precision``, ``choose_attention``, ``lora_target_regex``)
are pure functions so that each rule is tested on its own, without a model or a GPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gft_api.contract import ConfigError, ModelSource
from gft_api.training import Method, MethodType, Precision

from gft_trainer.errors import ModelNotFoundError, NotPermittedError, UnsupportedError

# model_type -> generation. Multimodal wrappers train only their language model.
FAMILIES = {
    "gemma": 1,
    "gemma2": 2,
    "gemma3_text": 3,
    "gemma3": 3,
    "gemma3n_text": 3,
    "gemma3n": 3,
    "gemma4_text": 4,
    "gemma4": 4,
}
# Parameter-name parts that belong to towers we never train or adapt.
FROZEN_PARTS = (
    "vision_tower",
    "audio_tower",
    "multi_modal_projector",
    "embed_vision",
    "embed_audio",
)
NEVER_ADAPTED = ("lm_head",)
# Families FlashAttention-2 cannot run correctly, and why.
NO_FLASH_ATTENTION = {
    "gemma3": "it drops Gemma 3's bidirectional mask over image tokens",
    "gemma4": "Gemma 4's global layers have head_dim 512, beyond FlashAttention-2's 256",
    "gemma4_text": "Gemma 4's global layers have head_dim 512, beyond FlashAttention-2's 256",
}
LOCAL_PREFIXES = ("/", "./", "../", "~")
# Families Liger (0.8) has kernels for: all but Gemma 3n.
LIGER_FAMILIES = ("gemma", "gemma2", "gemma3_text", "gemma3", "gemma4_text", "gemma4")
# Liger's kernel switches (transformers' ``liger_kernel_config`` keys), as a human names them.
LIGER_KERNELS = {
    "fused_linear_cross_entropy": "fused linear cross-entropy",
    "rms_norm": "RMSNorm",
    "geglu": "GeGLU",
    "rope": "RoPE",
}


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    bf16: bool
    flash_attn_version: tuple[int, ...] | None
    liger: bool = False  # the liger-kernel package is installed
    # TRITON_INTERPRET=1: Triton kernels run on the CPU through Triton's interpreter (slowly;
    # for tests of the Liger path on machines without a GPU).
    triton_interpreter: bool = False

    @classmethod
    def detect(cls) -> Hardware:
        cuda = torch.cuda.is_available()
        return cls(
            cuda=cuda,
            bf16=cuda and torch.cuda.is_bf16_supported(),
            flash_attn_version=_flash_attn_version(),
            liger=importlib.util.find_spec("liger_kernel") is not None,
            triton_interpreter=os.environ.get("TRITON_INTERPRET") == "1",
        )


# The oldest Linux driver each CUDA major version runs on (NVIDIA's minor-version compatibility
# table: any 13.x build runs on 580.65.06 and newer, and so on).
DRIVER_FOR_CUDA = {13: "580.65.06", 12: "525.60.13", 11: "450.80.02"}
PROC_DRIVER_VERSION = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class Driver:
    """The NVIDIA driver the container sees, and the CUDA the installed torch was built for."""

    version: str | None  # "535.104.05"; None when no driver is visible
    torch_cuda: str | None  # "13.2"; None for a CPU build of torch

    @classmethod
    def detect(cls) -> Driver:
        from gft_trainer import gpu

        version = None
        nv = gpu._nvml()
        if nv is not None:
            try:
                raw = nv.nvmlSystemGetDriverVersion()
                version = raw.decode() if isinstance(raw, bytes) else str(raw)
            except Exception:  # NVML present but failing: read the kernel module's file
                version = None
        return cls(version or driver_from_proc(PROC_DRIVER_VERSION), torch.version.cuda)


def driver_from_proc(path: Path) -> str | None:
    """The driver version the NVIDIA kernel module reports, or None without one."""
    try:
        match = re.search(r"Kernel Module\s+(\d+(?:\.\d+)+)", path.read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def needed_driver(torch_cuda: str | None) -> str | None:
    if not torch_cuda:
        return None
    return DRIVER_FOR_CUDA.get(int(torch_cuda.split(".")[0]))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def check_gpus(asked: int, cuda: bool, driver: Driver) -> None:
    """A pod given GPUs trains on them or stops: with ``resources.gpus`` above 0 and no usable
    CUDA, training on the CPU would run for days where hours were planned, and look healthy."""
    if asked <= 0 or cuda:
        return
    needed = needed_driver(driver.torch_cuda)
    if driver.torch_cuda is None:
        why = (
            f"this trainer's torch is a CPU build ({torch.__version__}); use the trainer image, "
            "whose torch is a CUDA build"
        )
    elif driver.version is None:
        why = (
            "no NVIDIA driver is visible in the container; check that the node has the NVIDIA "
            "driver, its container toolkit and device plugin, and that the pod got its GPUs"
        )
    elif needed and _version(driver.version) < _version(needed):
        why = (
            f"the node's NVIDIA driver is {driver.version} and this trainer's torch (CUDA "
            f"{driver.torch_cuda}) needs {needed} or newer; run on nodes with a newer driver "
            "(resources.nodeSelector), or use a trainer image built for an older CUDA "
            "(README: the trainer image)"
        )
    else:
        why = (
            f"the driver {driver.version} is new enough for CUDA {driver.torch_cuda}, yet torch "
            "finds no GPU; check the pod's GPU request and NVIDIA_VISIBLE_DEVICES"
        )
    plural = "GPU" if asked == 1 else "GPUs"
    raise UnsupportedError(
        f"resources.gpus: {asked} {plural} asked for, but CUDA is not usable: {why}. "
        "Not training on the CPU instead"
    )


def _flash_attn_version() -> tuple[int, ...] | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        return tuple(int(p) for p in importlib.metadata.version("flash_attn").split(".")[:2])
    except (ValueError, importlib.metadata.PackageNotFoundError):
        return None


def family_of(model_type: str) -> int:
    """Gemma generation (1-4) of a config's ``model_type``; anything else is a config error."""
    if model_type not in FAMILIES:
        raise ConfigError(
            f"model.nameOrPath: model_type `{model_type}` is not a Gemma causal LM; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def choose_precision(requested: Precision, generation: int, hw: Hardware) -> Precision:
    """bf16 where the GPU has it, fp32 on CPU; fp16 refused for Gemma 3 and newer."""
    if requested == Precision.FP16:
        if generation >= 3:
            raise ConfigError(
                "training.precision: fp16 overflows Gemma 3 and newer activations; "
                "use bf16 (or auto)"
            )
        if not hw.cuda:
            raise UnsupportedError("training.precision: fp16 needs a CUDA GPU; use auto or fp32")
    if requested == Precision.BF16 and hw.cuda and not hw.bf16:
        raise UnsupportedError("training.precision: this GPU has no bf16; use auto")
    if requested != Precision.AUTO:
        return requested
    return Precision.BF16 if hw.bf16 else Precision.FP32


def choose_attention(requested: str, model_type: str, hw: Hardware) -> str:
    """Gemma 2's logit soft-capping needs eager attention or FlashAttention >= 2.6, never SDPA."""
    fa_ok = hw.cuda and hw.flash_attn_version is not None
    gemma2 = model_type == "gemma2"
    if requested == "flash_attention_2":
        if model_type in NO_FLASH_ATTENTION:
            raise UnsupportedError(
                f"model.attnImplementation: flash_attention_2 cannot run {model_type}: "
                f"{NO_FLASH_ATTENTION[model_type]}; use auto (sdpa)"
            )
        if not fa_ok:
            raise UnsupportedError(
                "model.attnImplementation: flash_attention_2 needs CUDA and the flash-attn "
                "package; use auto"
            )
        if gemma2 and hw.flash_attn_version < (2, 6):
            raise UnsupportedError(
                "model.attnImplementation: Gemma 2 soft-capping needs flash-attn >= 2.6; use eager"
            )
        return requested
    if gemma2:
        if requested == "sdpa":
            raise ConfigError(
                "model.attnImplementation: SDPA cannot do Gemma 2's logit soft-capping; "
                "use eager, flash_attention_2 (>= 2.6) or auto"
            )
        if requested == "auto":
            return "flash_attention_2" if fa_ok and hw.flash_attn_version >= (2, 6) else "eager"
    return "sdpa" if requested == "auto" else requested


def choose_liger(requested: bool | None, model_type: str, hw: Hardware) -> dict[str, bool] | None:
    """Liger's kernels (fused linear cross-entropy: the vocabulary-wide logits are never
    materialised; RMSNorm, GeGLU): their switches for ``liger.apply``, or None for off. Unset
    means on wherever they can run: a CUDA GPU, the package, a family Liger patches. Liger's RoPE
    stays off: it can only replace the function in transformers' modeling module, for every
    model of the process (``gft_trainer/liger.py``)."""
    if requested is False:
        return None
    runnable = hw.cuda or hw.triton_interpreter
    kernels = {"rope": False}
    if requested is None:
        return kernels if hw.cuda and hw.liger and model_type in LIGER_FAMILIES else None
    if model_type not in LIGER_FAMILIES:
        raise UnsupportedError(
            f"training.ligerKernels: Liger has no kernels for {model_type}; leave it unset"
        )
    if not hw.liger:
        raise UnsupportedError(
            "training.ligerKernels: this image lacks the liger-kernel package; use the trainer "
            "image or leave it unset"
        )
    if not runnable:
        raise UnsupportedError(
            "training.ligerKernels: Liger's kernels are Triton GPU kernels and need a CUDA GPU; "
            "leave it unset (on wherever there is one) or set it to false"
        )
    if not hw.cuda:
        # Triton's interpreter cannot run Liger's RMSNorm and GeGLU kernels (they cast Python
        # float arguments as if they were Triton scalars); the loss kernel runs.
        return {**kernels, "rms_norm": False, "geglu": False}
    return kernels


def torch_dtype(precision: Precision) -> torch.dtype:
    return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(
        precision, torch.float32
    )


def load_dtype(method: MethodType, precision: Precision) -> torch.dtype:
    """The dtype weights are loaded in. Full fine-tuning keeps fp32 master weights and runs
    bf16/fp16 under autocast: an update smaller than a bf16 weight's spacing (lr 1e-5 on a
    weight near 1 is 256 times smaller) would otherwise round away, and fp16 gradients could not
    be unscaled. Adapters train in fp32 on a frozen base of the compute dtype."""
    return torch.float32 if method == MethodType.FULL else torch_dtype(precision)


def device_map(method: MethodType, hw: Hardware, local_rank: int) -> dict[str, int] | None:
    """Quantized weights are placed at load time, so each rank loads onto its own GPU (without
    this every rank of a multi-GPU QLoRA run would fill cuda:0)."""
    return {"": local_rank} if method == MethodType.QLORA and hw.cuda else None


def lora_target_regex(module_names: list[str], targets: list[str]) -> str:
    """A peft ``target_modules`` regex naming exactly the linear layers to adapt: those of the
    language model whose last name part is requested; ``all-linear`` means all of them. Never
    the output head or a vision/audio tower. Full names, so that a ``ModuleList`` index of a
    linear (``...projections.0``) can never also match a decoder layer (``layers.0``)."""
    candidates = [n for n in module_names if not _excluded(n)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
    wanted = set(leaves) if "all-linear" in targets else set(targets)
    missing = sorted(wanted - set(leaves))
    if missing or not wanted:
        raise ConfigError(
            f"method.lora.targetModules: {missing or sorted(wanted)} not among the model's "
            f"linear layers {leaves}"
        )
    chosen = [n for n in candidates if n.rsplit(".", 1)[-1] in wanted]
    return "^(?:" + "|".join(map(re.escape, chosen)) + ")$"


def _excluded(name: str) -> bool:
    return any(p in name for p in FROZEN_PARTS + NEVER_ADAPTED)


# ---------------------------------------------------------------- loading


def is_local(name_or_path: str) -> bool:
    return name_or_path.startswith(LOCAL_PREFIXES) or Path(name_or_path).exists()


def resolve(source: ModelSource, cache_dir: str | None) -> Path:
    """A local folder holding the model: the given one, or the hub snapshot (cached)."""
    if is_local(source.name_or_path):
        path = Path(source.name_or_path).expanduser()
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"model.nameOrPath: {path} is not a model folder (no config.json); "
                "check the path and the volume mount"
            )
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            snapshot_download(
                source.name_or_path,
                revision=source.revision,
                cache_dir=cache_dir,
                token=os.environ.get("HF_TOKEN") or None,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"],
            )
        )
    except GatedRepoError as e:
        raise NotPermittedError(
            f"model.nameOrPath: {source.name_or_path} is gated: accept its licence on the hub "
            "with the account whose token is in HF_TOKEN (spec.model.hfTokenSecretRef)"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"model.nameOrPath: no model {source.name_or_path} on the hub, or it is private "
            "and HF_TOKEN cannot read it; check the id and the token"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"model.revision: {source.revision} not found") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise NotPermittedError(
                f"model.nameOrPath: the hub refused {source.name_or_path} ({status}): accept "
                "the licence or fix the token in HF_TOKEN"
            ) from e
        raise


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    model_type: str
    generation: int
    precision: Precision
    attention: str
    path: Path
    liger: dict[str, bool] | None = None  # Liger's kernel config for transformers; None: off


def read_model_type(path: Path) -> str:
    import json

    return str(json.loads((path / "config.json").read_text()).get("model_type", ""))


@dataclass(frozen=True)
class Choice:
    """What is decided about the model before any weight is read."""

    path: Path
    model_type: str
    generation: int
    precision: Precision
    attention: str
    liger: dict[str, bool] | None  # Liger's kernel switches; None: off


def choose(
    source: ModelSource,
    method: Method,
    precision: Precision,
    cache_dir: str | None,
    hw: Hardware,
    liger: bool | None = None,
) -> Choice:
    """Find the model (downloading it from the hub when named by id), decide precision,
    attention and kernels; every refusal comes here, before the weights are loaded."""
    if method.type == MethodType.QLORA and not hw.cuda:
        raise UnsupportedError("method.type: qlora needs a CUDA GPU; use lora on this machine")
    path = resolve(source, cache_dir)
    model_type = read_model_type(path)
    generation = family_of(model_type)
    return Choice(
        path,
        model_type,
        generation,
        choose_precision(precision, generation, hw),
        choose_attention(source.attn_implementation, model_type, hw),
        choose_liger(liger, model_type, hw),
    )


def load(
    source: ModelSource,
    method: Method,
    precision: Precision,
    cache_dir: str | None,
    hw: Hardware,
    liger: bool | None = None,
) -> LoadedModel:
    """Choose, then load (``choose`` and ``load_chosen`` in one)."""
    return load_chosen(choose(source, method, precision, cache_dir, hw, liger), method, hw)


def load_chosen(choice: Choice, method: Method, hw: Hardware) -> LoadedModel:
    """Load the model and tokenizer as chosen, apply Liger's kernels to this model and the
    method (a LoRA/QLoRA adapter, or full fine-tuning)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {
        "dtype": load_dtype(method.type, choice.precision),
        "attn_implementation": choice.attention,
    }
    if method.type == MethodType.QLORA:
        kwargs["quantization_config"] = _nf4_config(choice.precision)
        kwargs["device_map"] = device_map(method.type, hw, int(os.environ.get("LOCAL_RANK", "0")))
    model = AutoModelForCausalLM.from_pretrained(choice.path, **kwargs)
    if choice.liger is not None:
        from gft_trainer import liger as liger_kernels

        liger_kernels.apply(model, choice.liger)  # this model only, not its classes
    tokenizer = AutoTokenizer.from_pretrained(choice.path)
    model = apply_method(model, method)
    check_trainable_dtypes(model, choice.precision)
    return LoadedModel(
        model,
        tokenizer,
        choice.model_type,
        choice.generation,
        choice.precision,
        choice.attention,
        choice.path,
        choice.liger,
    )


def check_trainable_dtypes(model: Any, precision: Precision) -> None:
    """fp16 training scales the loss and unscales fp32 gradients; half-precision trainable
    weights cannot be unscaled, so such a run would crash at its first step."""
    if precision != Precision.FP16:
        return
    half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if half:
        raise UnsupportedError(
            f"training.precision: fp16 with fp16 trainable weights ({half[0]} and "
            f"{len(half) - 1} more) cannot unscale gradients; use bf16 or fp32"
        )


def _nf4_config(precision: Precision) -> Any:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UnsupportedError(
            "method.type: qlora needs the bitsandbytes package, which this image lacks; "
            "use the CUDA trainer image or method lora"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(precision),
    )


def apply_method(model: Any, method: Method) -> Any:
    """LoRA/QLoRA: wrap with a peft adapter; full: train all but the frozen towers."""
    if method.type == MethodType.FULL:
        for name, p in model.named_parameters():
            p.requires_grad = not _excluded(name) or name.startswith("lm_head")
        return model
    from peft import LoraConfig, get_peft_model

    if method.type == MethodType.QLORA:
        prepare_quantized(model)
    linear = [n for n, m in model.named_modules() if _is_linear(m)]
    config = LoraConfig(
        r=method.lora.r,
        lora_alpha=method.lora.alpha,
        lora_dropout=method.lora.dropout,
        target_modules=lora_target_regex(linear, method.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def prepare_quantized(model: Any) -> None:
    """Freeze the quantized base and upcast only the norms to fp32 (they are tiny and
    precision-sensitive). peft's ``prepare_model_for_kbit_training`` upcasts every
    non-quantized weight, the 262k-row embedding included: gigabytes of fp32 for nothing."""
    for name, param in model.named_parameters():
        param.requires_grad = False
        module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if "norm" in module.lower() and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # gradient checkpointing needs an input with grad


def _is_linear(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def needs_token_type_ids(model: Any) -> bool:
    """Gemma 3's multimodal class wants ``token_type_ids`` while training."""
    return read_attr(model, "config.model_type") == "gemma3"


def read_attr(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def count_parameters(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
