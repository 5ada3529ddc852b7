"""A small JSON-in, JSON-out client for the Kubernetes API, on top of the kubernetes package's
configuration and connection pool (in-cluster service account or a kubeconfig).

Objects stay plain dicts end to end: the children builders produce dicts and the status logic
reads dicts, so nothing converts to and from the generated model classes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import kubernetes
import urllib3
from gft_api import GROUP, PLURAL, VERSION

Manifest = dict[str, Any]

log = logging.getLogger("gft_operator.kube")

# Statuses that say "not now" rather than "no": the API server is overloaded (429, with
# Retry-After), restarting, or a proxy in front of it has no backend (502, 503, 504).
RETRY_STATUSES = frozenset({429, 502, 503, 504})
RETRIES = 3
MAX_RETRY_AFTER = 10.0
FIELD_MANAGER = "gft-operator"
"""The one field manager of everything this operator writes (server-side apply, creates)."""


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.reason = reason
        """The Status object's CamelCase reason (``Invalid``, ``Forbidden``), when it has one."""


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    """409: AlreadyExists on create, or a conflict on update."""


class NamespaceTerminating(ApiError):
    """403 on create: the namespace is being deleted (its objects go with it)."""


class Invalid(ApiError):
    """422: the object (or a JSON patch's test) was refused."""


class ApiUnavailable(ApiError):
    """The API server could not be reached or kept saying "not now" (429, 502, 503, 504)
    through every retry. Nothing was lost: try again later."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(status, message)
        self.retry_after = retry_after


class NotLeader(RuntimeError):
    """A write refused because this replica does not hold the leader Lease (any more), or is
    shutting down."""


def error_message(status: int, raw: bytes, reason: str = "") -> str:
    """What an error answer says: a Status object's message, or the start of whatever else
    came back (an HTML page from a proxy), as one line."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    text = re.sub(r"<[^>]+>", " ", raw.decode("utf-8", errors="replace"))
    text = " ".join(text.split())[:200]
    head = f"HTTP {status}" + (f" {reason}" if reason else "")
    return f"{head}: {text}" if text else head


def retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After header (the delta-seconds form the API server sends)."""
    value = (headers or {}).get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def load_config(kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    """In cluster when there is a service account, otherwise the kubeconfig."""
    try:
        if kubeconfig:
            raise kubernetes.config.ConfigException("a kubeconfig was given")
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=kubeconfig)
    configuration = kubernetes.client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = 16
    configuration.retries = 0  # Kube.request retries, knowing which requests may be repeated
    return kubernetes.client.ApiClient(configuration)


_PATHS = {
    # kind: (api prefix, plural)
    "Pod": ("/api/v1", "pods"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Event": ("/api/v1", "events"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Ingress": ("/apis/networking.k8s.io/v1", "ingresses"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "Workload": ("/apis/kueue.x-k8s.io/v1beta2", "workloads"),
}


class Kube:
    """GET, LIST, CREATE, PATCH and DELETE of namespaced objects, as dicts."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.api = api_client
        self.may_write: Callable[[], bool] | None = None
        """When set, writes are refused (``NotLeader``) while it returns false; the Lease
        itself is written with ``lease=True``."""
        self._in_flight = 0
        self._closed = False
        self._writes = threading.Condition()

    def drain(self, timeout: float = 30.0) -> bool:
        """Refuse every write from now on and wait until the writes already sent have been
        answered (before the Lease is given up: no write of this replica may land after a
        successor started). Returns whether they all ended within ``timeout``."""
        with self._writes:
            self._closed = True
            return self._writes.wait_for(lambda: self._in_flight == 0, timeout)

    def _may_send(self, method: str, path: str, lease: bool) -> None:
        """Checked before every attempt of a write, retries included: a retry may come
        seconds later, from a replica that has lost the Lease meanwhile."""
        if method == "GET" or lease:
            return
        if self._closed or (self.may_write is not None and not self.may_write()):
            raise NotLeader(f"{method} {path}: this replica is not the leader")

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        lease: bool = False,
    ) -> Manifest:
        """One API call, retried (with back-off, honouring Retry-After) while the API server
        is unreachable or says "not now". Every write this operator makes is safe to repeat:
        children have fixed names (a repeated create is a 409), status patches carry the
        resourceVersion they were computed from, deletes carry a uid precondition."""
        delay = 0.5
        for attempt in range(RETRIES + 1):
            last = attempt == RETRIES
            try:
                status, raw, headers, reason = self._send(
                    method, path, query, body, content_type, lease
                )
            except urllib3.exceptions.HTTPError as e:
                # A timeout already waited long; a refused or broken connection is retried.
                if last or _timed_out(e):
                    raise ApiUnavailable(0, _cause(e)) from e
                time.sleep(delay)
                delay *= 2
                continue
            if status in RETRY_STATUSES:
                wait = retry_after(headers)
                message = error_message(status, raw, reason)
                if last:
                    raise ApiUnavailable(status, message, wait)
                time.sleep(min(wait if wait is not None else delay, MAX_RETRY_AFTER))
                delay *= 2
                continue
            return _answer(status, raw, reason)
        raise AssertionError("unreachable")

    def _send(
        self, method: str, path: str, query: Any, body: Any, content_type: str, lease: bool
    ) -> tuple[int, bytes, Any, str]:
        """One attempt; a write counts as in flight from the check to the answer."""
        if method == "GET" or lease:
            return self._call(method, path, query, body, content_type)
        with self._writes:
            self._may_send(method, path, lease)
            self._in_flight += 1
        try:
            return self._call(method, path, query, body, content_type)
        finally:
            with self._writes:
                self._in_flight -= 1
                self._writes.notify_all()

    def _call(
        self, method: str, path: str, query: Any, body: Any, content_type: str
    ) -> tuple[int, bytes, Any, str]:
        method, url, headers, body, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(
            method, url, header_params=headers, body=body, _request_timeout=30
        )
        raw = response.read() or b""
        return response.status, raw, response.getheaders(), response.reason or ""

    def get_text(self, path: str, *, timeout: float, limit: int) -> str:
        """GET a plain-text answer (a pod's /metrics through the API server's proxy): one try
        (no retries, which would multiply the timeout), at most ``limit`` bytes."""
        _, url, headers, _, _ = self.api.param_serialize(
            method="GET",
            resource_path=path,
            header_params={"Accept": "text/plain"},
            auth_settings=["BearerToken"],
        )
        response = self.api.rest_client.pool_manager.request(
            "GET",
            url,
            headers=headers,
            timeout=urllib3.Timeout(total=timeout),
            retries=False,
            preload_content=False,
        )
        try:
            body = response.read(limit + 1)
        finally:
            response.release_conn()
        text = body.decode("utf-8", errors="replace")
        if response.status >= 400:
            raise ApiError(response.status, text.strip()[:300])
        if len(body) > limit:
            raise ApiError(413, f"the answer is larger than {limit} bytes")
        return text

    @staticmethod
    def path(kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        prefix, plural = _PATHS[kind]
        path = f"{prefix}/namespaces/{quote(namespace)}/{plural}"
        if name:
            path += f"/{quote(name)}"
        if sub:
            path += f"/{sub}"
        return path

    def get(self, kind: str, namespace: str, name: str) -> Manifest | None:
        try:
            return self.request("GET", self.path(kind, namespace, name))
        except NotFound:
            return None

    def list(self, kind: str, namespace: str, **query: str) -> list[Manifest]:
        return self.request("GET", self.path(kind, namespace), query=query).get("items") or []

    def create(self, obj: Manifest) -> Manifest:
        meta = obj["metadata"]
        return self.request(
            "POST",
            self.path(obj["kind"], meta["namespace"]),
            query={"fieldManager": FIELD_MANAGER},
            body=obj,
        )

    def apply(self, obj: Manifest) -> Manifest:
        """Server-side apply: the fields in ``obj`` become this operator's (taken over from
        any other manager: they are the ones it sets), the fields it set before and left out
        now are removed, and every field it never set (a default an admission plugin filled
        in, another controller's annotation) stays as it is."""
        meta = obj["metadata"]
        return self.request(
            "PATCH",
            self.path(obj["kind"], meta["namespace"], meta["name"]),
            query={"fieldManager": FIELD_MANAGER, "force": "true"},
            body=obj,
            content_type="application/apply-patch+yaml",
        )

    def merge_patch(self, kind: str, namespace: str, name: str, patch: Manifest) -> Manifest:
        return self.request(
            "PATCH",
            self.path(kind, namespace, name),
            body=patch,
            content_type="application/merge-patch+json",
        )

    def replace(self, obj: Manifest) -> Manifest:
        meta = obj["metadata"]
        return self.request(
            "PUT", self.path(obj["kind"], meta["namespace"], meta["name"]), body=obj
        )

    def strategic_patch(self, kind: str, namespace: str, name: str, patch: Manifest) -> Manifest:
        return self.request(
            "PATCH",
            self.path(kind, namespace, name),
            body=patch,
            content_type="application/strategic-merge-patch+json",
        )

    def remove_finalizer(self, obj: Manifest, finalizer: str) -> Manifest | None:
        """Take one finalizer off a built-in object, leaving the others (the Job controller
        keeps its own on pods) whatever happens meanwhile; returns the object as stored, or
        ``None`` when there was nothing to take off or it is gone already."""
        meta = obj["metadata"]
        if finalizer not in (meta.get("finalizers") or []):
            return None
        patch = {"metadata": {"$deleteFromPrimitiveList/finalizers": [finalizer]}}
        try:
            return self.strategic_patch(obj["kind"], meta["namespace"], meta["name"], patch)
        except NotFound:
            return None

    def delete(
        self,
        kind: str,
        namespace: str,
        name: str,
        uid: str | None = None,
        propagation: str = "Background",
    ) -> None:
        body: Manifest = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": propagation,
        }
        if uid:
            body["preconditions"] = {"uid": uid}
        with contextlib.suppress(NotFound):
            self.request("DELETE", self.path(kind, namespace, name), body=body)

    # The GemmaFineTune itself.
    def custom_path(self, namespace: str | None, name: str | None = None, sub: str | None = None):
        path = f"/apis/{GROUP}/{VERSION}"
        if namespace:
            path += f"/namespaces/{quote(namespace)}"
        path += f"/{PLURAL}"
        if name:
            path += f"/{quote(name)}"
        if sub:
            path += f"/{sub}"
        return path


def _answer(status: int, raw: bytes, reason: str) -> Manifest:
    """The decoded answer, or the error it is."""
    if status < 400:
        try:
            data = json.loads(raw or b"{}")
        except ValueError as e:
            raise ApiError(status, f"the API server's answer is not JSON: {raw[:200]!r}") from e
        return data if isinstance(data, dict) else {}
    message = error_message(status, raw, reason)
    why = _status_reason(raw)
    if status == 404:
        raise NotFound(404, message, why)
    if status == 409:
        raise Conflict(409, message, why)
    if status == 422:
        raise Invalid(422, message, why)
    if status == 403 and _has_cause(raw, "NamespaceTerminating"):
        raise NamespaceTerminating(403, message, why)
    raise ApiError(status, message, why)


def _status_reason(raw: bytes) -> str:
    try:
        data = json.loads(raw)
    except ValueError:
        return ""
    reason = data.get("reason") if isinstance(data, dict) else None
    return reason if isinstance(reason, str) else ""


def _has_cause(raw: bytes, reason: str) -> bool:
    try:
        data = json.loads(raw)
    except ValueError:
        return False
    causes = ((data or {}).get("details") or {}).get("causes") or []
    return any(c.get("reason") == reason for c in causes)


def _timed_out(e: BaseException) -> bool:
    reason = getattr(e, "reason", None) or e
    # urllib3 files a refused connection (NewConnectionError) under ConnectTimeoutError.
    return isinstance(reason, urllib3.exceptions.TimeoutError) and not isinstance(
        reason, urllib3.exceptions.NewConnectionError
    )


def _cause(e: BaseException) -> str:
    """What went wrong with the connection, in a few words."""
    reason = getattr(e, "reason", None) or e
    if _timed_out(e):
        return "no answer within 30s"
    text = str(reason)
    found = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    return f"cannot connect: {found.group(0)}" if found else f"cannot connect: {text[:200]}"
