"""Sessions of token mode, kept on the server: the browser holds only an opaque id.

A session ends at logout, when the token it holds expires (read from the token's own ``exp``
when it is a JWT, as service-account tokens are; the API server stays the judge of whether
it is valid), or after ``MAX_AGE`` at the latest. The store is bounded so that no one can sign
anyone else out: one user holds at most ``per_user`` sessions (a sign-in past that ends their
own least recently used one), signing in again with the same token gives the same session,
and past ``limit`` in all the least recently *used* session goes first (a session in use is
never the first to go).

Sessions live in this process: a restart signs everyone out, and the chart runs one replica.
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
    """Sessions by id, least recently used first; per user and by token too."""

    def __init__(self, limit: int = 10_000, per_user: int = 8) -> None:
        self.limit, self.per_user = limit, per_user
        self._by_id: OrderedDict[str, Session] = OrderedDict()
        self._by_token: dict[str, str] = {}  # Identity.key -> session id
        self._by_user: dict[str, OrderedDict[str, None]] = {}  # user -> their session ids

    def __len__(self) -> int:
        return len(self._by_id)

    def start(self, identity: Identity, user: str, now: float | None = None) -> Session:
        now = time.time() if now is None else now
        known = self.get(self._by_token.get(identity.key), now)
        if known is not None:
            return known
        expires = now + MAX_AGE
        if identity.token and (exp := token_expiry(identity.token)) is not None:
            expires = min(expires, exp)
        session = Session(secrets.token_urlsafe(32), identity, user, expires)
        self._by_id[session.id] = session
        self._by_token[identity.key] = session.id
        mine = self._by_user.setdefault(user, OrderedDict())
        mine[session.id] = None
        while len(mine) > self.per_user:
            self.end(next(iter(mine)))
        while len(self._by_id) > self.limit:
            self.end(next(iter(self._by_id)))
        return session

    def get(self, session_id: str | None, now: float | None = None) -> Session | None:
        session = self._by_id.get(session_id or "")
        if session is None:
            return None
        if session.expires <= (time.time() if now is None else now):
            self.end(session.id)
            return None
        self._by_id.move_to_end(session.id)
        self._by_user[session.user].move_to_end(session.id)
        return session

    def end(self, session_id: str) -> None:
        session = self._by_id.pop(session_id, None)
        if session is None:
            return
        if self._by_token.get(session.identity.key) == session_id:
            del self._by_token[session.identity.key]
        mine = self._by_user[session.user]
        mine.pop(session_id, None)
        if not mine:
            del self._by_user[session.user]
