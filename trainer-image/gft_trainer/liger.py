"""Liger's Triton kernels, applied to the one model instance being trained.

Liger's ``apply_liger_kernel_to_<family>(model=...)`` patches the instance (its RMSNorm and MLP
modules, its forward for the fused linear cross-entropy) but also swaps the classes in
transformers' modeling module (``Gemma3RMSNorm``, ``Gemma3MLP``), so every model built later in
the process (a merged model, a reference model in a benchmark) would run Liger too. ``apply``
lets Liger patch the instance and then puts the module's classes back. Liger's RoPE is never
applied: attention looks ``apply_rotary_pos_emb`` up in its module, so it could only be swapped
for every model of the process (a CPU model built later would then call a Triton kernel).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any


def apply(model: Any, kernels: dict[str, bool]) -> None:
    """Liger's kernels on ``model`` (a transformers model, before any peft wrapping), as
    ``kernels`` switches them (``rms_norm``, ``geglu``, ``fused_linear_cross_entropy``; unnamed
    ones on); never RoPE."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    saved = [(module, dict(vars(module))) for module in _modeling_modules(model)]
    _apply_liger_kernel_to_instance(model=model, **{**kernels, "rope": False})
    for module, before in saved:
        for name, value in before.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)


def _modeling_modules(model: Any) -> set[ModuleType]:
    """transformers' modeling modules the model's layers come from (Liger patches those)."""
    names = {type(m).__module__ for m in model.modules()}
    return {sys.modules[n] for n in names if n.startswith("transformers.models.")}
