"""What every handler of the dashboard shares: who is asking (``Caller``), what the dashboard
holds for everyone (``Dashboard``: the API server, the shared list, sessions, TensorBoard
tickets, per-user stream limits and turns, the GPU reader), and the small helpers of its live
streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gft_dashboard import auth, manifest, tensorboard
from gft_dashboard.apiserver import ApiError, ApiServer, Identity, Manifest
from gft_dashboard.auth import SESSION_COOKIE, Settings
from gft_dashboard.gpus import GpuReader
from gft_dashboard.hub import FineTuneHub, Visibility
from gft_dashboard.limits import InFlight, Rate, StreamLimits, TooManyStreams
from gft_dashboard.sessions import Sessions

SIGN_INS_PER_MINUTE = 60  # per user
PROXY_STREAM_SECONDS = 900  # behind oauth2-proxy, a live stream reconnects through it this often
CLIENT_GONE_SECONDS = 5  # how often a quiet stream looks whether its reader has gone


@dataclass
class Caller:
    """Who a request is for, and (token mode) the session that holds their token."""

    identity: Identity
    session_id: str | None = None
    user: str | None = None  # the name shown, where it is known without asking
    expires: float | None = None  # Unix time the session ends


@dataclass
class Dashboard:
    api: ApiServer
    settings: Settings
    hub: FineTuneHub = field(init=False)
    visibility: Visibility = field(init=False)
    sessions: Sessions = field(default_factory=Sessions)
    tickets: tensorboard.Tickets = field(default_factory=tensorboard.Tickets)
    limits: StreamLimits = field(init=False)
    plain: aiohttp.ClientSession | None = None  # to pods' TensorBoards (GpuReader has its own)
    gpus: GpuReader = field(default_factory=GpuReader)
    manifests: manifest.Reader = field(default_factory=manifest.Reader)
    tensorboard_turns: InFlight = field(init=False)
    sign_ins: Rate = field(default_factory=lambda: Rate(SIGN_INS_PER_MINUTE))

    def __post_init__(self) -> None:
        self.hub = FineTuneHub(self.api)
        # However many streams of one user ask again each recheck, one answer serves them.
        self.visibility = Visibility(self.api, fresh_within=self.settings.recheck_seconds / 2)
        self.limits = StreamLimits(self.settings.streams_per_user)
        self.tensorboard_turns = InFlight(
            tensorboard.PER_USER_REQUESTS, tensorboard.WAITING_REQUESTS,
            tensorboard.TOTAL_REQUESTS, "TensorBoard requests",
        )  # fmt: skip

    # -- who is asking ----------------------------------------------------------------------

    def caller(self, request: web.Request) -> Caller:
        """The caller, per ``--auth``; 401 when the request names no one (nothing about the
        request has been read yet)."""
        mode = self.settings.auth
        if mode == "kubeconfig":
            return Caller(Identity())
        if mode == "proxy":
            try:
                who = auth.proxied_identity(request.headers, self.settings)
            except auth.NotSignedIn as e:
                raise web.HTTPUnauthorized(text=str(e)) from None
            except auth.Refused as e:
                raise web.HTTPForbidden(text=str(e)) from None
            return Caller(who, user=who.user)
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            raise web.HTTPUnauthorized(text="sign in with a Kubernetes bearer token")
        return Caller(session.identity, session.id, session.user, session.expires)

    def session_over(self, caller: Caller) -> bool:
        return caller.session_id is not None and self.sessions.get(caller.session_id) is None

    async def visible(self, who: Identity, fresh: bool = False) -> set[str] | None:
        """Namespaces (of those holding fine-tunes) where the user may list them; None: all."""
        return await self.visibility.namespaces(who, self.hub.namespaces(), fresh=fresh)

    def stream_slot(self, caller: Caller) -> contextlib.ExitStack:
        """One of the caller's live streams (429 past their limit), held until it exits."""
        try:
            return self.limits.hold(caller.identity.owner)
        except TooManyStreams as e:
            raise web.HTTPTooManyRequests(text=str(e)) from None


async def rights(dash: Dashboard, caller: Caller, check, *args):
    """``check(*args)`` as the user, or "expired" when their session or token is over."""
    if dash.session_over(caller) or (caller.expires and caller.expires <= time.time()):
        return "expired"
    try:
        return await check(*args)
    except ApiError as e:
        if e.status == 401:
            if caller.session_id:
                dash.sessions.end(caller.session_id)
                dash.tickets.end_session(caller.session_id)
            return "expired"
        raise


async def client_gone(request: web.Request) -> None:
    """Returns once the client has closed its connection (aiohttp goes on running a handler
    whose client has gone: a stream that writes nothing would never notice, and would hold its
    user's stream slot)."""
    while request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(CLIENT_GONE_SECONDS)


def event(kind: str, data: Any) -> bytes:
    """One server-sent event."""
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def ns_of(obj: Manifest) -> str:
    return obj.get("metadata", {}).get("namespace", "")


def dash_of(request: web.Request) -> Dashboard:
    return request.app["dashboard"]
