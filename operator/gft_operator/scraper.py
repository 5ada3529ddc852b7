"""Reads each running trainer's /metrics at a bounded rate and hands the reading on.

One scheduler thread and a pool of readers: a target is read again ``interval`` seconds after
its previous read started (and never sooner than ``interval`` after the status write its last
read caused), at most one read per target is in flight, and every read has a deadline for the
whole request (connecting, the status line, headers and body together: a pod that answers a
byte at a time is cut off there, not read for ever), so a slow or dead trainer holds one reader
for at most ``timeout`` and never delays the others.

Two ways to reach a trainer: its pod IP (the operator runs in the cluster) or the API server's
pod proxy (``/api/v1/namespaces/NS/pods/POD:PORT/proxy/metrics``), which works from a laptop.

A multi-node run is read at pod 0 (rank 0's training metrics and its GPUs) and, in the same
read, at each other pod (their GPUs alone, read side by side); a pod that does not answer, or
answers anything but a trainer's metrics, leaves its GPUs out of that reading and is logged once
until it answers again.

What a trainer's pod answers is foreign text (its image is the fine-tune author's choice):
a redirect is never followed (it could point the operator anywhere it can reach), an answer
that is not HTTP at all is a problem like any other, and none of the answer's words go into a
status message or the log, only the reader's own (the status is shown to everyone who may read
the fine-tune, and in the dashboard's shared list).
"""

from __future__ import annotations

import contextlib
import http
import http.client
import ipaddress
import logging
import socket
import threading
import time
import urllib.error
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from enum import StrEnum
from urllib.parse import quote

import urllib3

from gft_operator import monitoring
from gft_operator.kube import ApiError, ApiUnavailable, Kube
from gft_operator.trainer_metrics import BadMetrics, Reading, parse, parse_gpus

log = logging.getLogger("gft_operator.scraper")

MAX_BYTES = 4 * 1024 * 1024  # a trainer's /metrics is a few kB; more is not a trainer


# What one read may fail with: the pod's refusal or silence (OSError, the API server's), and an
# answer that is not HTTP at all (http.client.HTTPException: a bad status line, bad headers).
READ_FAILURES = (OSError, ApiError, urllib3.exceptions.HTTPError, http.client.HTTPException)


class Access(StrEnum):
    POD_IP = "pod-ip"
    PROXY = "proxy"


@dataclass(frozen=True)
class Target:
    """One running trainer."""

    namespace: str
    name: str
    """The GemmaFineTune."""
    pod: str
    pod_ip: str
    port: int
    generation: int
    started_at: float
    """Unix time the trainer container started (a trainer loading its model serves nothing)."""
    peers: tuple[tuple[str, str], ...] = ()
    """(pod, pod IP) of each other running pod of a multi-node run."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class Problem:
    """Why a read failed: a condition reason, a message, and the failure counter's label."""

    reason: str
    message: str
    kind: str  # unreachable | timeout | invalid


# (target, reading or None, problem or None) -> True when it wrote the status
Sink = Callable[[Target, Reading | None, Problem | None], bool]


class Scraper:
    def __init__(
        self,
        kube: Kube,
        access: Access,
        interval: float,
        timeout: float,
        sink: Sink,
        workers: int = 16,
    ) -> None:
        self.kube = kube
        self.access = access
        self.interval = interval
        self.timeout = timeout
        self.sink = sink
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gft-metrics")
        # Its own pool: a reader waiting on its peers never waits for a reader of the pool.
        self.peer_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gft-peers")
        self._peers_failing: set[tuple[str, str, str]] = set()
        self._targets: dict[tuple[str, str], Target] = {}
        self._due: dict[tuple[str, str], float] = {}
        self._in_flight: set[tuple[str, str]] = set()
        self._guard = threading.Lock()

    # -- targets, set by the reconciles -----------------------------------------------------
    def track(self, target: Target) -> None:
        with self._guard:
            old = self._targets.get(target.key)
            self._targets[target.key] = target
            if old is None or old.pod != target.pod:
                self._due[target.key] = time.monotonic()  # a new pod: read it now

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self._targets.pop((namespace, name), None)
            self._due.pop((namespace, name), None)
            self._peers_failing = {k for k in self._peers_failing if k[:2] != (namespace, name)}

    # -- the loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        tick = min(0.25, self.interval / 4)
        while not stop.wait(tick):
            now = time.monotonic()
            with self._guard:
                due = [
                    t
                    for key, t in self._targets.items()
                    if key not in self._in_flight and self._due.get(key, 0.0) <= now
                ]
                for t in due:
                    self._in_flight.add(t.key)
                    self._due[t.key] = now + self.interval
            for t in due:
                self.pool.submit(self._read_and_hand_on, t)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.peer_pool.shutdown(wait=False, cancel_futures=True)

    def _read_and_hand_on(self, target: Target) -> None:
        try:
            reading, problem = self.read(target)
            wrote = self.sink(target, reading, problem)
            if wrote:
                with self._guard:
                    if target.key in self._due:
                        self._due[target.key] = max(
                            self._due[target.key], time.monotonic() + self.interval
                        )
        except ApiUnavailable as e:
            log.warning(
                "%s/%s: live status not written: the API server is unavailable (%s)",
                *target.key,
                e.message,
            )
        except Exception:
            log.exception("%s/%s: handling the metrics read failed", *target.key)
        finally:
            with self._guard:
                self._in_flight.discard(target.key)

    # -- one read ---------------------------------------------------------------------------
    def where(self, target: Target) -> str:
        if self.access == Access.PROXY:
            return f"pod {target.pod} port {target.port} (through the API server's pod proxy)"
        return f"http://{host_port(target.pod_ip, target.port)}/metrics"

    def read(self, target: Target) -> tuple[Reading | None, Problem | None]:
        monitoring.METRICS_READS.inc()
        where = self.where(target)
        try:
            text = self._fetch(target.namespace, target.pod, target.pod_ip, target.port)
            reading = parse(text)
        except BadMetrics as e:
            problem = Problem(
                "MetricsInvalid", f"the trainer's metrics at {where}: {_own_words(e)}", "invalid"
            )
        except READ_FAILURES as e:
            if _timed_out(e):
                problem = Problem(
                    "MetricsTimeout",
                    f"the trainer's metrics at {where} did not answer within {self.timeout:g} s; "
                    "the trainer may be overloaded or stuck",
                    "timeout",
                )
            else:
                problem = Problem(
                    "MetricsUnreachable",
                    f"the trainer's metrics at {where} cannot be read: {_short(e)}",
                    "unreachable",
                )
        else:
            if target.peers:
                reading = replace(reading, peer_gpus=self._read_peers(target))
            return reading, None
        monitoring.METRICS_READ_FAILURES.labels(problem.kind).inc()
        return None, problem

    def _read_peers(self, target: Target) -> tuple[dict[str, list[float]], ...]:
        """The GPU series of the run's other pods that answer, read side by side. A peer
        that fails in any way is a missing peer: the reading stands without it. Each peer's
        read has the same deadline as pod 0's, so none outlives the reading it belongs to."""
        futures = [
            (pod, self.peer_pool.submit(self._fetch, target.namespace, pod, ip, target.port))
            for pod, ip in target.peers
        ]
        answered = []
        for pod, future in futures:
            key = (target.namespace, target.name, pod)
            try:
                answered.append(parse_gpus(future.result(timeout=self.timeout + 1)))
            except (BadMetrics, TimeoutError, *READ_FAILURES) as e:
                monitoring.METRICS_READ_FAILURES.labels(_failure_kind(e)).inc()
                with self._guard:
                    first = key not in self._peers_failing
                    self._peers_failing.add(key)
                if first:
                    log.warning(
                        "%s/%s: the GPU metrics of pod %s cannot be read (%s); its GPUs are "
                        "left out of the run's averages until it answers",
                        *target.key,
                        pod,
                        _short(e),
                    )
                continue
            with self._guard:
                again = key in self._peers_failing
                self._peers_failing.discard(key)
            if again:
                log.info("%s/%s: pod %s's GPU metrics answer again", *target.key, pod)
        return tuple(answered)

    def _fetch(self, namespace: str, pod: str, pod_ip: str, port: int) -> str:
        if self.access == Access.PROXY:
            path = f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}:{port}/proxy/metrics"
            return self.kube.get_text(path, timeout=self.timeout, limit=MAX_BYTES)
        body = _get(pod_ip, port, "/metrics", self.timeout)
        if len(body) > MAX_BYTES:
            raise BadMetrics(f"the answer is larger than {MAX_BYTES} bytes")
        return _decode(body)


def host_port(ip: str, port: int) -> str:
    """``ip:port`` for a URL: an IPv6 address in brackets."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _get(ip: str, port: int, path: str, timeout: float) -> bytes:
    """The body of ``GET path`` at the pod, at most ``MAX_BYTES + 1`` bytes, within ``timeout``
    seconds in all. A socket timeout bounds each read, not the request: a watchdog shuts the
    socket down at the deadline, which ends whatever read is waiting (TimeoutError then). No
    redirect is followed, no proxy from the environment is used: it is one plain request."""
    try:
        ipaddress.ip_address(ip)  # a pod IP, never a name to resolve
    except ValueError:
        raise OSError(f"{ip[:60]!r} is not an IP address") from None
    deadline = time.monotonic() + timeout
    connection = http.client.HTTPConnection(ip, port, timeout=timeout)
    expired = threading.Event()

    def cut_off() -> None:
        expired.set()
        sock = connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(timeout, cut_off)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request("GET", path, headers={"Accept": "text/plain"})
        if expired.is_set():  # connecting took it all (the watchdog found no socket to cut)
            raise TimeoutError(f"no whole answer within {timeout:g} s")
        response = connection.getresponse()
        if response.status != 200:
            raise urllib.error.HTTPError(
                f"http://{host_port(ip, port)}{path}", response.status, "", response.msg, None
            )
        parts, size = [], 0
        while size <= MAX_BYTES and not expired.is_set():
            chunk = response.read1(min(1 << 16, MAX_BYTES + 1 - size))
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        if expired.is_set() or time.monotonic() > deadline:
            raise TimeoutError(f"no whole answer within {timeout:g} s")
        return b"".join(parts)
    except (OSError, http.client.HTTPException):
        if expired.is_set() or time.monotonic() > deadline:
            raise TimeoutError(f"no whole answer within {timeout:g} s") from None
        raise
    finally:
        watchdog.cancel()
        connection.close()


def _decode(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadMetrics(f"the answer is not UTF-8 text ({e})") from None


def _failure_kind(e: BaseException) -> str:
    if isinstance(e, BadMetrics):
        return "invalid"
    return "timeout" if _timed_out(e) else "unreachable"


def _timed_out(e: BaseException) -> bool:
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, TimeoutError):
        return True
    return isinstance(e, TimeoutError | urllib3.exceptions.TimeoutError)


def _short(e: BaseException) -> str:
    """Why a read failed, in the reader's own words: a status code and its standard phrase,
    never the reason phrase or body the pod sent."""
    if isinstance(e, urllib.error.HTTPError | ApiError):
        code = e.code if isinstance(e, urllib.error.HTTPError) else e.status
        phrase = _phrase(code)
        if 300 <= code < 400:
            return f"it answered with a redirect (HTTP {code}{phrase}), which is not followed"
        through = " through the API server's pod proxy" if isinstance(e, ApiError) else ""
        return f"HTTP {code}{phrase}{through}"
    if isinstance(e, http.client.HTTPException):
        return "its answer is not HTTP (the answer itself is not copied here)"
    if isinstance(e, urllib.error.URLError) and e.reason:
        return str(e.reason)[:300]
    return str(e)[:300]


def _phrase(code: int) -> str:
    try:
        return f" {http.HTTPStatus(code).phrase}"
    except ValueError:
        return ""


def _own_words(e: BadMetrics) -> str:
    """Why the answer is not a trainer's metrics, without quoting the answer."""
    text = str(e)
    if text.startswith("not the Prometheus text format") or "it starts with" in text:
        return "not the Prometheus text format (the answer itself is not copied here)"
    return text
