"""One writer at a time: leader election over a coordination.k8s.io Lease, the way client-go's
leaderelection does it.

Every replica tries to hold the Lease ``--leader-election-id`` in its own namespace. The holder
renews it every ``retry`` seconds. A standby judges expiry by its own clock only: it notes when
it last saw the Lease's record change (client-go's ``observedTime``), and may take the Lease
once the record has stayed the same for ``duration`` seconds, whatever times the holder wrote
into it (their clocks may disagree by any amount). The take is an update carrying the
resourceVersion it read, so two replicas cannot both take it. The holder that cannot renew
within ``renew_deadline`` stops being the leader at once (``is_leader`` turns false well before
a standby could take over); on SIGTERM it stops writing, waits for its writes in flight, then
gives the Lease up so that a standby takes over without waiting out ``duration``.

Everything that writes checks ``is_leader`` before every attempt (the Kube client refuses
writes while it is false, retries included).
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


def record(lease: Manifest) -> tuple:
    """What a standby watches for change: a holder that renews changes it every time."""
    spec = lease.get("spec") or {}
    return (
        spec.get("holderIdentity") or "",
        spec.get("renewTime"),
        spec.get("acquireTime"),
        spec.get("leaseTransitions"),
        spec.get("leaseDurationSeconds"),
    )


def may_take(lease: LeaseView, me: str, observed_at: float, now: float) -> bool:
    """Whether ``me`` may hold the Lease now: it is ours or free, or its record has not
    changed for ``duration`` seconds since ``observed_at`` (both on this replica's monotonic
    clock: the holder's timestamps are never compared with ours)."""
    if lease.holder in ("", me):
        return True
    return now >= observed_at + lease.duration


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
        on_stopped_leading: Callable[[], None] | None = None,
        before_release: Callable[[], object] | None = None,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.renew_deadline = renew_deadline
        self.retry = retry
        self.on_started_leading = on_started_leading
        self.on_stopped_leading = on_stopped_leading
        self.before_release = before_release
        """Called when giving the Lease up, before it is written: stop and drain the writes."""
        self._leading_until = 0.0  # monotonic time until which a renewal vouches for us
        self._leading = False
        self._observed: tuple | None = None
        self._observed_at = 0.0  # monotonic time the record above was first seen
        self._guard = threading.Lock()
        # Set by release(): a replica shutting down never takes the Lease back (the run loop
        # would otherwise see it free and acquire it again, and the standby wait it out).
        self._released = False
        # Held by each attempt and by a whole release: an attempt cannot read the Lease before
        # the release and write it after, and a second release() (the loop ending, then kopf's
        # cleanup) returns only once the first has written the Lease free.
        self._turn = threading.Lock()

    @property
    def path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.name}"

    def is_leader(self) -> bool:
        with self._guard:
            return self._leading and time.monotonic() < self._leading_until

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set() and not self._released:
            started = time.monotonic()
            with self._turn:
                if self._released:
                    break
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
            if self.on_stopped_leading is not None:
                self.on_stopped_leading()

    def _observe(self, lease: Manifest) -> None:
        seen = record(lease)
        if seen != self._observed:
            self._observed, self._observed_at = seen, time.monotonic()

    def _try_acquire_or_renew(self) -> bool:
        if self._released:
            return False
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
                created = self.kube.request(
                    "POST", self.path.rsplit("/", 1)[0], body=body, lease=True
                )
            except Conflict:
                return False  # another replica created it first
            self._observe(created)
            return True
        self._observe(lease)
        current = view(lease)
        if not may_take(current, self.identity, self._observed_at, time.monotonic()):
            return False
        old = lease.get("spec") or {}
        if current.holder != self.identity:
            spec["acquireTime"] = micro_time(now)
            spec["leaseTransitions"] = int(old.get("leaseTransitions") or 0) + 1
            if current.holder:
                log.info(
                    "taking over the Lease from %s (unchanged for %.0fs)",
                    current.holder,
                    time.monotonic() - self._observed_at,
                )
        lease["spec"] = {**old, **spec}
        try:
            stored = self.kube.request("PUT", self.path, body=lease, lease=True)
        except Conflict:
            return False  # someone else wrote it since we read it
        self._observe(stored)
        return True

    def release(self) -> None:
        """Give the Lease up (on shutdown), so that a standby need not wait for it to expire:
        first stop leading and let the writes in flight end (``before_release``), then write
        the Lease free."""
        with self._turn:
            self._release()

    def _release(self) -> None:
        with self._guard:
            leading, self._leading = self._leading, False
            self._released = True
        if not leading:
            return
        if self.before_release is not None:
            self.before_release()
        if self.on_stopped_leading is not None:
            self.on_stopped_leading()
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
