"""The live status: which trainer to read (``track``), and the scraper's sink that writes a
reading (or why there is none) into the status when it says something new.

The status a reading is merged into is the fine-tune as the cache has it (the watch's version,
or this operator's own last write when the watch has not echoed it yet); the write carries
that resourceVersion, so when something else wrote meanwhile it is refused and decided again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from gft_api import KIND
from gft_api.v1alpha1 import Phase

from gft_operator import children, monitoring, status, trainer_metrics
from gft_operator.apply import Gone, StatusConflict, Writer
from gft_operator.cache import CACHE
from gft_operator.kube import Manifest, NotLeader
from gft_operator.runtime import RUNTIME
from gft_operator.scraper import Problem, Scraper, Target

log = logging.getLogger("gft_operator")

CATCH_UP_SECONDS = 2.0


class Live:
    """The trainers being read, and which of their pods have served their metrics."""

    def __init__(self) -> None:
        self.scraper: Scraper | None = None
        self.writer: Writer | None = None
        self.lock: Callable[[str, str], threading.Lock] | None = None
        self.leading: Callable[[], bool] = lambda: True
        self.startup_grace = 600.0
        """Seconds a trainer may take to open its metrics endpoint before that is a problem."""
        self._served: set[tuple[str, str, str]] = set()  # (namespace, name, pod)
        self._guard = threading.Lock()

    def track(
        self, namespace: str, name: str, new_status: Manifest, pods: list[Manifest], generation: int
    ) -> None:
        """Read the metrics of a running trainer; stop reading one that is not running."""
        if self.scraper is None:
            return
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        # Pod 0 speaks for a multi-node run, even when a replaced peer is newer.
        pod = status.newest_pod(status.leaders(live))
        started = status.trainer_started_at(pod) if pod is not None else None
        pod_ip = (pod or {}).get("status", {}).get("podIP")
        if new_status.get("phase") != Phase.RUNNING.value or started is None or not pod_ip:
            self.forget(namespace, name)
            return
        assert pod is not None
        peers = tuple(
            (p["metadata"]["name"], p["status"]["podIP"])
            for p in status.peers(live)
            if p.get("status", {}).get("phase") == "Running" and p["status"].get("podIP")
        )
        self.scraper.track(
            Target(
                namespace=namespace,
                name=name,
                pod=pod["metadata"]["name"],
                pod_ip=pod_ip,
                port=children.METRICS_PORT,
                generation=generation,
                started_at=started,
                peers=peers,
            )
        )

    def forget(self, namespace: str, name: str) -> None:
        """No more reads of this fine-tune's trainer (not running, finished or gone)."""
        if self.scraper is not None:
            self.scraper.forget(namespace, name)
        with self._guard:
            self._served = {s for s in self._served if s[:2] != (namespace, name)}

    def forget_all(self) -> None:
        """This replica stopped leading: the next leader reads the trainers."""
        with self._guard:
            keys = {s[:2] for s in self._served}
            self._served.clear()
        if self.scraper is not None:
            for key in keys:
                self.scraper.forget(*key)

    def write(
        self, target: Target, reading: trainer_metrics.Reading | None, problem: Problem | None
    ) -> bool:
        """The scraper's sink: returns whether it wrote."""
        if self.writer is None or self.lock is None or not self.leading():
            return False
        namespace, name = target.key
        with self.lock(namespace, name):
            for _ in range(3):
                try:
                    return self._write(target, reading, problem)
                except StatusConflict as e:
                    monitoring.STATUS_CONFLICTS.inc()
                    if CACHE.wait_for(KIND, namespace, name, e.seen, CATCH_UP_SECONDS) is None:
                        return False  # gone, or the watch is behind: the next reading tries
                except NotLeader:
                    return False
                except Gone:
                    if RUNTIME.requeue is not None:  # deleted: that reconcile forgets it
                        RUNTIME.requeue.after((namespace, name), 0)
                    return False
        return False

    def _write(
        self, target: Target, reading: trainer_metrics.Reading | None, problem: Problem | None
    ) -> bool:
        assert self.writer is not None
        namespace, name = target.key
        body = CACHE.finetune(namespace, name)
        current = (body or {}).get("status") or {}
        if body is None or current.get("phase") != Phase.RUNNING.value:
            return False  # not (or no longer) running: the reconcile owns the status now
        if current.get("podName") not in (None, target.pod):
            return False  # a reading of a pod that is no longer the current one
        patch: Manifest = {}
        at = status.timestamp(time.time())
        served = (namespace, name, target.pod)
        if reading is not None:
            with self._guard:
                self._served.add(served)
            live = trainer_metrics.live_status(reading)
            if trainer_metrics.changed(current, live):
                live["progress"]["updatedAt"] = at
                patch.update(live)
        with self._guard:
            served_before = served in self._served
        state = trainer_metrics.read_state(
            (problem.reason, problem.message) if problem else None,
            served_before=served_before,
            seconds_running=time.time() - target.started_at,
            grace=self.startup_grace,
        )
        conditions = trainer_metrics.metrics_condition(
            current.get("conditions") or [], state, target.generation, at
        )
        if conditions is not None:
            patch["conditions"] = conditions
        if not patch:
            return False
        self.writer.status(body, patch, "metrics")
        if conditions is not None:
            level = logging.WARNING if state[0] == "False" else logging.INFO
            log.log(level, "%s/%s: metrics %s: %s", namespace, name, state[1], state[2])
        if reading is not None and reading.logged_at and "progress" in patch:
            monitoring.STATUS_LAG.observe(max(0.0, time.time() - reading.logged_at))
        return True


LIVE = Live()
