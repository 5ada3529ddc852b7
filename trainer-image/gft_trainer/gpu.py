"""GPU readings through NVML (pynvml, from nvidia-ml-py), and their Prometheus collector.

No GPU or no NVML: no readings, and no error.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


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


def nvml() -> Any | None:
    """The ``pynvml`` module, initialised; None when there is no NVML (no GPU, no driver)."""
    return _nvml()


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


class GpuCollector(Collector):
    """Per-GPU readings at scrape time; yields nothing when there is no GPU or no NVML."""

    def __init__(self, run: str) -> None:
        self.run = run

    def collect(self) -> Iterator[GaugeMetricFamily]:
        readings = read_gpus()
        if not readings:
            return
        families = {
            "utilization_ratio": ("gft_gpu_utilization_ratio", "GPU busy share (0-1)."),
            "memory_used_bytes": ("gft_gpu_memory_used_bytes", "GPU memory in use."),
            "memory_total_bytes": ("gft_gpu_memory_total_bytes", "GPU memory in total."),
            "power_watts": ("gft_gpu_power_watts", "GPU power draw."),
            "temperature_celsius": ("gft_gpu_temperature_celsius", "GPU temperature."),
        }
        for attr, (name, help_text) in families.items():
            fam = GaugeMetricFamily(name, help_text, labels=["run", "gpu"])
            for g in readings:
                value = getattr(g, attr)
                if value is not None:
                    fam.add_metric([self.run, str(g.index)], float(value))
            yield fam


def serve(run: str, address: str, port: int) -> Any:
    """An endpoint with this pod's GPU readings alone: what the pods of a multi-node run other
    than pod 0 serve (pod 0's rank 0 serves them beside the training metrics). Returns the
    server (``shutdown()``, ``server_address``)."""
    registry = CollectorRegistry()
    registry.register(GpuCollector(run))
    server, _ = start_http_server(port, addr=address, registry=registry)
    return server
