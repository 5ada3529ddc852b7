"""The GPU readings of a run's pods, read from each pod's /metrics at its IP, with bounds: what a
pod answers is its author's text, and the run page asks every 10 s, for every viewer.

At most ``spec.resources.nodes`` pods are read (the run's own completion indexes), at most
``METRICS_MAX_BYTES`` of each (a trainer's metrics are a few kB), only the ``gft_gpu_*``
lines of it are parsed (in a thread, not on the event loop), and at most
``spec.resources.gpus`` GPUs per pod are kept. A run's readings are kept ``CACHE_SECONDS``
and shared by everyone who may see it: however many pages are open on it, its pods are read
once per interval (the user's right to see the run is asked of the API server each time, by
the caller, before this).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

import aiohttp
from gft_api.conventions import METRICS_PORT

from gft_dashboard.apiserver import read_at_most
from gft_dashboard.hub import gpu_series
from gft_dashboard.tensorboard import host_port

METRICS_MAX_BYTES = 64 << 10
TIMEOUT = 5.0
CACHE_SECONDS = 5.0
MAX_RUNS = 1000  # runs whose readings are kept
CONNECTIONS, PER_POD_CONNECTIONS = 64, 2


class GpuReader:
    """Readings per run, cached and read once at a time; ``client`` is this reader's own
    pool of connections to pods (TensorBoard's floods cannot take it)."""

    def __init__(self) -> None:
        self.client: aiohttp.ClientSession | None = None
        self._cache: OrderedDict[tuple[str, str], tuple[float, tuple, dict[str, Any]]] = (
            OrderedDict()
        )
        self._reading: dict[tuple[str, str], asyncio.Future] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=CONNECTIONS, limit_per_host=PER_POD_CONNECTIONS)
        self.client = aiohttp.ClientSession(connector=connector)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def readings(
        self, run: tuple[str, str], pods: list[tuple[str, str, str]], gpus_per_pod: int
    ) -> dict[str, Any]:
        """The answer for /gpus: ``pods`` are (name, completion index, IP) of the run's running
        pods, already bounded by the caller; ``gpus_per_pod`` caps each pod's GPUs."""
        shape = (tuple(pods), gpus_per_pod)
        cached = self._cache.get(run)
        fresh = cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS
        if cached is not None and fresh and cached[1] == shape:
            return cached[2]
        reading = self._reading.get(run)
        if reading is None:
            reading = asyncio.ensure_future(self._read(pods, gpus_per_pod))
            self._reading[run] = reading
            reading.add_done_callback(lambda _: self._reading.pop(run, None))
        answer = await asyncio.shield(reading)
        self._cache[run] = (time.monotonic(), shape, answer)
        self._cache.move_to_end(run)
        while len(self._cache) > MAX_RUNS:
            self._cache.popitem(last=False)
        return answer

    async def _read(self, pods: list[tuple[str, str, str]], gpus_per_pod: int) -> dict[str, Any]:
        texts = await asyncio.gather(*(self._metrics(ip) for _, _, ip in pods))
        parsed = await asyncio.to_thread(_parse_all, texts, gpus_per_pod)
        series, silent = [], []
        for (pod, index, _), readings in zip(pods, parsed, strict=True):
            if readings is None:
                silent.append(pod)
            else:
                series += [{"pod": pod, "index": index, **gpu} for gpu in readings]
        answer: dict[str, Any] = {"gpus": series, "pods": len(pods)}
        if silent:
            answer["error"] = f"the metrics of {', '.join(silent)} did not answer"
        return answer

    async def _metrics(self, ip: str) -> str | None:
        address = host_port(ip, METRICS_PORT)
        if address is None or self.client is None:
            return None
        try:
            async with self.client.get(
                f"http://{address}/metrics", allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=TIMEOUT),
            ) as r:  # fmt: skip
                if r.status != 200:
                    return None
                text = await read_at_most(r.content, METRICS_MAX_BYTES)
        except (aiohttp.ClientError, TimeoutError):
            return None
        return None if len(text) > METRICS_MAX_BYTES else text.decode("utf-8", errors="replace")


def _parse_all(texts: list[str | None], gpus_per_pod: int) -> list[list[dict[str, Any]] | None]:
    """Each pod's GPUs (at most ``gpus_per_pod``), from the gft_gpu_* lines alone; None for a
    pod that did not answer or answered something else."""
    out: list[list[dict[str, Any]] | None] = []
    for text in texts:
        if text is None:
            out.append(None)
            continue
        wanted = "\n".join(
            line for line in text.splitlines() if line.startswith(("gft_gpu_", "# TYPE gft_gpu_"))
        )
        try:
            out.append(gpu_series(wanted + "\n")[:gpus_per_pod])
        except ValueError:
            out.append(None)
    return out
