"""A stand-in for NVML (``pynvml``) on machines without a GPU: one GPU per pod whose readings
say which pod of a multi-node run they come from (pod ``JOB_COMPLETION_INDEX`` is busy
``0.2 + 0.4 * index`` and holds ``1 + 2 * index`` GiB), so a test can tell each pod's GPUs
apart after they pass through the trainer, the operator and the dashboard.

Put this folder on a training pod's ``PYTHONPATH``; the trainer's own NVML code runs unchanged.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

NVML_TEMPERATURE_GPU = 0
GIB = 2**30


def _index() -> int:
    return int(os.environ.get("JOB_COMPLETION_INDEX") or "0")


def utilization_percent(index: int) -> int:
    return 20 + 40 * index


def memory_used(index: int) -> int:
    return (1 + 2 * index) * GIB


def nvmlInit() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return 1


def nvmlDeviceGetHandleByIndex(i: int) -> int:
    return i


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    return SimpleNamespace(used=memory_used(_index()), total=80 * GIB)


def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:
    return SimpleNamespace(gpu=utilization_percent(_index()), memory=0)


def nvmlDeviceGetPowerUsage(handle: int) -> int:
    return 300_000 + 100_000 * _index()  # milliwatts


def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:
    return 60 + _index()
