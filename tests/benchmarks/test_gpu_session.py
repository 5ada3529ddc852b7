"""The GPU session script stays working between the rare calls that have a GPU: its steps run
here in ``--tiny`` mode (on the CPU, with this checkout's Python), from installing a kit to
writing every file in $OUT.

The kit here is one small wheel made by the test: the real kit (``make gpu-kit``) is for
CPython 3.12, which this machine's venv is not (and fetching it needs the network). The
install step refuses a kit built for another Python, which is checked too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "benchmarks" / "gpu_session.sh"
pytestmark = pytest.mark.slow


def probe_wheel(folder: Path, tag: str = "py3-none-any") -> Path:
    """A wheel of one module, ``gft_kit_probe`` 1.0, as pip would build it."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"gft_kit_probe-1.0-{tag}.whl"
    info = "gft_kit_probe-1.0.dist-info"
    files = {
        "gft_kit_probe/__init__.py": '__version__ = "1.0"\n',
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: gft-kit-probe\nVersion: 1.0\n",
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return wheel


def session(tmp_path: Path, kit: Path) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "GFT_KIT": str(kit),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", str(SCRIPT), "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # the script finds the checkout from its own path
        timeout=900,
    )
    return done, out


def steps(out: Path) -> dict[str, int]:
    lines = (out / "steps.txt").read_text().split()
    names = [w for w in lines if "=" not in w]
    codes = [int(w.split("=")[1]) for w in lines if w.startswith("rc=")]
    return dict(zip(names, codes, strict=True))


def test_the_session_runs_every_step_and_leaves_its_files_in_out(tmp_path: Path) -> None:
    kit = probe_wheel(tmp_path / "kit").parent
    done, out = session(tmp_path, kit)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert steps(out) == {"kit": 0, "env": 0, "throughput": 0, "gpu-tests": 0}, log[-4000:]
    env = (out / "env.txt").read_text()
    assert "gft-kit-probe 1.0 (kit)" in env, env  # the kit's package, found in the kit's folder
    assert "torch CUDA" in env and "Triton builds its launcher with" in env, env
    assert "ours/padded tokens/s" in (out / "throughput.txt").read_text()
    results = json.loads((out / "throughput.json").read_text())
    assert {r["loop"] for r in results} == {"padded", "packed", "ours"}
    assert len({r["pid"] for r in results}) == 3  # one process per loop
    tests = (out / "gpu-tests.txt").read_text()
    assert "needs a CUDA GPU" in tests and "error" not in tests.lower(), tests
    assert (out / "gpu-tests.xml").exists()


def test_a_kit_for_another_python_is_refused_by_name(tmp_path: Path) -> None:
    other = "cp399" if sys.version_info[:2] != (3, 99) else "cp398"
    probe_wheel(tmp_path / "kit", tag=f"{other}-{other}-manylinux_2_28_x86_64")
    install = [sys.executable, str(REPO / "tests/benchmarks/gpu_kit.py"), "install"]
    done = subprocess.run(
        [*install, str(tmp_path / "kit"), str(tmp_path / "target")],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "built for another Python than this one" in done.stderr, done.stderr
