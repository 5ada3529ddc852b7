"""GemmaFineTune manifests shared by the operator tests."""

from __future__ import annotations

import copy
from typing import Any


def finetune(name: str = "demo", **spec_overrides: Any) -> dict[str, Any]:
    """A valid GemmaFineTune; keyword arguments replace top-level spec fields."""
    spec: dict[str, Any] = {
        "model": {
            "name": "google/gemma-3-270m",
            "hfTokenSecretRef": {"name": "hf", "key": "token"},
        },
        "dataset": {"hub": {"id": "HuggingFaceH4/no_robots"}, "format": "chat"},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16}},
        "training": {"maxSteps": 20, "learningRate": 2e-4},
        "resources": {"gpus": 1},
    }
    spec.update(copy.deepcopy(spec_overrides))
    return {
        "apiVersion": "finetune.gemma.dev/v1alpha1",
        "kind": "GemmaFineTune",
        "metadata": {"name": name},
        "spec": spec,
    }
