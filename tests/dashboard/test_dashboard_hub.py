"""The hub's list of every fine-tune and who may see what, against the real API server: the
list comes in pages, a relist publishes only what changed, and the per-user caches and
access-review fan-out stay bounded however many users and namespaces there are."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import uuid

import pytest
from gft_dashboard.apiserver import ApiServer, Identity
from gft_dashboard.hub import FineTuneHub, Visibility

from dashboard.client import finetune

pytestmark = [pytest.mark.cluster]


def counted(api: ApiServer) -> list[tuple[str, str, dict]]:
    """The real ApiServer, noting each request made through it (method, path, parameters)."""
    made: list[tuple[str, str, dict]] = []
    real = api.request

    async def request(method, path, who, **kw):
        made.append((method, path, kw.get("params") or {}))
        return await real(method, path, who, **kw)

    api.request = request  # type: ignore[method-assign]
    return made


def run(coroutine):
    """``asyncio.run`` in a thread of its own: Playwright's browser, kept for the session by
    the browser tests, holds an event loop in this one."""
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, coroutine).result()


def drain(queue: asyncio.Queue, ns: str) -> list[tuple[str, str]]:
    """What the hub published about ``ns`` (the proving ground holds other tests' too)."""
    out = []
    while not queue.empty():
        kind, obj = queue.get_nowait()
        if obj["metadata"]["namespace"] == ns:
            out.append((kind, obj["metadata"]["name"]))
    return out


def test_the_hub_lists_in_pages_and_a_relist_publishes_only_what_changed(setup, cluster):
    ns = f"dash-hub-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", ns)
    try:
        for i in range(5):
            cluster.kubectl("apply", "-f", "-", input=json.dumps(finetune(f"r{i}", ns)))

        async def scenario():
            api = ApiServer.from_config(str(cluster.kubeconfig))
            made = counted(api)
            await api.start()
            try:
                hub = FineTuneHub(api, page_size=2)
                queue = hub.subscribe()
                await hub.relist()
                mine = [o for o in hub.objects() if o["metadata"]["namespace"] == ns]
                assert len(mine) == 5
                lists = [p for m, _, p in made if m == "GET"]
                assert all(p.get("limit") == "2" for p in lists) and len(lists) >= 3
                assert any(p.get("continue") for p in lists)
                assert len(drain(queue, ns)) == 5
                await hub.relist()  # nothing changed: nothing to say
                assert drain(queue, ns) == []
                cluster.kubectl("label", "gft", "r3", "-n", ns, "touched=yes")
                cluster.kubectl("delete", "gft", "r4", "-n", ns)
                await hub.relist()
                assert sorted(drain(queue, ns)) == [("changed", "r3"), ("deleted", "r4")]
            finally:
                await api.close()

        run(scenario())
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_access_reviews_go_only_to_namespaces_with_fine_tunes_and_the_cache_is_bounded(
    setup, cluster
):
    team = setup["team"]

    async def scenario():
        api = ApiServer.from_config(str(cluster.kubeconfig))
        made = counted(api)
        await api.start()
        try:
            seen = Visibility(api, max_users=3)
            viewer = Identity(token=setup["tokens"]["viewer"])
            allowed = await seen.namespaces(viewer, {team, setup["other"]})
            assert allowed == {team}
            reviews = [p for _, p, _ in made if "accessreviews" in p]
            assert len(reviews) == 3  # all namespaces, then each of the two with fine-tunes
            made.clear()
            assert await seen.namespaces(viewer, {team, setup["other"]}) == {team}
            assert made == []  # cached
            for i in range(10):
                await seen.namespaces(Identity(user=f"u{i}"), {team})
            assert len(seen) <= 3
        finally:
            await api.close()

    run(scenario())


def test_access_reviews_for_many_namespaces_are_asked_at_most_concurrency_at_once(setup, cluster):
    """The fan-out bound, measured: the most reviews in flight at once, against the real API
    server (at least two, so that the measurement is seen to see concurrency at all)."""
    namespaces = {f"dash-fanout-{i}" for i in range(12)}  # reviews need no such namespace

    async def scenario() -> int:
        api = ApiServer.from_config(str(cluster.kubeconfig))
        real = api.request
        now, most = [0], [0]

        async def request(method, path, who, **kw):
            if "accessreviews" not in path:
                return await real(method, path, who, **kw)
            now[0] += 1
            most[0] = max(most[0], now[0])
            try:
                return await real(method, path, who, **kw)
            finally:
                now[0] -= 1

        api.request = request  # type: ignore[method-assign]
        await api.start()
        try:
            seen = Visibility(api, concurrency=3)
            assert (
                await seen.namespaces(Identity(token=setup["tokens"]["viewer"]), namespaces)
                == set()
            )
            return most[0]
        finally:
            await api.close()

    most = run(scenario())
    assert 2 <= most <= 3, f"{most} access reviews in flight at once (at most 3 allowed)"
