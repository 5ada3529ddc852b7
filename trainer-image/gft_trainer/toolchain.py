"""The C compiler Triton needs: it builds a small launcher module the first time a kernel runs
(Liger's kernels, ``torch.compile`` on a GPU), with ``$CC`` or the first ``gcc``/``clang`` on
PATH, against Python's headers. Without one the run would fail at its first step.

    python -m gft_trainer.toolchain      # build a module the way Triton does; exit 69 if it cannot

The trainer image runs this when it is built, so an image that cannot compile is never shipped;
``require`` refuses a run up front on a machine without one.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from gft_api.contract import ExitCode

from gft_trainer.errors import UnsupportedError

PROBE = """
#include <Python.h>
static struct PyModuleDef probe = {PyModuleDef_HEAD_INIT, "gft_toolchain_probe", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_gft_toolchain_probe(void) { return PyModule_Create(&probe); }
"""


def find_compiler() -> str | None:
    """The compiler Triton would use (its own rule: ``$CC``, else ``gcc``, else ``clang``)."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def require(cuda: bool, what: str) -> None:
    """Refuse before training when ``what`` (Triton kernels) will run and no compiler is here."""
    if cuda and find_compiler() is None:
        raise UnsupportedError(
            f"{what} needs a C compiler (Triton builds its launcher with $CC, gcc or clang) and "
            "none is on PATH; use the trainer image (it carries gcc), or turn it off"
        )


def build_probe() -> str:
    """Build and load a module through Triton's own build function, in a fresh cache (so the
    compiler really runs). Returns the compiler used."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        from triton.runtime.build import compile_module_from_src

        module = compile_module_from_src(PROBE, "gft_toolchain_probe")
        assert module.__name__ == "gft_toolchain_probe"
    compiler = find_compiler()
    assert compiler is not None  # Triton found one, by the same rule
    return shutil.which(compiler) or compiler


def main() -> int:
    try:
        compiler = build_probe()
    except Exception as e:  # RuntimeError (no compiler), CalledProcessError (no headers), ...
        print(f"Triton cannot build its launcher here: {type(e).__name__}: {e}", file=sys.stderr)
        return int(ExitCode.UNSUPPORTED)
    print(f"Triton builds its launcher with {compiler}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
