"""Model decisions per family, loading, LoRA/full on tiny models of every generation, packing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gft_api.contract import ConfigError, ExitCode, ModelSource
from gft_api.training import Method, MethodType, Precision
from gft_trainer import data, modeling
from gft_trainer.errors import ModelNotFoundError, UnsupportedError, exit_code_for

from trainer.tiny import MODEL_TYPES, make_model_dir

CPU = modeling.Hardware(cuda=False, bf16=False, flash_attn_version=None)
A100 = modeling.Hardware(cuda=True, bf16=True, flash_attn_version=(2, 7))
T4 = modeling.Hardware(cuda=True, bf16=False, flash_attn_version=None)


def test_precision_per_family_and_device() -> None:
    assert modeling.choose_precision(Precision.AUTO, 3, CPU) == Precision.FP32
    assert modeling.choose_precision(Precision.AUTO, 2, A100) == Precision.BF16
    assert modeling.choose_precision(Precision.AUTO, 1, T4) == Precision.FP32
    assert modeling.choose_precision(Precision.FP16, 2, T4) == Precision.FP16
    for gen in (3, 4):
        with pytest.raises(ConfigError, match=r"training\.precision: fp16"):
            modeling.choose_precision(Precision.FP16, gen, A100)
    with pytest.raises(UnsupportedError):
        modeling.choose_precision(Precision.FP16, 1, CPU)


def test_attention_gemma2_never_sdpa() -> None:
    assert modeling.choose_attention("auto", "gemma2", CPU) == "eager"
    assert modeling.choose_attention("auto", "gemma2", A100) == "flash_attention_2"
    old_fa = modeling.Hardware(cuda=True, bf16=True, flash_attn_version=(2, 5))
    assert modeling.choose_attention("auto", "gemma2", old_fa) == "eager"
    with pytest.raises(ConfigError, match="soft-capping"):
        modeling.choose_attention("sdpa", "gemma2", A100)
    assert modeling.choose_attention("auto", "gemma3_text", CPU) == "sdpa"
    with pytest.raises(UnsupportedError):
        modeling.choose_attention("flash_attention_2", "gemma", CPU)


@pytest.mark.parametrize("model_type", ["gemma4_text", "gemma4", "gemma3"])
def test_flash_attention_is_refused_up_front_where_it_cannot_run(model_type: str) -> None:
    # Refused as unsupported (exit 69, not retried), before any weight is loaded.
    with pytest.raises(UnsupportedError, match=f"cannot run {model_type}") as refused:
        modeling.choose_attention("flash_attention_2", model_type, A100)
    assert exit_code_for(refused.value) == ExitCode.UNSUPPORTED
    assert modeling.choose_attention("auto", model_type, A100) == "sdpa"


def test_liger_kernels_by_default_wherever_they_can_run() -> None:
    h100 = modeling.Hardware(cuda=True, bf16=True, flash_attn_version=(2, 7), liger=True)
    cpu = modeling.Hardware(cuda=False, bf16=False, flash_attn_version=None, liger=True)
    for model_type in modeling.LIGER_FAMILIES:
        # RoPE never: Liger can only swap it for every model of the process.
        assert modeling.choose_liger(None, model_type, h100) == {"rope": False}
        assert modeling.choose_liger(None, model_type, cpu) is None
        assert modeling.choose_liger(False, model_type, h100) is None
    assert modeling.choose_liger(None, "gemma3n_text", h100) is None  # Liger has no Gemma 3n
    assert modeling.choose_liger(None, "gemma3_text", A100) is None  # the package is missing
    # Triton's CPU interpreter runs the loss kernel, not RMSNorm and GeGLU.
    interpreter = modeling.Hardware(False, False, None, liger=True, triton_interpreter=True)
    off = {"rope": False, "rms_norm": False, "geglu": False}
    assert modeling.choose_liger(True, "gemma2", interpreter) == off
    assert modeling.choose_liger(None, "gemma2", interpreter) is None


@pytest.mark.parametrize(
    ("model_type", "hardware", "why"),
    [
        ("gemma3_text", "cpu", "need a CUDA GPU"),
        ("gemma3n_text", "h100", "no kernels for gemma3n_text"),
        ("gemma2", "a100", "lacks the liger-kernel package"),
    ],
)
def test_liger_asked_for_where_it_cannot_run_is_refused_up_front(
    model_type: str, hardware: str, why: str
) -> None:
    hw = {
        "cpu": modeling.Hardware(cuda=False, bf16=False, flash_attn_version=None, liger=True),
        "h100": modeling.Hardware(cuda=True, bf16=True, flash_attn_version=None, liger=True),
        "a100": A100,
    }[hardware]
    with pytest.raises(UnsupportedError, match=f"training.ligerKernels: .*{why}") as refused:
        modeling.choose_liger(True, model_type, hw)
    assert exit_code_for(refused.value) == ExitCode.UNSUPPORTED


def test_unknown_family_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="llama"):
        modeling.family_of("llama")


def test_lora_targets_skip_vision_tower_and_head() -> None:
    names = [
        "model.language_model.layers.0.self_attn.q_proj",
        "model.vision_tower.x.q_proj",
        "model.vision_tower.x.fc1",
        "lm_head",
        "model.language_model.layers.0.mlp.up_proj",
    ]
    import re

    rx = re.compile(modeling.lora_target_regex(names, ["all-linear"]))
    assert [n for n in names if rx.match(n)] == [names[0], names[4]]
    with pytest.raises(ConfigError, match="targetModules"):
        modeling.lora_target_regex(names, ["nonexistent"])


def test_missing_model_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"model\.nameOrPath"):
        modeling.resolve(ModelSource(name_or_path=str(tmp_path / "nope")), None)


def test_qlora_without_cuda_is_unsupported(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="qlora needs a CUDA GPU"):
        modeling.load(
            ModelSource(name_or_path=str(tmp_path)),
            Method(type=MethodType.QLORA),
            Precision.AUTO,
            None,
            CPU,
        )


@pytest.fixture(scope="module")
def examples() -> list[data.Example]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (9, 5, 12, 4, 7):
        ids = [2, *torch.randint(6, 300, (n - 1,), generator=g).tolist()]
        out.append(data.Example(ids, ids))
    return out


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("method", [MethodType.LORA, MethodType.FULL])
def test_every_generation_trains(
    tiny_models: Path, model_type: str, method: MethodType, examples: list[data.Example]
) -> None:
    path = make_model_dir(tiny_models, model_type)
    loaded = modeling.load(
        ModelSource(name_or_path=str(path)), Method(type=method), Precision.AUTO, None, CPU
    )
    model = loaded.model
    model.config.use_cache = False
    assert loaded.precision == Precision.FP32
    assert loaded.attention == ("eager" if model_type == "gemma2" else "sdpa")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("vision_tower" in n for n in trainable)
    if method == MethodType.LORA:
        assert all("lora_" in n for n in trainable)
    batch = data.Collator(0, modeling.needs_token_type_ids(model))(data.pack(examples, 64))
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert torch.isfinite(loss) and any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_packed_batch_gives_same_loss_as_unpacked(
    tiny_models: Path, model_type: str, examples: list[data.Example]
) -> None:
    path = make_model_dir(tiny_models, model_type)
    loaded = modeling.load(
        ModelSource(name_or_path=str(path)), Method(type=MethodType.FULL), Precision.AUTO, None, CPU
    )
    model = loaded.model.eval()
    model.config.use_cache = False
    collate = data.Collator(0, modeling.needs_token_type_ids(model))
    packed = collate(data.pack(examples, 64))
    assert packed["input_ids"].shape[0] == 1  # all five examples share one row
    reference = per_example_logits(model, collate(data.unpacked(examples)))
    assert gap(per_example_logits(model, packed), reference) < 1e-4
    # Leakage check that cannot pass by accident: the examples' order changes nothing in a
    # correctly masked model, and one row read as one sequence changes every logit after the
    # first example.
    reordered = per_example_logits(model, collate(data.pack(examples[::-1], 64)))
    assert gap(reordered[::-1], reference) < 1e-4
    one_row = data.pack(examples, 64)
    seen = per_example_logits(model, collate(leaky(one_row)), layout=collate(one_row))
    assert gap(seen, reference) > 1e-2
    with torch.no_grad():
        loss_packed = model(**packed).loss
        loss_unpacked = model(**collate(data.unpacked(examples))).loss
    assert torch.allclose(loss_packed, loss_unpacked, atol=1e-5), (loss_packed, loss_unpacked)


def per_example_logits(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    layout: dict[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Each example's logits, in order: packed rows split where the positions of ``layout``
    (the batch itself by default) restart, so that a row's padding stays on its last example;
    padded rows cut at their mask."""
    layout = batch if layout is None else layout
    with torch.no_grad():
        logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float().cpu()
    out = []
    for r in range(logits.shape[0]):
        if "position_ids" in layout:
            starts = (layout["position_ids"][r] == 0).nonzero().flatten().tolist()
            for a, b in zip(starts, [*starts[1:], logits.shape[1]], strict=True):
                out.append(logits[r, a:b])
        else:
            out.append(logits[r, : int(layout["attention_mask"][r].sum())])
    return out


def gap(got: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest logit difference, token by token (padding after an example ignored)."""
    assert len(got) == len(reference)
    return max(float((g[: len(r)] - r).abs().max()) for g, r in zip(got, reference, strict=True))


def leaky(rows: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """The same rows with positions running through each row: every example after a row's first
    attends to the ones before it, as with a mask that lets examples see each other."""
    return [{**r, "position_ids": list(range(len(r["input_ids"])))} for r in rows]


def _kernels() -> list:
    """Every (family, kernel) the trainer may pick, on the CPU and on a GPU; FlashAttention-2
    on a GPU only."""
    out = []
    for model_type in MODEL_TYPES:
        for kernel in ("eager", "sdpa", "flash_attention_2"):
            try:
                modeling.choose_attention(kernel, model_type, A100 if kernel != "sdpa" else CPU)
            except (ConfigError, UnsupportedError):
                continue
            for device in ("cpu", "cuda"):
                if kernel == "flash_attention_2" and device == "cpu":
                    continue
                marks = [pytest.mark.gpu] if device == "cuda" else []
                out.append(
                    pytest.param(
                        model_type,
                        kernel,
                        device,
                        marks=marks,
                        id=f"{model_type}-{kernel}-{device}",
                    )
                )
    return out


@pytest.mark.parametrize(("model_type", "kernel", "device"), _kernels())
def test_packed_micro_batches_of_several_rows_never_leak(
    tiny_models: Path, model_type: str, kernel: str, device: str, examples: list[data.Example]
) -> None:
    # Several packed rows per micro-batch. FlashAttention-2 reads packing from the positions
    # only for a batch of one row (with two rows it ran causal attention across examples), so
    # its micro-batch is flattened into one row; every other kernel keeps the rows apart.
    hw = modeling.Hardware.detect() if device == "cuda" else CPU
    if kernel == "flash_attention_2" and hw.flash_attn_version is None:
        pytest.skip("the flash-attn package is not installed: FlashAttention-2 cannot run here")
    path = make_model_dir(tiny_models, model_type)
    source = ModelSource(name_or_path=str(path), attn_implementation=kernel)
    try:
        modeling.choose_attention(kernel, model_type, hw)
    except UnsupportedError as e:
        pytest.skip(f"the trainer refuses {kernel} for {model_type} here: {e}")
    # fp32 wherever the kernel has it, so that a leak stands far above rounding; FlashAttention
    # runs in bf16 only.
    half = kernel == "flash_attention_2"
    precision = Precision.BF16 if half else Precision.FP32
    loaded = modeling.load(source, Method(type=MethodType.FULL), precision, None, hw)
    model = loaded.model.to(device).eval()
    model.config.use_cache = False
    flatten = data.flattens(kernel)
    collate = data.Collator(0, modeling.needs_token_type_ids(model), flatten=flatten)
    rows = data.pack(examples, 16)
    assert len(rows) >= 3  # the micro-batch really holds several packed rows
    masks = _attention_masks(model)
    batch = collate(rows)
    assert batch["input_ids"].shape[0] == (1 if flatten else len(rows))
    assert int(data.examples_in(batch)) == len(examples)
    packed = per_example_logits(model, batch)
    if not flatten:
        # The mask transformers built is one row's width: attention costs rows x 16^2.
        width = max(len(r["input_ids"]) for r in rows)
        assert masks and all(m.shape[-1] == m.shape[-2] == width for m in masks), [
            tuple(m.shape) for m in masks
        ]
    reference = per_example_logits(model, collate(data.unpacked(examples)))
    reordered = per_example_logits(model, collate(data.pack(examples[::-1], 16)))
    tol = 2e-2 if half else 1e-4
    assert gap(packed, reference) < tol
    assert gap(reordered[::-1], reference) < tol
    # The check can fail: a layout that lets examples see each other is far outside it.
    seen = per_example_logits(model, collate(leaky(rows)), layout=batch)
    assert gap(seen, reference) > 2 * tol


def _attention_masks(model: torch.nn.Module) -> list[torch.Tensor]:
    """The 4-D masks the first attention layer is called with, from now on (eager and SDPA
    get a dense mask; FlexAttention a block mask, whose ``shape`` is the same)."""
    seen: list[torch.Tensor] = []
    attention = next(
        m
        for n, m in model.named_modules()
        if n.endswith("layers.0.self_attn") and "vision_tower" not in n
    )

    def keep(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is not None:
            seen.append(mask)

    attention.register_forward_pre_hook(keep, with_kwargs=True)
    return seen


def test_full_finetuning_keeps_fp32_master_weights_and_adapters_a_compute_dtype_base() -> None:
    assert modeling.load_dtype(MethodType.FULL, Precision.BF16) == torch.float32
    assert modeling.load_dtype(MethodType.FULL, Precision.FP16) == torch.float32
    assert modeling.load_dtype(MethodType.LORA, Precision.BF16) == torch.bfloat16
    assert modeling.load_dtype(MethodType.QLORA, Precision.BF16) == torch.bfloat16


def test_qlora_ranks_load_onto_their_own_gpu() -> None:
    assert modeling.device_map(MethodType.QLORA, A100, 3) == {"": 3}
    assert modeling.device_map(MethodType.LORA, A100, 3) is None  # the Trainer places it
    assert modeling.device_map(MethodType.QLORA, CPU, 0) is None


def test_quantized_base_upcasts_only_its_norms(tiny_models: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = make_model_dir(tiny_models, "gemma3_text")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    modeling.prepare_quantized(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    norms = [n for n in dtypes if "norm" in n]
    assert norms and all(dtypes[n] == torch.float32 for n in norms)
    assert dtypes["model.embed_tokens.weight"] == torch.bfloat16
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "norm" not in n)
    assert not any(p.requires_grad for p in model.parameters())


def test_fp16_with_half_precision_trainable_weights_is_refused(tiny_models: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        make_model_dir(tiny_models, "gemma"), dtype=torch.float16
    )
    with pytest.raises(UnsupportedError, match=r"training\.precision: fp16 .* cannot unscale"):
        modeling.check_trainable_dtypes(model, Precision.FP16)
    modeling.check_trainable_dtypes(model.float(), Precision.FP16)  # fp32 master weights: fine


def test_a_qlora_adapter_is_merged_into_a_bf16_reload_of_the_base(
    tiny_models: Path, tmp_path: Path
) -> None:
    from gft_trainer.train import merge_adapter

    path = make_model_dir(tiny_models, "gemma3_text")
    loaded = modeling.load(
        ModelSource(name_or_path=str(path)), Method(type=MethodType.LORA), Precision.AUTO, None, CPU
    )
    torch.manual_seed(0)
    for name, p in loaded.model.named_parameters():
        if "lora_B" in name:  # as after training: B starts at zero, which would merge nothing
            p.data.normal_(0, 0.5)
    loaded.model.save_pretrained(tmp_path / "adapter")
    name = "model.layers.0.self_attn.q_proj.weight"
    base = dict(loaded.model.get_base_model().named_parameters())[
        name.replace(".weight", ".base_layer.weight")
    ]
    base_before = base.detach().clone()
    merged = merge_adapter(loaded, tmp_path / "adapter", MethodType.QLORA)
    weight = dict(merged.named_parameters())[name]
    assert weight.dtype == torch.bfloat16
    assert not any("lora" in n for n, _ in merged.named_parameters())
    expected = loaded.model.merge_and_unload().state_dict()[name]  # the fp32 merge, for reference
    assert not torch.allclose(expected, base_before, atol=1e-3)  # the adapter changes the weight
    torch.testing.assert_close(weight.float(), expected, atol=2e-2, rtol=1e-2)


# ---------------------------------------------------------------- a GPU pod without usable CUDA

CU132 = "13.2"


@pytest.mark.parametrize(
    ("driver", "torch_cuda", "expected"),
    [
        (
            modeling.Driver(version="535.104.05", torch_cuda=CU132),
            CU132,
            r"resources\.gpus: 1 GPU asked for, but CUDA is not usable: the node's NVIDIA driver "
            r"is 535\.104\.05 and this trainer's torch \(CUDA 13\.2\) needs 580\.65\.06 or newer",
        ),
        (
            modeling.Driver(version=None, torch_cuda=CU132),
            CU132,
            r"no NVIDIA driver is visible in the container",
        ),
        (
            modeling.Driver(version="590.44.01", torch_cuda=None),
            None,
            r"this trainer's torch is a CPU build",
        ),
        (
            modeling.Driver(version="590.44.01", torch_cuda=CU132),
            CU132,
            r"driver 590\.44\.01 is new enough for CUDA 13\.2, yet torch finds no GPU",
        ),
    ],
    ids=["old-driver", "no-driver", "cpu-torch", "driver-ok"],
)
def test_a_gpu_pod_without_usable_cuda_stops_naming_the_driver(driver, torch_cuda, expected):
    with pytest.raises(UnsupportedError, match=expected) as stopped:
        modeling.check_gpus(1, cuda=False, driver=driver)
    assert exit_code_for(stopped.value) == ExitCode.UNSUPPORTED


def test_gpus_that_work_or_none_asked_for_pass() -> None:
    old = modeling.Driver(version="535.104.05", torch_cuda=CU132)
    modeling.check_gpus(0, cuda=False, driver=old)  # a CPU pod trains on the CPU
    modeling.check_gpus(2, cuda=True, driver=old)  # CUDA works (a compatibility package)


@pytest.mark.parametrize(
    ("cuda", "needed"),
    [("13.2", "580.65.06"), ("13.0", "580.65.06"), ("12.8", "525.60.13"), ("11.8", "450.80.02")],
)
def test_the_driver_each_cuda_needs(cuda: str, needed: str) -> None:
    assert modeling.needed_driver(cuda) == needed


def test_the_driver_version_is_read_from_the_kernel_module_without_nvml(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
    )
    assert modeling.driver_from_proc(version) == "535.104.05"
    assert modeling.driver_from_proc(tmp_path / "absent") is None


@pytest.mark.gpu
def test_on_a_gpu_packed_rows_cost_a_fraction_of_one_flattened_row(tiny_models: Path) -> None:
    # Eager attention keeps its scores for the backward: one row of 8 x 256 tokens keeps a
    # 2048^2 matrix per head and layer, eight rows of 256 keep eight 256^2 ones.
    path = make_model_dir(tiny_models, "gemma3_text")
    source = ModelSource(name_or_path=str(path), attn_implementation="eager")
    hw = modeling.Hardware.detect()
    model = modeling.load(source, Method(type=MethodType.FULL), Precision.FP32, None, hw).model
    model = model.to("cuda").train()
    model.config.use_cache = False
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(40):
        n = int(torch.randint(16, 120, (1,), generator=g))
        ids = [2, *torch.randint(6, 300, (n - 1,), generator=g).tolist()]
        examples.append(data.Example(ids, ids))
    rows = data.pack(examples, 256)[:8]
    peaks = {}
    for flatten in (True, False):
        batch = {k: v.cuda() for k, v in data.Collator(0, flatten=flatten)(rows).items()}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(**batch).loss.backward()
        torch.cuda.synchronize()
        peaks[flatten] = torch.cuda.max_memory_allocated() - before
        model.zero_grad(set_to_none=True)
    assert peaks[False] < 0.5 * peaks[True], peaks
