"""What a run costs: GPU-seconds and the energy its GPUs drew.

Each pod's first local process (``LOCAL_RANK`` 0) measures the GPUs its pod holds (those NVML
sees; CUDA's count without NVML) from the trainer's start to its end, model loading included:
the GPUs are held all along. Energy comes from NVML's energy counter where the GPU has one,
else from its power readings integrated over time (trapezoids, every ``interval`` seconds).

Each pod writes its running totals to ``<output>/cost/<pod>.json`` (every ``flush_seconds``
and at the end), so the run's cost is the sum over every pod and attempt, even those killed
before they could say it (up to their last flush); a restarted process of the same pod carries
on from its file. This process's own share is also a pair of Prometheus counters.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gft_api.contract import RunCost
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from gft_trainer import gpu

log = logging.getLogger("gft")


@dataclass
class Totals:
    """One pod's totals (this process's, plus those of earlier processes of the pod)."""

    gpus: int = 0
    seconds: float = 0.0
    gpu_seconds: float = 0.0
    energy_joules: float | None = 0.0
    """None once a GPU gave no power reading: a sum that misses a GPU is not the energy."""

    def to_json(self) -> dict[str, Any]:
        return {
            "gpus": self.gpus,
            "seconds": round(self.seconds, 3),
            "gpuSeconds": round(self.gpu_seconds, 3),
            "energyJoules": None if self.energy_joules is None else round(self.energy_joules, 3),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Totals:
        energy = raw.get("energyJoules")
        return cls(
            gpus=int(raw.get("gpus") or 0),
            seconds=float(raw.get("seconds") or 0.0),
            gpu_seconds=float(raw.get("gpuSeconds") or 0.0),
            energy_joules=None if energy is None else float(energy),
        )


def visible_gpus() -> int:
    """GPUs this pod holds: those NVML sees (the device plugin shows a container only its
    own), else those CUDA sees."""
    nv = gpu.nvml()
    if nv is not None:
        try:
            return int(nv.nvmlDeviceGetCount())
        except Exception:  # a driver error: fall back to CUDA
            pass
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def energy_counter_joules(count: int) -> float | None:
    """The GPUs' energy counters summed (NVML, millijoules since the driver loaded), or None
    when one of them has none (older GPUs)."""
    nv = gpu.nvml()
    if nv is None or not count:
        return None
    try:
        return sum(
            nv.nvmlDeviceGetTotalEnergyConsumption(nv.nvmlDeviceGetHandleByIndex(i)) / 1000.0
            for i in range(count)
        )
    except Exception:  # no such call, or not supported by this GPU
        return None


def power_watts(count: int) -> float | None:
    """The GPUs' power draw summed, or None when one of them gives none."""
    readings = gpu.read_gpus()
    if len(readings) < count or any(r.power_watts is None for r in readings[:count]):
        return None
    return sum(float(r.power_watts or 0.0) for r in readings[:count])


@dataclass(eq=False)  # a collector is registered by identity
class Meter(Collector):
    """Measures this pod's GPUs on a thread of its own; ``stop`` ends it and returns the run's
    cost (every pod's file under ``folder``)."""

    folder: Path
    pod: str
    started: float = field(default_factory=time.monotonic)
    """When the trainer started (``time.monotonic()``): the GPUs were held from then."""
    interval: float = 2.0
    flush_seconds: float = 30.0
    gpus: Callable[[], int] = visible_gpus
    power: Callable[[int], float | None] = power_watts
    energy_counter: Callable[[int], float | None] = energy_counter_joules
    _count: int = 0
    _base: Totals = field(default_factory=Totals)
    _own: Totals = field(default_factory=Totals)
    _last: tuple[float, float | None] = (0.0, None)  # (time, watts) of the last power reading
    _counter_start: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def file(self) -> Path:
        return self.folder / f"{self.pod}.json"

    def start(self) -> Meter:
        self._count = self.gpus()
        try:
            self._base = Totals.from_json(json.loads(self.file.read_text()))
        except (OSError, ValueError):
            self._base = Totals()
        self._own = Totals(gpus=self._count, energy_joules=0.0 if self._count else None)
        self._counter_start = self.energy_counter(self._count)
        self._last = (self.started, self.power(self._count) if self._count else None)
        self._thread = threading.Thread(target=self._run, name="gft-cost", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)  # a run that fails still says what it cost
        return self

    def _at_exit(self) -> None:
        if not self._stop.is_set():
            self.sample()
            self.flush()

    def _run(self) -> None:
        flushed = time.monotonic()
        while not self._stop.wait(self.interval):
            self.sample()
            if time.monotonic() - flushed >= self.flush_seconds:
                self.flush()
                flushed = time.monotonic()

    def sample(self, now: float | None = None) -> None:
        """Bring this process's totals up to ``now``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            own = self._own
            own.seconds = now - self.started
            own.gpu_seconds = own.seconds * self._count
            if not self._count:
                return
            if self._counter_start is not None:
                counter = self.energy_counter(self._count)
                if counter is not None:
                    own.energy_joules = counter - self._counter_start
                    return
                self._counter_start = None  # it stopped answering: integrate from here on
            then, watts_then = self._last
            watts = self.power(self._count)
            if watts is None or watts_then is None or own.energy_joules is None:
                own.energy_joules = None
            else:
                own.energy_joules += (watts + watts_then) / 2 * (now - then)
            self._last = (now, watts)

    def totals(self) -> Totals:
        """This pod's totals: the earlier processes' and this one's."""
        with self._lock:
            base, own = self._base, self._own
            energy = (
                None
                if base.energy_joules is None or own.energy_joules is None
                else base.energy_joules + own.energy_joules
            )
            if not (base.gpus or own.gpus):
                energy = None
            return Totals(
                gpus=max(base.gpus, own.gpus),
                seconds=base.seconds + own.seconds,
                gpu_seconds=base.gpu_seconds + own.gpu_seconds,
                energy_joules=energy,
            )

    def flush(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.totals().to_json()))
            tmp.replace(self.file)
        except OSError as e:
            log.warning("could not write %s: %s", self.file, e)

    def stop(self, now: float | None = None) -> RunCost:
        """End the measurement (at ``now``, ``time.monotonic()``), write this pod's file, and
        return the run's cost so far."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sample(now)
        self.flush()
        return run_cost(self.folder)

    def collect(self) -> Iterator[CounterMetricFamily]:
        """This process's GPU-seconds and energy, as Prometheus counters."""
        with self._lock:
            own = Totals(**vars(self._own))
        seconds = CounterMetricFamily(
            "gft_gpu_seconds", "GPUs held times wall seconds, by this trainer process."
        )
        seconds.add_metric([], own.gpu_seconds)
        yield seconds
        if own.energy_joules is not None:
            energy = CounterMetricFamily(
                "gft_gpu_energy_joules", "Energy the GPUs drew (NVML), by this trainer process."
            )
            energy.add_metric([], own.energy_joules)
            yield energy


def run_cost(folder: Path) -> RunCost:
    """The sum of every pod's file: GPU-seconds, GPU-hours, and energy in Wh (None when a
    pod with GPUs had no power readings)."""
    pods = []
    for path in sorted(folder.glob("*.json")):
        try:
            pods.append(Totals.from_json(json.loads(path.read_text())))
        except (OSError, ValueError) as e:
            log.warning("cost: %s unreadable (%s): left out", path, e)
    gpu_seconds = sum(p.gpu_seconds for p in pods)
    with_gpus = [p for p in pods if p.gpus]
    energy = None
    if with_gpus and all(p.energy_joules is not None for p in with_gpus):
        energy = round(sum(float(p.energy_joules or 0.0) for p in with_gpus) / 3600.0, 4)
    return RunCost(
        gpu_seconds=round(gpu_seconds, 3),
        gpu_hours=round(gpu_seconds / 3600.0, 6),
        energy_wh=energy,
    )


def pod_name() -> str:
    """This pod's name (the kubelet sets HOSTNAME to it); this machine's, outside Kubernetes."""
    return os.environ.get("HOSTNAME") or os.uname().nodename or "local"
