"""A small JSON-in, JSON-out client for the Kubernetes API, on top of the kubernetes package's
configuration and connection pool (in-cluster service account or a kubeconfig).

Objects stay plain dicts end to end: the children builders produce dicts and the status logic
reads dicts, so nothing converts to and from the generated model classes.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any
from urllib.parse import quote

import kubernetes
import urllib3
from gft_api import GROUP, PLURAL, VERSION

Manifest = dict[str, Any]


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    """409: AlreadyExists on create, or a conflict on update."""


class NamespaceTerminating(ApiError):
    """403 on create: the namespace is being deleted (its objects go with it)."""


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
}


class Kube:
    """GET, LIST, CREATE, PATCH and DELETE of namespaced objects, as dicts."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.api = api_client

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Manifest:
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
        raw = response.read() or b"{}"
        data = json.loads(raw)
        if response.status == 404:
            raise NotFound(404, data.get("message", "not found"))
        if response.status == 409:
            raise Conflict(409, data.get("message", "conflict"))
        causes = (data.get("details") or {}).get("causes") or []
        if response.status == 403 and any(
            c.get("reason") == "NamespaceTerminating" for c in causes
        ):
            raise NamespaceTerminating(403, data.get("message", "namespace is being terminated"))
        if response.status >= 400:
            raise ApiError(response.status, data.get("message", raw[:500].decode(errors="replace")))
        return data

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
        return self.request("POST", self.path(obj["kind"], meta["namespace"]), body=obj)

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

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> None:
        body: Manifest = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
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
