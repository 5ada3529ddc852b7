"""Triton's compiler, on this machine: what ``python -m gft_trainer.toolchain`` (the trainer
image runs it when built) does with a compiler on PATH and without one, and the trainer's
refusal up front where Triton kernels would run without one.

What this does not show: the image itself (no image builder runs here). tests/test_images.py
checks that its Dockerfile installs gcc, g++ and libc6-dev in the last stage and runs this
probe there after the virtual environment is in place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from gft_api.contract import ExitCode
from gft_trainer import toolchain
from gft_trainer.errors import UnsupportedError


def probe(path: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX")}
    env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "gft_trainer.toolchain"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_triton_builds_a_module_with_the_compiler_on_path() -> None:
    done = probe(os.environ["PATH"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Triton builds its launcher with /"), done.stdout


def test_without_a_compiler_triton_cannot_and_the_probe_says_so() -> None:
    done = probe(str(Path(sys.executable).parent))  # the venv's tools only: no gcc, no clang
    assert done.returncode == ExitCode.UNSUPPORTED, done.stdout + done.stderr
    assert "Failed to find C compiler" in done.stderr  # Triton's own words


def test_triton_kernels_on_a_gpu_without_a_compiler_are_refused_up_front(monkeypatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    with pytest.raises(UnsupportedError, match=r"training\.ligerKernels needs a C compiler"):
        toolchain.require(True, "training.ligerKernels")
    toolchain.require(False, "training.ligerKernels")  # on the CPU Triton builds nothing
