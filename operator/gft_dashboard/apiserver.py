"""The Kubernetes API as the dashboard calls it: always on behalf of someone.

Every read and action for a browser is made *as that user*: with their own bearer token, or,
behind an authenticating proxy, with the dashboard's credentials impersonating the user and
groups the proxy vouched for. The API server's RBAC then decides, and its 403 is the user's 403.
Only the shared watch that feeds the live list runs with the dashboard's own rights; what it
delivers is filtered per user by what they may list.

No user can take the connections from the others: each user (however many tokens they sign
in with) has at most ``PER_USER_REQUESTS`` requests in flight (the rest wait their turn), long
streams (watches, followed logs) have connections of their own, every request has a timeout,
and no redirect is followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes
from multidict import CIMultiDict

Manifest = dict[str, Any]
GROUP, VERSION, PLURAL = "finetune.gemma.dev", "v1alpha1", "gemmafinetunes"
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
PER_USER_REQUESTS = 8  # in flight at once per identity; the others queue behind them
REQUEST_TIMEOUT = 30.0
MAX_ANSWER_BYTES = 64 << 20  # a list of many fine-tunes; the API server pages lists anyway


@dataclass(frozen=True)
class Identity:
    """Who a request is for. ``token``: the user's own bearer token. ``user``/``groups``: a
    name an authenticating proxy vouched for (impersonated). Neither: the dashboard's own
    credentials (a laptop run with the user's kubeconfig, listening on loopback only)."""

    token: str | None = None
    user: str | None = None
    groups: tuple[str, ...] = field(default=())
    # The user a token belongs to, as the API server named it at sign-in (never sent: only
    # counted, so that one user's several tokens share one allowance).
    name: str | None = None

    @property
    def key(self) -> str:
        """A cache key that never holds the token itself."""
        if self.token:
            return "t:" + hashlib.sha256(self.token.encode()).hexdigest()[:24]
        return f"u:{self.user}:{','.join(self.groups)}" if self.user else "self"

    @property
    def owner(self) -> str:
        """Whom limits count this identity against: the user, where known; else ``key``."""
        who = self.user or self.name
        return f"u:{who}" if who else self.key


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str, body: Manifest | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}


class AnswerTooLarge(ApiError):
    """The API server's answer is over MAX_ANSWER_BYTES (a smaller page may fit)."""


@dataclass
class ApiServer:
    host: str
    ssl_context: ssl.SSLContext  # the dashboard's own: may carry its client certificate
    user_ssl_context: ssl.SSLContext  # for users' tokens: the CA only, never our certificate
    own_headers: dict[str, str]
    # In a pod: the service account token's file, read per request (the kubelet rotates it).
    token_file: str | None = None
    _sessions: dict[tuple[bool, bool], aiohttp.ClientSession] = field(default_factory=dict)
    _turns: dict[str, tuple[asyncio.Semaphore, int]] = field(default_factory=dict)

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
        """Four pools: our credentials or a user's token, short requests or long streams (a
        stream holds its connection for minutes; it must never wait for, or keep, one that
        a request needs)."""
        for own in (True, False):
            for streaming in (True, False):
                context = self.ssl_context if own else self.user_ssl_context
                self._sessions[own, streaming] = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=context, limit=256 if streaming else 64),
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                )

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

    def _session(self, who: Identity | None, streaming: bool) -> aiohttp.ClientSession:
        """A user's own token goes over connections without our client certificate."""
        own = who is None or not who.token
        assert self._sessions, "ApiServer.start() first"
        return self._sessions[own, streaming]

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

    def _all_headers(self, who: Identity | None) -> CIMultiDict:
        return CIMultiDict(list(self.headers(who).items()) + self._impersonated_groups(who))

    @contextlib.asynccontextmanager
    async def _turn(self, who: Identity | None) -> AsyncIterator[None]:
        """The user's share of the request pool: at most PER_USER_REQUESTS in flight, whatever
        token they use. The table holds only users with a request in flight or waiting."""
        key = who.owner if who is not None else "dashboard"
        turn, users = self._turns.get(key) or (asyncio.Semaphore(PER_USER_REQUESTS), 0)
        self._turns[key] = (turn, users + 1)
        try:
            async with turn:
                yield
        finally:
            turn, users = self._turns[key]
            if users == 1:
                del self._turns[key]
            else:
                self._turns[key] = (turn, users - 1)

    async def request(
        self,
        method: str,
        path: str,
        who: Identity | None,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float = REQUEST_TIMEOUT,
    ) -> Manifest:
        headers = self._all_headers(who)
        data = None
        if body is not None:
            data = body if isinstance(body, bytes | str) else json.dumps(body)
            headers["Content-Type"] = content_type
        async with (
            self._turn(who),
            self._session(who, streaming=False).request(
                method,
                self.host + path,
                headers=headers,
                params=params,
                data=data,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as r,
        ):
            raw = await read_at_most(r.content, MAX_ANSWER_BYTES)
            if len(raw) > MAX_ANSWER_BYTES:
                raise AnswerTooLarge(
                    502, f"the API server's answer is larger than {MAX_ANSWER_BYTES >> 20} MiB"
                )
            return _answer(r.status, raw)

    async def stream(
        self,
        path: str,
        who: Identity | None,
        params: dict[str, str] | None = None,
        idle_timeout: float | None = None,
    ) -> AsyncIterator[bytes]:
        """The body of a long request (a watch, a followed log) chunk by chunk; with
        ``idle_timeout``, a TimeoutError once nothing came for that long."""
        async with self._session(who, streaming=True).get(
            self.host + path,
            headers=self._all_headers(who),
            params=params,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=idle_timeout),
        ) as r:
            if r.status >= 300:
                _answer(r.status, await read_at_most(r.content, 1 << 20))  # raises
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


async def read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, or its first ``limit + 1`` bytes when it is longer (the caller refuses it)."""
    parts, size = [], 0
    while size <= limit:
        chunk = await content.read(min(1 << 20, limit + 1 - size))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _bare(token: str) -> str:
    """The token without a scheme (the in-cluster loader stores "bearer <token>")."""
    token = token.strip()
    return token.split(" ", 1)[1].strip() if token.lower().startswith("bearer ") else token


def _answer(status: int, raw: bytes) -> Manifest:
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {"message": raw[:500].decode(errors="replace")}
    if 300 <= status < 400:
        raise ApiError(502, f"the API server answered with a redirect (HTTP {status})")
    if status >= 400:
        message = body.get("message") if isinstance(body, dict) else None
        raise ApiError(status, message or f"HTTP {status}", body if isinstance(body, dict) else {})
    return body if isinstance(body, dict) else {"items": body}
