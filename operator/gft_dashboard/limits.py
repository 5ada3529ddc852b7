"""Per-user limits on live streams (the list's events, followed logs): one user's forty tabs
must not hold what everyone else needs. Pure bookkeeping; the server turns a refusal into 429."""

from __future__ import annotations

import contextlib


class TooManyStreams(RuntimeError):
    """Over a limit; the message says which and what to do."""


class StreamLimits:
    def __init__(self, per_user: int, total: int = 1024) -> None:
        self.per_user, self.total = per_user, total
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
        if self._all >= self.total:
            raise TooManyStreams(
                f"the dashboard has {self.total} live streams open, at most {self.total}: "
                "try again in a moment"
            )
        self._held[key] = self._held.get(key, 0) + 1
        self._all += 1
        release = contextlib.ExitStack()
        release.callback(self._release, key)
        return release

    def _release(self, key: str) -> None:
        self._all -= 1
        self._held[key] -= 1
        if not self._held[key]:
            del self._held[key]
