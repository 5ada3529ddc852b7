"""The kit of wheels that makes a lent GPU machine able to run the trainer, its benchmark and its
``gpu`` tests: such a machine has no package registry, a Python 3.12 with its own torch (and an
older transformers), and takes at most 64 MiB from the checkout.

    make gpu-kit                                           # here: .whl/ (ignored), < 64 MiB
    python3 tests/benchmarks/gpu_kit.py install .whl DIR   # there: unpack; then PYTHONPATH=DIR

``build`` resolves the trainer's packages (``pyproject.toml``'s ``trainer`` extra, pinned to the
versions of ``trainer-image/requirements.lock`` where that lock has them, plus pytest) for
CPython 3.12 on x86-64 Linux, leaves out what the machine's torch brings (torch, Triton, the
CUDA libraries and torch's own dependencies) and what the session does not use (S3, Parquet,
TensorBoard's server), and downloads the wheels with their hashes checked.

``install`` needs the standard library only: a wheel is a zip archive of what goes into
site-packages, so it is unpacked into DIR, which goes first on ``PYTHONPATH`` (the machine's
own packages stay as they are; the kit's shadow them).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT = 64 * 2**20
# Not carried: the machine's torch and what only torch uses. (torch's small dependencies that the
# trainer's packages need too, such as typing-extensions, jinja2 and filelock, are carried: the
# kit's recent versions serve both.)
TORCH_BRINGS = ("torch", "triton", "sympy", "mpmath", "networkx", "setuptools")
# ... and the session never uses these: S3 export, Parquet, TensorBoard's server and images
# (writing scalars needs the tensorboard package and protobuf alone).
UNUSED = (
    "boto3",
    "botocore",
    "s3transfer",
    "jmespath",
    "python-dateutil",
    "pyarrow",
    "pillow",
    "grpcio",
    "tensorboard-data-server",
    "werkzeug",
    "markdown",
)
EXTRA = ("pytest", "pytest-timeout")


def build(kit: Path, uv: str, pip: str) -> int:
    """Resolve and download the kit into ``kit``; returns its size in bytes."""
    kit.mkdir(exist_ok=True)
    for old in kit.glob("*.whl"):
        old.unlink()
    wanted = kit / "requirements.in"
    wanted.write_text("\n".join(EXTRA) + "\n")
    lock = kit / "requirements.txt"
    leave_out = [*TORCH_BRINGS, *UNUSED]
    subprocess.run(
        [
            uv,
            *("pip", "compile", "-q", str(REPO / "pyproject.toml"), str(wanted)),
            *("--extra", "trainer", "--python-version", PYTHON_VERSION),
            *("--python-platform", "x86_64-manylinux_2_28", "--generate-hashes"),
            *("-c", str(REPO / "trainer-image" / "requirements.lock")),
            *[arg for name in leave_out for arg in ("--no-emit-package", name)],
            *("-o", str(lock)),
        ],
        check=True,
    )
    # CUDA's wheels come with torch; uv cannot leave out a family by pattern. NVML's Python
    # binding (nvidia-ml-py: the GPU readings) is the trainer's own.
    text = lock.read_text()
    kept = drop_packages(
        text, lambda name: name.startswith(("nvidia-", "cuda-")) and name != "nvidia-ml-py"
    )
    lock.write_text(kept)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [
            pip,
            *("download", "-q", "--no-deps", "--only-binary=:all:", "--require-hashes"),
            *("--python-version", PYTHON_VERSION, "--implementation", "cp"),
            *("--abi", "cp312", "--abi", "abi3", "--abi", "none", *platforms),
            *("-r", str(lock), "-d", str(kit)),
        ],
        check=True,
    )
    size = sum(w.stat().st_size for w in kit.glob("*.whl"))
    if size > LIMIT:
        raise SystemExit(f"the kit is {size / 2**20:.1f} MiB, above {LIMIT / 2**20:.0f} MiB")
    return size


def drop_packages(lock: str, drop: Callable[[str], bool]) -> str:
    """The lock's text without the entries (requirement line, hashes, comments) of the packages
    ``drop`` names."""
    out: list[str] = []
    skipping = False
    for line in lock.splitlines():
        if line and not line.startswith((" ", "#")):
            name = line.split("==")[0].strip().lower()
            skipping = drop(name)
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def install(kit: Path, target: Path) -> list[str]:
    """Unpack every wheel of ``kit`` into ``target``; returns the wheels' names."""
    wheels = sorted(kit.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"{kit}: no wheels; run `make gpu-kit` on a machine with a registry")
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    foreign = [w.name for w in wheels if not fits(w.name, here)]
    if foreign:
        raise SystemExit(
            f"{kit}: {len(foreign)} wheels are built for another Python than this one ({here}), "
            f"e.g. {foreign[0]}; the kit is for CPython {PYTHON_VERSION}"
        )
    target.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
            z.extractall(tmp)
            for item in Path(tmp).iterdir():
                if item.name.endswith(".data"):
                    # purelib and platlib belong in site-packages; scripts and headers are not
                    # needed (everything runs as `python -m`).
                    for lib in ("purelib", "platlib"):
                        for part in (item / lib).glob("*"):
                            _merge(part, target)
                    continue
                _merge(item, target)
    return [w.name for w in wheels]


def fits(wheel: str, python: str) -> bool:
    """Whether a wheel (by its file name's tags) runs on ``python`` (``cp312``): pure Python,
    the stable ABI from an older version on, or built for exactly this one."""
    python_tag, abi_tag = wheel[: -len(".whl")].split("-")[-3:-1]
    if abi_tag in ("none", "abi3"):
        return all(t.startswith("py") or _cp(t) <= _cp(python) for t in python_tag.split("."))
    return python in python_tag.split(".")


def _cp(tag: str) -> tuple[int, int]:
    """``cp312`` as (3, 12)."""
    return int(tag[2]), int(tag[3:])


def _merge(source: Path, target: Path) -> None:
    """Move ``source`` into ``target``, folder by folder (wheels share folders such as
    ``nvidia`` or ``google``)."""
    dest = target / source.name
    if source.is_dir():
        dest.mkdir(exist_ok=True)
        for item in source.iterdir():
            _merge(item, dest)
        return
    if dest.exists():
        dest.unlink()
    shutil.move(str(source), dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="resolve and download the kit (needs a registry)")
    b.add_argument("kit", type=Path)
    b.add_argument("--uv", required=True)
    b.add_argument("--pip", required=True)
    i = sub.add_parser("install", help="unpack the kit's wheels into a folder for PYTHONPATH")
    i.add_argument("kit", type=Path)
    i.add_argument("target", type=Path)
    a = parser.parse_args()
    if a.command == "build":
        size = build(a.kit, a.uv, a.pip)
        count = len(list(a.kit.glob("*.whl")))
        print(f"{a.kit}: {count} wheels, {size / 2**20:.1f} MiB")
    else:
        names = install(a.kit, a.target)
        print(f"{a.target}: {len(names)} wheels unpacked")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
