"""What the operator's parts share, set once at startup (``__main__`` and kopf's startup)."""

from __future__ import annotations

import socket
import threading
from collections import defaultdict

from gft_operator import children
from gft_operator.apply import Writer
from gft_operator.kube import Kube
from gft_operator.leader import LeaderElector
from gft_operator.requeue import Requeue


class Runtime:
    kube: Kube | None = None
    writer: Writer | None = None
    """The one place that writes (``apply``)."""
    defaults: children.Defaults = children.Defaults()
    resync_seconds: float = 10.0
    component: str = "gft-operator"
    instance: str = socket.gethostname()
    requeue: Requeue | None = None
    leader: LeaderElector | None = None
    """With leader election on, only the replica holding the Lease reconciles or writes."""

    def leading(self) -> bool:
        """Whether this replica may act: it holds the Lease, or runs without leader election."""
        return self.leader is None or self.leader.is_leader()


RUNTIME = Runtime()

_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_locks_guard = threading.Lock()


def lock(namespace: str, name: str) -> threading.Lock:
    """One writer of a fine-tune's status at a time (a reconcile, a live-status write)."""
    with _locks_guard:
        return _locks[(namespace, name)]


def drop_lock(namespace: str, name: str) -> None:
    """The fine-tune is gone: its lock goes too (bounded by the live fine-tunes)."""
    with _locks_guard:
        held = _locks.get((namespace, name))
        if held is not None and not held.locked():
            del _locks[(namespace, name)]
