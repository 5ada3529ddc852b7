"""One writer at a time: leader election over a coordination.k8s.io Lease, the way client-go's
leaderelection does it.

Every replica tries to hold the Lease ``--leader-election-id`` in its own namespace. The holder
renews it every ``retry`` seconds; a Lease not renewed for ``duration`` seconds may be taken by
another replica (an update carrying the resourceVersion it read, so two replicas cannot both
take it). The holder that cannot renew within ``renew_deadline`` stops being the leader at once
(``is_leader`` turns false before the Lease could pass to anyone else), and on SIGTERM it gives
the Lease up so that a standby takes over without waiting out ``duration``.

Everything that writes (reconciles, the resync, the live status of the trainers' metrics) checks
``is_leader``; the Kube client refuses writes while it is false.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gft_operator.kube import ApiError, Conflict, Kube, Manifest, NotFound

log = logging.getLogger("gft_operator.leader")

_MICRO = "%Y-%m-%dT%H:%M:%S.%fZ"


def micro_time(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime(_MICRO)


def parse_micro_time(text: str | None) -> float | None:
    if not text:
        return None
    for fmt in (_MICRO, "%Y-%m-%dT%H:%M:%SZ"):
        try:
            parsed = datetime.datetime.strptime(text, fmt)
        except ValueError:
            continue
        return parsed.replace(tzinfo=datetime.UTC).timestamp()
    return None


@dataclass(frozen=True)
class LeaseView:
    holder: str
    renewed: float | None
    duration: float


def view(lease: Manifest) -> LeaseView:
    spec = lease.get("spec") or {}
    return LeaseView(
        holder=spec.get("holderIdentity") or "",
        renewed=parse_micro_time(spec.get("renewTime")),
        duration=float(spec.get("leaseDurationSeconds") or 0),
    )


def may_take(lease: LeaseView, me: str, now: float) -> bool:
    """Whether ``me`` may hold the Lease now: it is ours, free, or expired."""
    if lease.holder in ("", me):
        return True
    return lease.renewed is None or now >= lease.renewed + lease.duration


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry: float = 2.0,
        on_started_leading: Callable[[], None] | None = None,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.renew_deadline = renew_deadline
        self.retry = retry
        self.on_started_leading = on_started_leading
        self._leading_until = 0.0  # monotonic time until which a renewal vouches for us
        self._leading = False
        self._guard = threading.Lock()

    @property
    def path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.name}"

    def is_leader(self) -> bool:
        with self._guard:
            return self._leading and time.monotonic() < self._leading_until

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                held = self._try_acquire_or_renew()
            except ApiError as e:
                held = False
                log.warning("leader election: %s", e)
            except Exception:  # a bug must not freeze the leader in place
                held = False
                log.exception("leader election failed")
            self._after_attempt(held, started)
            stop.wait(self.retry)
        self.release()

    def _after_attempt(self, held: bool, started: float) -> None:
        with self._guard:
            was = self._leading
            if held:
                self._leading = True
                self._leading_until = started + self.renew_deadline
            elif time.monotonic() >= self._leading_until:
                self._leading = False
            now_leading = self._leading
        if now_leading and not was:
            log.info(
                "became the leader (Lease %s/%s, as %s)", self.namespace, self.name, self.identity
            )
            if self.on_started_leading is not None:
                self.on_started_leading()
        elif was and not now_leading:
            log.warning(
                "lost the leadership (Lease %s/%s): writing stops", self.namespace, self.name
            )

    def _try_acquire_or_renew(self) -> bool:
        now = time.time()
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.duration),
            "renewTime": micro_time(now),
        }
        try:
            lease = self.kube.request("GET", self.path, lease=True)
        except NotFound:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": micro_time(now), "leaseTransitions": 0},
            }
            try:
                self.kube.request("POST", self.path.rsplit("/", 1)[0], body=body, lease=True)
            except Conflict:
                return False  # another replica created it first
            return True
        current = view(lease)
        if not may_take(current, self.identity, now):
            return False
        old = lease.get("spec") or {}
        if current.holder != self.identity:
            spec["acquireTime"] = micro_time(now)
            spec["leaseTransitions"] = int(old.get("leaseTransitions") or 0) + 1
            if current.holder:
                log.info(
                    "taking over the Lease from %s (not renewed for %.0fs)",
                    current.holder,
                    now - (current.renewed or 0),
                )
        lease["spec"] = {**old, **spec}
        try:
            self.kube.request("PUT", self.path, body=lease, lease=True)
        except Conflict:
            return False  # someone else wrote it since we read it
        return True

    def release(self) -> None:
        """Give the Lease up (on shutdown), so that a standby need not wait for it to expire."""
        with self._guard:
            leading, self._leading = self._leading, False
        if not leading:
            return
        try:
            lease = self.kube.request("GET", self.path, lease=True)
            if view(lease).holder != self.identity:
                return
            lease["spec"] = {
                **(lease.get("spec") or {}),
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "renewTime": micro_time(time.time()),
            }
            self.kube.request("PUT", self.path, body=lease, lease=True)
            log.info("released the Lease %s/%s", self.namespace, self.name)
        except ApiError as e:
            log.warning("could not release the Lease: %s", e)
