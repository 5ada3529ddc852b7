"""TensorBoard of a fine-tune, served so that nothing it sends can act on the dashboard.

TensorBoard comes from the fine-tune's pod, whose image its author chose: its pages are
foreign content. They are served under ``/tb/NS/NAME/TICKET/`` with a Content-Security-Policy
whose ``sandbox`` (without ``allow-same-origin``) gives them an opaque origin, framed by the
run page in a sandboxed iframe as well: their script can read no cookie of the dashboard, and
what it sends to the dashboard carries none, so it acts as nobody. The TICKET in the path is
the credential instead (TensorBoard's own requests are relative, so they carry it): minted for
one user and one fine-tune (and one sign-in: a token-mode session, or oauth2-proxy's cookie)
once the user may read it, re-checked as that user every ``recheck`` seconds, ended with the
session, and alive only ``TICKET_TTL`` after the run page last asked for it (it asks again
while it is open), so a ticket that leaked dies in minutes.

TensorBoard is reached at its pod's IP (pods listed as the user, so a name in their namespace
is the only thing that can point it anywhere); its redirects are answered as errors, never
followed; answers are capped in size and time and streamed through, never held whole (only
the head of an HTML page is held, to put the shim in); each user has at most
``PER_USER_REQUESTS`` requests to TensorBoards in flight; only TensorBoard's own data
endpoints take a POST.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from gft_api.conventions import TENSORBOARD_PORT

from gft_dashboard.apiserver import Identity

MAX_BYTES = 32 << 20  # TensorBoard's index.js is about 6 MiB
MAX_POST_BYTES = 64 << 10
HEAD_WINDOW = 64 << 10  # the shim goes after <head> when it comes this early, else first
TIMEOUT = 30.0  # without a byte from TensorBoard
# An answer streams to the browser at the browser's pace: a slow link must not cut TensorBoard's
# 6 MiB script, but nothing is held open for ever.
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=300, sock_connect=10, sock_read=TIMEOUT)
TICKET_TTL = 10 * 60  # the run page asks again every minute while it is open
PER_USER_REQUESTS = 8  # a browser opens 6 at once; more wait (WAITING_REQUESTS), then 429
WAITING_REQUESTS = 56
TOTAL_REQUESTS = 256  # to every TensorBoard together; also the connection pool
PER_TENSORBOARD_CONNECTIONS = 16
# TensorBoard's data endpoints that take a POST (its Time Series, scalar and hparams tabs).
POSTS = re.compile(
    r"(experiment/[^/]+/)?data/plugin/"
    r"(timeseries/timeSeries|scalars/scalars_multirun|hparams/experiment|hparams/session_groups)"
)
FRAME_CSP = (
    "sandbox allow-scripts; default-src 'self'; "
    # TensorBoard's own policy allows eval (its charts compile expressions) and inline styles.
    "script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline' data:; "
    "font-src 'self' data:; img-src 'self' data: blob:; connect-src 'self'; "
    "frame-src 'none'; object-src 'none'; base-uri 'self'; form-action 'none'; "
    "frame-ancestors 'self'"
)
FRAME_HEADERS = {
    "Content-Security-Policy": FRAME_CSP,
    # The sandboxed frame's requests come from an opaque origin ("null"): they may read what
    # their ticket reaches, and send no credentials.
    "Access-Control-Allow-Origin": "*",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the ticket stays out of anyone's logs
    "Cross-Origin-Opener-Policy": "same-origin",
}
PREFLIGHT = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST",
    # What TensorBoard's own requests send (X-TensorBoard-Feature-Flags once a flag is set in
    # its URL, such as forceSVG).
    "Access-Control-Allow-Headers": "Content-Type, X-XSRF-Protected, X-TensorBoard-Feature-Flags",
    "Access-Control-Max-Age": "600",
}


@dataclass
class Ticket:
    id: str
    identity: Identity
    session_id: str | None  # token mode: the session it ends with
    namespace: str
    name: str
    expires: float  # Unix time
    checked_at: float = 0.0  # monotonic: when the user's right to read was last confirmed
    upstream: tuple[str, str] | None = None  # ("ip:port", path prefix), found at checked_at
    browser: str | None = None  # proxy mode: the digest of oauth2-proxy's session cookie
    session_ends: float = 0.0  # Unix time: no renewal goes past it

    @property
    def owner(self) -> tuple[str, str, str, str]:
        """One ticket per user, sign-in and fine-tune."""
        bound = self.session_id or self.browser or ""
        return (self.identity.key, bound, self.namespace, self.name)


class Tickets:
    """Tickets by id, least recently used first: at most ``per_user`` for one user (their own
    least recently used go first; by default 64, and never a quarter of the store) and
    ``limit`` in all; one per user, sign-in and fine-tune. Asking again for a ticket renews it
    (another ``TICKET_TTL``, never past its session)."""

    def __init__(self, limit: int = 10_000, per_user: int | None = None) -> None:
        self.limit = limit
        self.per_user = per_user if per_user is not None else max(1, min(64, limit // 4))
        self._by_id: OrderedDict[str, Ticket] = OrderedDict()
        self._by_owner: dict[tuple[str, str, str, str], str] = {}
        self._by_user: dict[str, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def issue(
        self,
        who: Identity,
        session_id: str | None,
        namespace: str,
        name: str,
        expires: float,
        browser: str | None = None,
    ) -> Ticket:
        """The ticket for this user, sign-in and fine-tune, renewed; a new one if none is
        alive. ``expires``: when the session ends (a ticket never outlives it)."""
        now = time.time()
        ticket = Ticket("", who, session_id, namespace, name, 0.0, browser=browser)
        known = self.get(self._by_owner.get(ticket.owner))
        if known is None:
            ticket.id = secrets.token_urlsafe(24)
            self._by_id[ticket.id] = ticket
            self._by_owner[ticket.owner] = ticket.id
            mine = self._by_user.setdefault(who.owner, OrderedDict())
            mine[ticket.id] = None
            while len(mine) > self.per_user:
                self._drop(next(iter(mine)))
            while len(self._by_id) > self.limit:
                self._drop(next(iter(self._by_id)))
        else:
            ticket = known
        ticket.session_ends = expires
        ticket.expires = min(expires, now + TICKET_TTL)
        return ticket

    def get(self, ticket_id: str | None) -> Ticket | None:
        ticket = self._by_id.get(ticket_id or "")
        if ticket is None:
            return None
        if ticket.expires <= time.time():
            self._drop(ticket.id)
            return None
        self._by_id.move_to_end(ticket.id)
        self._by_user[ticket.identity.owner].move_to_end(ticket.id)
        return ticket

    def end_session(self, session_id: str) -> None:
        """Every ticket of a token-mode session, or (a ``p:`` digest) of a proxy sign-in."""
        for ticket in [t for t in self._by_id.values() if session_id in (t.session_id, t.browser)]:
            self._drop(ticket.id)

    def drop(self, ticket_id: str) -> None:
        self._drop(ticket_id)

    def _drop(self, ticket_id: str) -> None:
        ticket = self._by_id.pop(ticket_id, None)
        if ticket is None:
            return
        if self._by_owner.get(ticket.owner) == ticket_id:  # not a newer ticket of the owner
            del self._by_owner[ticket.owner]
        mine = self._by_user[ticket.identity.owner]
        mine.pop(ticket_id, None)
        if not mine:
            del self._by_user[ticket.identity.owner]


def upstream_address(pods: list[dict]) -> str | None:
    """``ip:port`` of a ready TensorBoard among the fine-tune's pods (the trainer pod, whose
    native sidecar it is, or the Deployment's after the run): its container port named
    ``tensorboard``, the pod's IP as the kubelet reported it."""
    for pod in pods:
        meta, spec, status = (
            pod.get("metadata") or {},
            pod.get("spec") or {},
            pod.get("status") or {},
        )
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        if meta.get("deletionTimestamp") or not ready or not status.get("podIP"):
            continue
        for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            for port in container.get("ports") or []:
                if port.get("name") == "tensorboard":
                    port_number = int(port.get("containerPort") or TENSORBOARD_PORT)
                    return host_port(status["podIP"], port_number)
    return None


def host_port(ip: str, port: int) -> str | None:
    """``ip:port`` for a URL (an IPv6 address in brackets); None if ``ip`` is no IP address."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


_HEAD = re.compile(rb"<head(\s[^>]*)?>", re.IGNORECASE)


class Shim:
    """Puts our shim's script tag into TensorBoard's page as it streams through: right after
    ``<head>`` when that comes within the first HEAD_WINDOW bytes, else first of all.

    In an opaque origin, reading localStorage or document.cookie throws and no Worker may
    start, which TensorBoard does not expect; the shim gives it in-memory storage and no
    OffscreenCanvas (it then draws on the page itself)."""

    def __init__(self, shim_url: str) -> None:
        self.tag = f'<script src="{shim_url}"></script>'.encode()
        self.held = b""
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """What may be sent of the page so far."""
        if self.done:
            return chunk
        self.held += chunk
        head = _HEAD.search(self.held)
        if head is not None:
            self.done = True
            return self.held[: head.end()] + self.tag + self.held[head.end() :]
        if len(self.held) >= HEAD_WINDOW:
            self.done = True
            return self.tag + self.held
        return b""

    def end(self) -> bytes:
        """The rest, once the page has ended."""
        if self.done:
            return b""
        self.done = True
        return self.tag + self.held


def with_shim(html: bytes, shim_url: str) -> bytes:
    """TensorBoard's page with our shim as its first script (a whole page; see Shim)."""
    shim = Shim(shim_url)
    return shim.feed(html) + shim.end()


_COMPRESSIBLE = ("text/", "application/javascript", "application/json", "image/svg+xml")


async def relay(
    request: web.Request, answer: aiohttp.ClientResponse, shim_url: str, headers: dict[str, str]
) -> web.StreamResponse:
    """TensorBoard's answer, sent on as it comes: at most MAX_BYTES (a larger declared length
    is refused before anything is sent; one that grows past it is cut off), the shim put into
    an HTML page. Nothing but the head of an HTML page is ever held."""
    declared = answer.content_length
    if declared is not None and declared > MAX_BYTES:
        raise web.HTTPBadGateway(
            text=f"TensorBoard's answer is larger than {MAX_BYTES >> 20} MiB", headers=FRAME_HEADERS
        )
    kind = answer.headers.get("Content-Type", "application/octet-stream")
    shim = Shim(shim_url) if kind.split(";")[0].strip().lower() == "text/html" else None
    response = web.StreamResponse(status=answer.status, headers={"Content-Type": kind, **headers})
    if kind.lower().startswith(_COMPRESSIBLE) and (declared is None or declared > 1024):
        response.enable_compression()
    elif declared is not None and shim is None:
        response.content_length = declared
    await response.prepare(request)
    sent = 0
    try:
        async for chunk in answer.content.iter_any():
            sent += len(chunk)
            if sent > MAX_BYTES:
                raise ValueError(f"the answer grew past {MAX_BYTES >> 20} MiB")
            await response.write(shim.feed(chunk) if shim is not None else chunk)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        # Too late for an error status: end the connection, so that the browser sees a broken
        # answer rather than a short one.
        if request.transport is not None:
            request.transport.abort()
        return response
    if shim is not None:
        await response.write(shim.end())
    await response.write_eof()
    return response


def connector() -> aiohttp.TCPConnector:
    """TensorBoards' own pool: at most PER_TENSORBOARD_CONNECTIONS to any one of them."""
    return aiohttp.TCPConnector(limit=TOTAL_REQUESTS, limit_per_host=PER_TENSORBOARD_CONNECTIONS)
