"""The Kubernetes API as the dashboard calls it: always on behalf of someone.

Every read and action for a browser is made *as that user*: with their own bearer token, or,
behind an authenticating proxy, with the dashboard's credentials impersonating the user and
groups the proxy vouched for. The API server's RBAC then decides, and its 403 is the user's 403.
Only the shared watch that feeds the live list runs with the dashboard's own rights; what it
delivers is filtered per user by what they may list.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes

Manifest = dict[str, Any]
GROUP, VERSION, PLURAL = "finetune.gemma.dev", "v1alpha1", "gemmafinetunes"
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


@dataclass(frozen=True)
class Identity:
    """Who a request is for. ``token``: the user's own bearer token. ``user``/``groups``: a
    name an authenticating proxy vouched for (impersonated). Neither: the dashboard's own
    credentials (a laptop run with the user's kubeconfig, listening on loopback only)."""

    token: str | None = None
    user: str | None = None
    groups: tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        """A cache key that never holds the token itself."""
        import hashlib

        if self.token:
            return "t:" + hashlib.sha256(self.token.encode()).hexdigest()[:16]
        return f"u:{self.user}:{','.join(self.groups)}" if self.user else "self"


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str, body: Manifest | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}


@dataclass
class ApiServer:
    host: str
    ssl_context: ssl.SSLContext  # the dashboard's own: may carry its client certificate
    user_ssl_context: ssl.SSLContext  # for users' tokens: the CA only, never our certificate
    own_headers: dict[str, str]
    session: aiohttp.ClientSession | None = None
    user_session: aiohttp.ClientSession | None = None
    # In a pod: the service account token's file, read per request (the kubelet rotates it).
    token_file: str | None = None

    @classmethod
    def from_config(cls, kubeconfig: str | None = None) -> ApiServer:
        """In cluster with a service account, else the kubeconfig (as the operator does)."""
        cfg = kubernetes.client.Configuration()
        in_cluster = False
        try:
            if kubeconfig:
                raise kubernetes.config.ConfigException("a kubeconfig was given")
            kubernetes.config.load_incluster_config(client_configuration=cfg)
            in_cluster = True
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)

        def trusting() -> ssl.SSLContext:
            if cfg.ssl_ca_cert:
                return ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            return ssl.create_default_context()

        context, user_context = trusting(), trusting()
        if cfg.cert_file and cfg.key_file:
            # Only on our own connections: the API server authenticates a client certificate
            # before a bearer token, so a user's request sent with it would run as us.
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
        headers = {}
        token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        if token:
            headers["Authorization"] = f"Bearer {_bare(token)}"
        token_file = SERVICE_ACCOUNT_TOKEN if in_cluster else None
        return cls(
            host=cfg.host.rstrip("/"),
            ssl_context=context,
            user_ssl_context=user_context,
            own_headers=headers,
            token_file=token_file,
        )

    async def start(self) -> None:
        def session(context: ssl.SSLContext) -> aiohttp.ClientSession:
            return aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=64),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )

        self.session = session(self.ssl_context)
        self.user_session = session(self.user_ssl_context)

    async def close(self) -> None:
        for session in (self.session, self.user_session):
            if session is not None:
                await session.close()

    def _session(self, who: Identity | None) -> aiohttp.ClientSession:
        """A user's own token goes over connections without our client certificate."""
        session = self.user_session if who is not None and who.token else self.session
        assert session is not None, "ApiServer.start() first"
        return session

    def headers(self, who: Identity | None) -> dict[str, str]:
        """The dashboard's own credentials (``who`` None: its own watch), the user's token, or
        the dashboard's credentials impersonating the user."""
        if who is not None and who.token:
            return {"Authorization": f"Bearer {who.token}"}
        headers = dict(self.own_headers)
        if self.token_file:
            headers["Authorization"] = f"Bearer {_bare(Path(self.token_file).read_text())}"
        if who is None or who.user is None:
            return headers
        headers["Impersonate-User"] = who.user or ""
        return headers

    def _impersonated_groups(self, who: Identity | None) -> list[tuple[str, str]]:
        if who is None or who.token or not who.user:
            return []
        return [("Impersonate-Group", g) for g in who.groups]

    async def request(
        self,
        method: str,
        path: str,
        who: Identity | None,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Manifest:
        headers = list(self.headers(who).items()) + self._impersonated_groups(who)
        data = None
        if body is not None:
            data = body if isinstance(body, bytes | str) else json.dumps(body)
            headers.append(("Content-Type", content_type))
        async with self._session(who).request(
            method,
            self.host + path,
            headers=_multi(headers),
            params=params,
            data=data,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            raw = await r.read()
            return _answer(r.status, raw)

    async def stream(
        self,
        path: str,
        who: Identity | None,
        params: dict[str, str] | None = None,
    ) -> AsyncIterator[bytes]:
        """The body of a long request (a watch, a followed log) chunk by chunk."""
        headers = list(self.headers(who).items()) + self._impersonated_groups(who)
        session = self._session(who)
        async with session.get(self.host + path, headers=_multi(headers), params=params) as r:
            if r.status >= 400:
                _answer(r.status, await r.read())
            async for chunk in r.content.iter_any():
                yield chunk

    # -- the requests the dashboard makes ---------------------------------------------------

    @staticmethod
    def finetunes_path(namespace: str | None = None, name: str | None = None) -> str:
        base = f"/apis/{GROUP}/{VERSION}"
        path = f"{base}/namespaces/{namespace}/{PLURAL}" if namespace else f"{base}/{PLURAL}"
        return f"{path}/{name}" if name else path

    async def may(
        self,
        who: Identity | None,
        verb: str,
        namespace: str | None,
        resource: str = PLURAL,
        group: str = GROUP,
        name: str | None = None,
        subresource: str | None = None,
    ) -> bool:
        """A SelfSubjectAccessReview made as the user: what the API server would let them do."""
        attributes: Manifest = {"verb": verb, "group": group, "resource": resource}
        if namespace:
            attributes["namespace"] = namespace
        if name:
            attributes["name"] = name
        if subresource:
            attributes["subresource"] = subresource
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        }
        got = await self.request(
            "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", who, body=review
        )
        return bool(got.get("status", {}).get("allowed"))

    async def whoami(self, who: Identity | None) -> str:
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        got = await self.request(
            "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", who, body=review
        )
        return got.get("status", {}).get("userInfo", {}).get("username", "?")


def _bare(token: str) -> str:
    """The token without a scheme (the in-cluster loader stores "bearer <token>")."""
    token = token.strip()
    return token.split(" ", 1)[1].strip() if token.lower().startswith("bearer ") else token


def _multi(headers: list[tuple[str, str]]):
    from multidict import CIMultiDict

    return CIMultiDict(headers)


def _answer(status: int, raw: bytes) -> Manifest:
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {"message": raw[:500].decode(errors="replace")}
    if status >= 400:
        message = body.get("message") if isinstance(body, dict) else None
        raise ApiError(status, message or f"HTTP {status}", body if isinstance(body, dict) else {})
    return body if isinstance(body, dict) else {"items": body}
