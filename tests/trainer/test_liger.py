"""``training.ligerKernels``: Liger's fused linear cross-entropy trains what the plain loss
trains, and the token accuracy it reports from inside the loss is the accuracy the trainer
computes from the logits.

Liger's kernels are Triton kernels. Here, without a GPU, they run through Triton's CPU
interpreter (``TRITON_INTERPRET=1``), which runs the loss kernel but not RMSNorm and GeGLU; the
``gpu`` test runs them all on CUDA when a GPU machine is at hand. Liger's RoPE is never used (it
could only be swapped for every model of the process)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from gft_api.contract import ExitCode, ModelSource
from gft_api.training import Method, Precision
from gft_trainer import liger, modeling
from safetensors.torch import load_file

from trainer.conftest import log_history, run_gft_train, series, write_config
from trainer.tiny import make_model_dir

STEPS = 12
INTERPRETER = {"TRITON_INTERPRET": "1"}


def train(
    tmp_path: Path,
    model: Path,
    liger: bool,
    env: dict[str, str] | None = None,
    precision: str = "auto",
) -> tuple[list[dict], Path, str]:
    out = tmp_path / f"out-{liger}"
    cfg = write_config(
        tmp_path / f"c-{liger}.yaml",
        model,
        out,
        # Full fine-tuning at a high rate: the output head learns (its gradient comes from the
        # fused kernel) and the model gets tokens right within a few steps, so that the
        # accuracies compared below are not all zero.
        method={"type": "full"},
        training={
            "maxSteps": STEPS,
            "batchSize": 4,
            "learningRate": 1e-2,
            "loggingEverySteps": 2,
            "evalEverySteps": STEPS // 2,
            "ligerKernels": liger,
            "precision": precision,
        },
        output={"dir": str(out), "checkpointEverySteps": STEPS},
    )
    done = run_gft_train(cfg, timeout=900, env=env)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    return log_history(out, STEPS), out / "model" / "model.safetensors", log


def assert_same_curves(plain: list[dict], fused: list[dict], tolerance: float) -> None:
    for key in ("loss", "eval_loss", "token_accuracy", "eval_token_accuracy"):
        a, b = series(plain, key), series(fused, key)
        assert a and a.keys() == b.keys(), (key, a, b)
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=tolerance, abs=tolerance), (key, a, b)


@pytest.mark.slow
def test_the_fused_loss_trains_what_the_plain_loss_trains(tmp_path: Path, tiny_gemma3: Path):
    plain, plain_weights, plain_log = train(tmp_path, tiny_gemma3, liger=False)
    fused, fused_weights, log = train(tmp_path, tiny_gemma3, liger=True, env=INTERPRETER)
    assert "Liger kernels: on (fused linear cross-entropy; left out: RMSNorm, GeGLU, RoPE)" in log
    assert "Liger kernels: off (training.ligerKernels: false)" in plain_log
    assert "could not be imported" not in log  # Liger's optional backends are not our news
    assert_same_curves(plain, fused, tolerance=1e-6)
    assert max(series(fused, "token_accuracy").values()) > 0.05, fused
    assert max(series(fused, "eval_token_accuracy").values()) > 0.05, fused
    a, b = load_file(plain_weights), load_file(fused_weights)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_liger_asked_for_without_a_gpu_is_refused_before_training(
    tmp_path: Path, tiny_gemma3: Path
):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_gemma3, out, training={"ligerKernels": True})
    done = run_gft_train(cfg)
    assert done.returncode == ExitCode.UNSUPPORTED, done.stdout[-2000:] + done.stderr[-2000:]
    assert (
        "training.ligerKernels: Liger's kernels are Triton GPU kernels" in done.stdout + done.stderr
    )
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text", "gemma3", "gemma4_text"])
def test_liger_patches_the_model_it_is_given_and_no_later_one(tiny_models: Path, model_type: str):
    from transformers import AutoModelForCausalLM

    path = make_model_dir(tiny_models, model_type)
    plain = AutoModelForCausalLM.from_pretrained(path)
    classes = {n: type(m) for n, m in plain.named_modules()}
    forward = type(plain).forward
    modeling_module = dict(vars(sys.modules[type(plain).__module__]))
    patched = AutoModelForCausalLM.from_pretrained(path)
    liger.apply(patched, {"rope": True})  # asked for, never applied
    names = {n: type(m).__name__ for n, m in patched.named_modules()}
    if model_type != "gemma3":  # Liger swaps the multimodal model's forward, not its norms
        assert any(m._get_name().startswith("Liger") for m in patched.modules()), names
    assert "forward" in vars(patched)  # the fused loss: on this instance
    later = AutoModelForCausalLM.from_pretrained(path)
    assert sys.modules[type(later).__module__].__dict__ == modeling_module  # no function swapped
    assert {n: type(m) for n, m in later.named_modules()} == classes
    assert not any(m._get_name().startswith("Liger") for m in later.modules())
    assert "forward" not in vars(later) and type(later).forward is forward


def test_the_trainer_loads_its_model_with_liger_on_that_model_alone(tiny_gemma3: Path):
    from transformers import AutoModelForCausalLM

    hw = modeling.Hardware(False, False, None, liger=True, triton_interpreter=True)
    method = Method.model_validate({"type": "full"})
    source = ModelSource(name_or_path=str(tiny_gemma3))
    loaded = modeling.load(source, method, Precision.AUTO, None, hw, liger=True)
    assert loaded.liger == {"rope": False, "rms_norm": False, "geglu": False}
    assert "forward" in vars(loaded.model)
    later = AutoModelForCausalLM.from_pretrained(tiny_gemma3)
    assert "forward" not in vars(later)


@pytest.mark.gpu
def test_all_liger_kernels_on_a_gpu_train_what_the_plain_model_trains(
    tmp_path: Path, tiny_gemma3: Path
):
    # In fp32 on the GPU both runs do the same arithmetic (torch's fp32 matmuls do not use
    # TF32 unless asked; Liger's kernels compute in fp32), so the curves agree as closely as on
    # the CPU: only summation orders differ. bf16 would round the two paths differently by
    # more than any tolerance that still means something after 12 steps at this rate.
    assert torch.cuda.is_available()
    plain, plain_weights, _ = train(tmp_path, tiny_gemma3, liger=False, precision="fp32")
    fused, fused_weights, log = train(tmp_path, tiny_gemma3, liger=True, precision="fp32")
    assert "Liger kernels: on (fused linear cross-entropy, RMSNorm, GeGLU; left out: RoPE)" in log
    assert_same_curves(plain, fused, tolerance=1e-3)
    a, b = load_file(plain_weights), load_file(fused_weights)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-2
