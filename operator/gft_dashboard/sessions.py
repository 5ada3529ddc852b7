"""Sessions of token mode, kept on the server: the browser holds only an opaque id.

A session ends at logout, when the token it holds expires (read from the token's own ``exp``
when it is a JWT, as service-account tokens are; the API server stays the judge of whether
it is valid), or after ``MAX_AGE`` at the latest. The store is bounded: past ``limit`` the
oldest sessions go first.

Sessions live in this process: a restart signs everyone out, and several replicas need a
sticky Service (the chart sets ``sessionAffinity: ClientIP`` when it runs more than one).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from gft_dashboard.apiserver import Identity

MAX_AGE = 12 * 3600  # a working day, whatever the token's own lifetime


@dataclass(frozen=True)
class Session:
    id: str
    identity: Identity
    user: str
    expires: float  # Unix time


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, unverified (it only ever shortens a session)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) else None


class Sessions:
    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    def start(self, identity: Identity, user: str, now: float | None = None) -> Session:
        now = time.time() if now is None else now
        expires = now + MAX_AGE
        if identity.token and (exp := token_expiry(identity.token)) is not None:
            expires = min(expires, exp)
        session = Session(secrets.token_urlsafe(32), identity, user, expires)
        self._by_id[session.id] = session
        while len(self._by_id) > self.limit:
            self._by_id.popitem(last=False)
        return session

    def get(self, session_id: str | None, now: float | None = None) -> Session | None:
        session = self._by_id.get(session_id or "")
        if session is None:
            return None
        if session.expires <= (time.time() if now is None else now):
            self.end(session.id)
            return None
        return session

    def end(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)
