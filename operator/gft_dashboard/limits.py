"""Per-user limits: one user's forty tabs, floods of TensorBoard requests or sign-ins must not
hold what everyone else needs. Pure bookkeeping; the server turns a refusal into 429.

Limits count against the *user* (``Identity.owner``: the name the API server gave at sign-in,
or the one the proxy vouched for), not the token: a user's several tokens share one allowance.
Service accounts of one namespace share a second, larger one (whoever may create service
accounts there can mint many users), so one namespace cannot take the dashboard's whole
allowance either.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator


class TooManyStreams(RuntimeError):
    """Over a limit; the message says which and what to do."""


def group_of(owner: str) -> str | None:
    """The shared allowance of a service account's namespace (``system:serviceaccount:NS:SA``
    counts against ``sa:NS`` too); None for anyone else."""
    parts = owner.removeprefix("u:").split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        return f"sa:{parts[2]}"
    return None


class StreamLimits:
    """Live streams (the list's events, followed logs): at most ``per_user`` for one user,
    ``per_group`` for the service accounts of one namespace, ``total`` in all."""

    def __init__(self, per_user: int, total: int = 1024, per_group: int | None = None) -> None:
        self.per_user, self.total = per_user, total
        self.per_group = per_group if per_group is not None else 4 * per_user
        self._held: dict[str, int] = {}
        self._all = 0

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    def hold(self, key: str) -> contextlib.ExitStack:
        """One stream for ``key``, taken now (TooManyStreams when over a limit) and given back
        when the returned context exits."""
        if self._held.get(key, 0) >= self.per_user:
            raise TooManyStreams(
                f"you have {self.per_user} live streams open, at most {self.per_user} per user: "
                "close a tab or a followed log, or try again in a moment"
            )
        group = group_of(key)
        if group is not None and self._held.get(group, 0) >= self.per_group:
            raise TooManyStreams(
                f"the service accounts of namespace {group[3:]} have {self.per_group} live "
                f"streams open, at most {self.per_group} together: close some, or try again "
                "in a moment"
            )
        if self._all >= self.total:
            raise TooManyStreams(
                f"the dashboard has {self.total} live streams open, at most {self.total}: "
                "try again in a moment"
            )
        keys = [key] if group is None else [key, group]
        for k in keys:
            self._held[k] = self._held.get(k, 0) + 1
        self._all += 1
        release = contextlib.ExitStack()
        release.callback(self._release, keys)
        return release

    def _release(self, keys: list[str]) -> None:
        self._all -= 1
        for key in keys:
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]


class InFlight:
    """Requests in flight: at most ``per_user`` at once for one user (the next ``waiting``
    wait their turn, more are refused with TooManyStreams) and ``total`` in flight or waiting
    in all. The table holds only users with a request in flight or waiting."""

    def __init__(self, per_user: int, waiting: int, total: int, what: str) -> None:
        self.per_user, self.waiting, self.total, self.what = per_user, waiting, total, what
        self._users: dict[str, tuple[asyncio.Semaphore, int]] = {}
        self._all = 0

    def busy(self, key: str) -> int:
        """In flight or waiting, for ``key``."""
        return self._users[key][1] if key in self._users else 0

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        turn, users = self._users.get(key) or (asyncio.Semaphore(self.per_user), 0)
        if users >= self.per_user + self.waiting:
            raise TooManyStreams(
                f"you have {users} {self.what} in flight or waiting, at most "
                f"{self.per_user + self.waiting}: try again in a moment"
            )
        if self._all >= self.total:
            raise TooManyStreams(
                f"the dashboard has {self.total} {self.what} in flight: try again in a moment"
            )
        self._users[key] = (turn, users + 1)
        self._all += 1
        try:
            async with turn:
                yield
        finally:
            self._all -= 1
            turn, users = self._users[key]
            if users == 1:
                del self._users[key]
            else:
                self._users[key] = (turn, users - 1)


class Rate:
    """At most ``count`` events per ``per`` seconds for one key (a sliding window), for at
    most ``max_keys`` keys (the least recently seen are forgotten first)."""

    def __init__(self, count: int, per: float = 60.0, max_keys: int = 10_000) -> None:
        self.count, self.per, self.max_keys = count, per, max_keys
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> bool:
        """True (and counted) when ``key`` is under its rate; False otherwise."""
        now = time.monotonic() if now is None else now
        times = self._seen.setdefault(key, deque())
        self._seen.move_to_end(key)
        while times and times[0] <= now - self.per:
            times.popleft()
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        if len(times) >= self.count:
            return False
        times.append(now)
        return True
