"""GPU readings through NVML (pynvml, from nvidia-ml-py).

No GPU or no NVML: no readings, and no error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GpuReading:
    index: int
    utilization_ratio: float
    memory_used_bytes: int
    memory_total_bytes: int
    power_watts: float | None
    temperature_celsius: float | None


@functools.cache
def _nvml() -> Any | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, NVMLError_LibraryNotFound, driver errors
        return None


def read_gpus() -> list[GpuReading]:
    """One reading per visible GPU; an empty list when NVML is absent or fails."""
    nv = _nvml()
    if nv is None:
        return []
    readings = []
    try:
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            readings.append(
                GpuReading(
                    index=i,
                    utilization_ratio=nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0,
                    memory_used_bytes=int(mem.used),
                    memory_total_bytes=int(mem.total),
                    power_watts=_optional(lambda h=h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
                    temperature_celsius=_optional(
                        lambda h=h: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
                    ),
                )
            )
    except Exception:
        return []
    return readings


def _optional(read: Any) -> float | None:
    try:
        return float(read())
    except Exception:
        return None
