"""``training.torchCompile``: the model trained under ``torch.compile`` (inductor, on CPU here)
learns exactly what the eager model learns, and its adapter is saved as an ordinary one."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from trainer.conftest import log_history, run_gft_train, series, write_config

STEPS = 8


def train(tmp_path: Path, model: Path, compiled: bool) -> tuple[dict[int, float], Path, str]:
    out = tmp_path / f"out-{compiled}"
    cfg = write_config(
        tmp_path / f"c-{compiled}.yaml",
        model,
        out,
        training={"maxSteps": STEPS, "loggingEverySteps": 2, "torchCompile": compiled},
        data={"evalFraction": 0},
        output={"dir": str(out), "checkpointEverySteps": STEPS},
    )
    done = run_gft_train(cfg, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    losses = series(log_history(out, STEPS), "loss")
    return losses, out / "adapter" / "adapter_model.safetensors", log


@pytest.mark.slow
def test_a_compiled_run_learns_what_the_eager_run_learns(tmp_path: Path, tiny_gemma3: Path):
    eager, eager_adapter, eager_log = train(tmp_path, tiny_gemma3, compiled=False)
    compiled, compiled_adapter, log = train(tmp_path, tiny_gemma3, compiled=True)
    assert "torch.compile: on (inductor backend)" in log
    assert "torch.compile" not in eager_log
    assert compiled.keys() == eager.keys() and len(eager) == STEPS // 2
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-4), (step, compiled, eager)
    a, b = load_file(eager_adapter), load_file(compiled_adapter)
    assert a.keys() == b.keys()  # no "_orig_mod." prefix from the compiled wrapper
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
