"""TensorBoard of a fine-tune, served so that nothing it sends can act on the dashboard.

TensorBoard comes from the fine-tune's pod, whose image its author chose: its pages are
foreign content. They are served under ``/tb/NS/NAME/TICKET/`` with a Content-Security-Policy
whose ``sandbox`` (without ``allow-same-origin``) gives them an opaque origin, framed by the
run page in a sandboxed iframe as well: their script can read no cookie of the dashboard, and
what it sends to the dashboard carries none, so it acts as nobody. The TICKET in the path is
the credential instead (TensorBoard's own requests are relative, so they carry it): minted for
one user and one fine-tune once the user may read it, re-checked as that user every
``recheck`` seconds, ended with the user's session.

TensorBoard is reached at its pod's IP (pods listed as the user, so a name in their namespace
is the only thing that can point it anywhere); its redirects are answered as errors, never
followed; answers are capped in size and time; only TensorBoard's own data endpoints take a
POST.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from gft_api.conventions import TENSORBOARD_PORT

from gft_dashboard.apiserver import Identity

MAX_BYTES = 32 << 20  # TensorBoard's index.js is about 6 MiB
MAX_POST_BYTES = 64 << 10
TIMEOUT = 30.0
NAME_LABEL = "finetune.gemma.dev/name"  # on every pod the operator makes for a fine-tune
TICKET_TTL = 8 * 3600
# TensorBoard's data endpoints that take a POST (its Time Series, scalar and hparams tabs).
POSTS = re.compile(
    r"(experiment/[^/]+/)?data/plugin/"
    r"(timeseries/timeSeries|scalars/scalars_multirun|hparams/experiment|hparams/session_groups)"
)
FRAME_CSP = (
    "sandbox allow-scripts allow-downloads; default-src 'self'; "
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
    session_id: str | None
    namespace: str
    name: str
    expires: float  # Unix time
    checked_at: float = 0.0  # monotonic: when the user's right to read was last confirmed
    upstream: tuple[str, str] | None = None  # ("ip:port", path prefix), found at checked_at


class Tickets:
    """Tickets by id, at most ``limit`` (the oldest go first); one per user and fine-tune."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._by_id: OrderedDict[str, Ticket] = OrderedDict()
        self._by_owner: dict[tuple[str, str, str], str] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def issue(
        self, who: Identity, session_id: str | None, namespace: str, name: str, expires: float
    ) -> Ticket:
        owner = (who.key, namespace, name)
        known = self.get(self._by_owner.get(owner))
        if known is not None and known.session_id == session_id:
            return known
        expires = min(expires, time.time() + TICKET_TTL)
        ticket = Ticket(secrets.token_urlsafe(24), who, session_id, namespace, name, expires)
        self._by_id[ticket.id] = ticket
        self._by_owner[owner] = ticket.id
        while len(self._by_id) > self.limit:
            self._drop(next(iter(self._by_id)))
        return ticket

    def get(self, ticket_id: str | None) -> Ticket | None:
        ticket = self._by_id.get(ticket_id or "")
        if ticket is not None and ticket.expires <= time.time():
            self._drop(ticket.id)
            return None
        return ticket

    def end_session(self, session_id: str) -> None:
        for ticket in [t for t in self._by_id.values() if t.session_id == session_id]:
            self._drop(ticket.id)

    def drop(self, ticket_id: str) -> None:
        self._drop(ticket_id)

    def _drop(self, ticket_id: str) -> None:
        ticket = self._by_id.pop(ticket_id, None)
        if ticket is not None:
            self._by_owner.pop((ticket.identity.key, ticket.namespace, ticket.name), None)


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
                    return f"{status['podIP']}:{int(port.get('containerPort') or TENSORBOARD_PORT)}"
    return None


def with_shim(html: bytes, shim_url: str) -> bytes:
    """TensorBoard's page with our shim as its first script: in an opaque origin, reading
    localStorage or document.cookie throws and no Worker may start, which TensorBoard does
    not expect; the shim gives it in-memory storage and no OffscreenCanvas (it then draws on
    the page itself)."""
    tag = f'<script src="{shim_url}"></script>'.encode()
    head = re.search(rb"<head[^>]*>", html, re.IGNORECASE)
    if head is None:
        return tag + html
    return html[: head.end()] + tag + html[head.end() :]
