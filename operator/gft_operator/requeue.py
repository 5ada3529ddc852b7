"""Reconciles asked for later: a retry after an error (with a per-object back-off), or a
deadline the status depends on (a finished Job's TTL).

One thread and a heap decide what is due; a pool of workers reconciles, never one fine-tune
twice at once (one that comes due while it is being reconciled waits for that to end). Each
fine-tune is queued at most once, at the earliest time asked for; ``succeeded`` resets its
back-off. The back-off doubles from ``first`` to ``longest``.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("gft_operator.requeue")

Key = tuple[str, str]


def backoff(failures: int, first: float = 1.0, longest: float = 60.0) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1, 2, 4, ... longest)."""
    return min(longest, first * 2 ** max(0, failures - 1))


class Requeue:
    RUNNING_RETRY_SECONDS = 0.05
    """How soon to look again at a due fine-tune that is being reconciled right now."""

    def __init__(
        self,
        reconcile: Callable[[str, str], None],
        workers: int = 1,
        gate: threading.Event | None = None,
    ) -> None:
        self._reconcile = reconcile
        self._gate = gate
        """Nothing is run before it is set (the caches are synced); what is queued waits."""
        self._heap: list[tuple[float, Key]] = []
        self._due: dict[Key, float] = {}
        self._failures: dict[Key, int] = {}
        self._running: set[Key] = set()
        self._wake = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gft-requeue")

    def at(self, key: Key, when: float) -> None:
        """Reconcile ``key`` at ``when`` (``time.monotonic()`` clock), unless sooner already."""
        with self._wake:
            if key in self._due and self._due[key] <= when:
                return
            self._due[key] = when
            heapq.heappush(self._heap, (when, key))
            self._wake.notify()

    def after(self, key: Key, seconds: float) -> None:
        self.at(key, time.monotonic() + seconds)

    def resync(self, key: Key, seconds: float) -> None:
        """Like ``after``, but never sooner than a back-off already waiting: the periodic
        resync does not turn a refused write into a retry every period."""
        with self._wake:
            if self._failures.get(key) and key in self._due:
                return
        self.after(key, seconds)

    def failed(self, key: Key, retry_after: float | None = None) -> float:
        """Count a failure and queue the retry; returns the delay chosen."""
        with self._wake:
            self._failures[key] = self._failures.get(key, 0) + 1
            delay = backoff(self._failures[key])
        if retry_after is not None:
            delay = max(delay, min(retry_after, 60.0))
        self.after(key, delay)
        return delay

    def succeeded(self, key: Key) -> None:
        with self._wake:
            self._failures.pop(key, None)

    def forget(self, key: Key) -> None:
        with self._wake:
            self._due.pop(key, None)
            self._failures.pop(key, None)
            self._heap = [entry for entry in self._heap if entry[1] != key]
            heapq.heapify(self._heap)

    def pending(self) -> dict[Key, float]:
        with self._wake:
            return dict(self._due)

    def run(self, stop: threading.Event) -> None:
        while self._gate is not None and not self._gate.wait(0.5):
            if stop.is_set():
                return
        while not stop.is_set():
            with self._wake:
                now = time.monotonic()
                while self._heap and (self._due.get(self._heap[0][1]) != self._heap[0][0]):
                    heapq.heappop(self._heap)  # superseded by an earlier or cancelled entry
                if not self._heap:
                    self._wake.wait(1.0)
                    continue
                when, key = self._heap[0]
                if when > now:
                    self._wake.wait(min(1.0, when - now))
                    continue
                heapq.heappop(self._heap)
                del self._due[key]
                if key in self._running:
                    when = now + self.RUNNING_RETRY_SECONDS
                    self._due[key] = when
                    heapq.heappush(self._heap, (when, key))
                    continue
                self._running.add(key)
            self._pool.submit(self._run_one, key)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run_one(self, key: Key) -> None:
        try:
            self._reconcile(*key)
        except Exception:  # the reconcile logs its own errors; this keeps the worker alive
            log.exception("%s/%s: queued reconcile failed", *key)
        finally:
            with self._wake:
                self._running.discard(key)
