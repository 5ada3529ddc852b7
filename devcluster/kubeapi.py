"""A small JSON client for the API server (plain dicts in and out; streaming watches), built on
the kubeconfig loader of the ``kubernetes`` package and urllib3. Thread-safe."""

from __future__ import annotations

import json
import logging
import random
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

log = logging.getLogger("runner.api")


class ApiError(Exception):
    def __init__(self, status: int, body: str, what: str):
        self.status = status
        self.body = body
        try:
            self.message = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            self.message = body
        super().__init__(f"{what}: HTTP {status}: {self.message}")


class Api:
    def __init__(self, kubeconfig: str):
        cfg = k8s_client.Configuration()
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        self.host = cfg.host.rstrip("/")
        self.headers = {"Accept": "application/json", "User-Agent": "gft-runner/0.1"}
        token = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
        if token:
            prefix = cfg.api_key_prefix.get("authorization", "")
            self.headers["Authorization"] = f"{prefix} {token}".strip()
        kw: dict[str, Any] = {"maxsize": 32, "retries": False}
        if cfg.verify_ssl:
            kw["cert_reqs"] = "CERT_REQUIRED"
            if cfg.ssl_ca_cert:
                kw["ca_certs"] = cfg.ssl_ca_cert
        else:
            kw["cert_reqs"] = "CERT_NONE"
        if cfg.cert_file:
            kw["cert_file"] = cfg.cert_file
            kw["key_file"] = cfg.key_file
        self.pool = urllib3.PoolManager(num_pools=4, **kw)

    def url(self, path: str, query: dict | None = None) -> str:
        q = {k: v for k, v in (query or {}).items() if v is not None}
        return self.host + path + ("?" + urllib.parse.urlencode(q) if q else "")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Any:
        headers = dict(self.headers)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        resp = self.pool.request(
            method,
            self.url(path, query),
            body=data,
            headers=headers,
            timeout=urllib3.Timeout(connect=10, read=timeout),
            preload_content=True,
        )
        text = resp.data.decode("utf-8", "replace")
        if resp.status >= 400:
            raise ApiError(resp.status, text, f"{method} {path}")
        return json.loads(text) if text else None

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict | None = None,
        content_type: str = "application/json",
        attempts: int = 6,
        ok_statuses: tuple[int, ...] = (),
    ) -> Any:
        """``request`` retried with backoff on connection errors, 429 and 5xx. Other API errors
        (and those in ``ok_statuses``) are raised at once."""
        delay = 0.5
        for attempt in range(attempts):
            try:
                return self.request(method, path, body, query, content_type)
            except ApiError as e:
                if e.status in ok_statuses or (e.status != 429 and e.status < 500):
                    raise
                err: Exception = e
            except (urllib3.exceptions.HTTPError, OSError) as e:
                err = e
            if attempt == attempts - 1:
                raise err
            log.warning("%s %s failed (%s); retrying in %.1fs", method, path, err, delay)
            time.sleep(delay + random.random() * 0.2)
            delay = min(delay * 2, 8)
        raise AssertionError("unreachable")

    def get(self, path: str, **query) -> Any:
        return self.call("GET", path, query=query)

    def get_or_none(self, path: str) -> Any:
        try:
            return self.call("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def merge_patch(self, path: str, body: dict) -> Any:
        return self.call("PATCH", path, body, content_type="application/merge-patch+json")

    def watch(self, path: str, **query) -> Iterator[dict]:
        """Events of a watch, until the server closes it. Raises ApiError(410) when the
        resourceVersion is too old."""
        query = {**query, "watch": "true"}
        resp = self.pool.request(
            "GET",
            self.url(path, query),
            headers=self.headers,
            timeout=urllib3.Timeout(connect=10, read=None),
            preload_content=False,
        )
        try:
            if resp.status >= 400:
                raise ApiError(resp.status, resp.data.decode("utf-8", "replace"), f"watch {path}")
            buf = b""
            for chunk in resp.stream(4096, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        obj = event.get("object") or {}
                        raise ApiError(obj.get("code", 500), json.dumps(obj), f"watch {path}")
                    yield event
        finally:
            resp.release_conn()
