"""What the operator remembers of deleted objects. The cache (``gft_operator.cache``): what
the operator deleted, or found deleted, stays hidden while the watch still shows that object at
that version, however long the watch is behind, and is forgotten once the watch caught up.
Nothing else is kept per fine-tune once it is gone."""

from __future__ import annotations

import pytest
from gft_operator import cache
from gft_operator.cache import Cache


def job(version: int, uid: str = "u1", **meta) -> dict:
    return {
        "kind": "Job",
        "metadata": {
            "name": "run",
            "namespace": "team",
            "uid": uid,
            "resourceVersion": str(version),
            **meta,
        },
    }


def watching(c: Cache, *shown: dict) -> None:
    """Play the watch: it shows these Jobs (and nothing else)."""
    c.attach({"gft_jobs": {("team", "run"): list(shown)} if shown else {}})


@pytest.fixture
def behind(monkeypatch):
    monkeypatch.setattr(cache, "WRITE_MEMORY_SECONDS", 0.0)  # time alone cures nothing


def test_a_deletion_is_hidden_until_the_watch_catches_up(behind):
    c = Cache()
    watching(c, job(5))
    c.deleted(job(5))
    c.expire()
    assert c.get("Job", "team", "run") is None, "the watch is behind: still hidden"
    watching(c, job(6, deletionTimestamp="2026-01-01T00:00:00Z"))
    assert c.get("Job", "team", "run")["metadata"]["deletionTimestamp"], "a newer version shows"
    assert c.counts()["remembered_writes"] == 0


def test_a_new_object_of_that_name_shows_at_once(behind):
    c = Cache()
    watching(c, job(5))
    c.deleted(job(5))
    watching(c, job(3, uid="u2"))
    assert c.get("Job", "team", "run")["metadata"]["uid"] == "u2"


def test_the_operators_own_last_write_does_not_bring_it_back(behind):
    """The reviewer's find: the outcome finalizer is taken off (version 6, remembered), then
    the Job is deleted from the copy read before (version 5). The watch delivers version 6
    before the deletion: it must not show the deleted Job again."""
    c = Cache()
    watching(c, job(5))
    c.wrote(job(6))
    c.deleted(job(5))
    watching(c, job(6))
    assert c.get("Job", "team", "run") is None


def test_expire_forgets_a_deletion_once_the_watch_no_longer_shows_it(behind):
    c = Cache()
    watching(c, job(5))
    c.deleted(job(5))
    c.expire()
    assert c.counts()["remembered_writes"] == 1
    watching(c)
    c.expire()
    assert c.counts()["remembered_writes"] == 0


def test_a_gone_finetune_leaves_no_lock_behind():
    """The soak benchmark's object counts (gc, every minute, 1200 fine-tunes, none kept): every
    other kind flat or back down at the end, but 901 more locks. The watch's DELETED event
    dropped the fine-tune's lock, then queued the reconcile that made it again."""
    from gft_operator import reconcile, runtime
    from gft_operator.apply import Writer
    from gft_operator.runtime import RUNTIME

    RUNTIME.writer = Writer(None, "gft-operator", "test")  # type: ignore[arg-type]
    try:
        before = len(runtime._locks)
        reconcile.reconcile("team", "deleted")  # not in the cache: gone, nothing to write
        assert len(runtime._locks) == before
    finally:
        RUNTIME.writer = None
