"""The dashboard's bookkeeping under a hostile user (the review of issue 24's dashboard, findings
4, 5, 7, 9, 12, 16 and 17): the stores of sessions and TensorBoard tickets, the limits, the
YAML reader, the hub's fan-out and the addresses of pods, each on its own, without a cluster.
(What needs the API server, TensorBoard or a browser is in test_dashboard_bounds.py and
test_dashboard_edges.py.)"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path

import pytest
from gft_dashboard import hub, manifest, tensorboard
from gft_dashboard.apiserver import Identity
from gft_dashboard.sessions import Sessions

STATIC = Path(__file__).resolve().parents[2] / "operator" / "gft_dashboard" / "static"


def run(coroutine):
    """``asyncio.run`` in a thread of its own (Playwright may hold this thread's loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, coroutine).result()


# -- 4. One user's sign-ins cannot sign anyone else out ----------------------------------------


def test_one_users_many_sign_ins_never_sign_out_another_user():
    store = Sessions(limit=20)
    victim = store.start(Identity(token="victims-token"), "victim", now=1000)
    for i in range(50):  # fifty tokens of one user, signed in one after another
        store.start(Identity(token=f"mallory-{i}"), "mallory", now=1000 + i)
    assert store.get(victim.id, now=1100) == victim, "mallory's sign-ins signed the victim out"
    assert len(store) <= 20


def test_sessions_go_least_recently_used_first_and_one_token_keeps_one_session():
    store = Sessions(limit=3)
    victim = store.start(Identity(token="v"), "victim", now=1000)
    store.start(Identity(token="a"), "ann", now=1001)
    store.start(Identity(token="b"), "bob", now=1002)
    assert store.get(victim.id, now=1003) is not None  # the victim is active
    store.start(Identity(token="c"), "cy", now=1004)
    assert store.get(victim.id, now=1005) is not None, "the active session went first"
    again = store.start(Identity(token="v"), "victim", now=1006)
    assert again.id == victim.id, "a second sign-in with the same token made a second session"


def test_one_users_tickets_never_void_another_users():
    tickets = tensorboard.Tickets(limit=20)
    far = time.time() + 3600
    victim = tickets.issue(Identity(token="v"), "s-victim", "team", "run", far)
    for i in range(100):
        tickets.issue(Identity(token="m"), "s-mallory", "team", f"run-{i}", far)
    assert tickets.get(victim.id) is victim, "mallory's tickets voided the victim's"
    assert len(tickets) <= 20


# -- 9, 17. A ticket lives minutes, renewed by its run page; the owner index stays right -------


def test_a_ticket_lives_minutes_and_is_renewed_by_asking_again():
    tickets = tensorboard.Tickets()
    session_end = time.time() + 12 * 3600
    first = tickets.issue(Identity(user="ada"), None, "team", "run", session_end)
    assert first.expires <= time.time() + 15 * 60, "a ticket outlives its run page by hours"
    first.expires = time.time() + 5  # nearly over: the run page asks again
    again = tickets.issue(Identity(user="ada"), None, "team", "run", session_end)
    assert again.id == first.id and again.expires >= time.time() + 60, "not renewed"


def test_dropping_an_old_ticket_keeps_its_owners_newer_one():
    tickets = tensorboard.Tickets()
    far = time.time() + 3600
    ada = Identity(token="ada")
    old = tickets.issue(ada, "s1", "team", "run", far)
    new = tickets.issue(ada, "s2", "team", "run", far)  # signed in again: a ticket of its own
    assert new.id != old.id
    tickets.drop(old.id)
    assert tickets.issue(ada, "s2", "team", "run", far).id == new.id, (
        "dropping the old ticket forgot the owner's newer one"
    )


# -- 5. Limits count per user, not per token ---------------------------------------------------


def test_a_users_tokens_share_one_allowance_and_service_accounts_one_per_namespace():
    from gft_dashboard.limits import StreamLimits, TooManyStreams

    sa = "system:serviceaccount:team:ci"
    one, two = Identity(token="t1", name=sa), Identity(token="t2", name=sa)
    assert one.key != two.key and one.owner == two.owner  # two tokens, one user
    assert Identity(user="ada").owner != Identity(user="bob").owner
    limits = StreamLimits(per_user=2, per_group=3)
    with limits.hold(one.owner), limits.hold(two.owner):
        with pytest.raises(TooManyStreams, match="per user"):
            limits.hold(one.owner)
        other = Identity(token="t3", name="system:serviceaccount:team:ci-2").owner
        with limits.hold(other), pytest.raises(TooManyStreams, match="namespace team"):
            limits.hold(Identity(token="t4", name="system:serviceaccount:team:ci-3").owner)
        with limits.hold(Identity(token="t5", name="system:serviceaccount:else:ci").owner):
            pass  # another namespace has its own allowance
    assert limits.held(one.owner) == 0


# -- 7. YAML: small, not deep, never a crash ---------------------------------------------------


def test_deep_or_large_yaml_is_a_bad_manifest_naming_why_not_a_crash():
    assert manifest.MAX_BYTES <= 64 * 1024  # a GemmaFineTune is a few kB
    for deep in ("[" * 100_000, "a:\n" + "".join(f"{' ' * i}b:\n" for i in range(1, 200))):
        with pytest.raises(manifest.BadManifest, match=r"deep|nest"):
            manifest.load(deep[: manifest.MAX_BYTES])
    assert manifest.load("a: [[[[1]]]]\n") == {"a": [[[[1]]]]}


# -- 12. A page that fell behind is told, not silently dropped ---------------------------------


def test_a_page_that_fell_behind_gets_a_fresh_snapshot_not_silence():
    async def scenario():
        fanout = hub.FineTuneHub(api=None)  # type: ignore[arg-type]
        queue = fanout.subscribe()
        obj = {"metadata": {"namespace": "team", "name": "run", "uid": "u"}}
        for _ in range(1500):  # a page that stopped reading while a relist published
            fanout._publish("changed", obj)
        kinds = [queue.get_nowait()[0] for _ in range(queue.qsize())]
        assert "resync" in kinds, "the page was dropped without a word"
        fanout._publish("changed", obj)  # and it still hears what happens next
        assert not queue.empty() and queue.get_nowait()[0] == "changed"

    run(scenario())


# -- 16. IPv6 pod addresses are bracketed ------------------------------------------------------


def test_an_ipv6_pod_address_is_bracketed_in_every_url():
    import yarl

    pod = {
        "metadata": {},
        "spec": {"containers": [{"ports": [{"name": "tensorboard", "containerPort": 6006}]}]},
        "status": {"podIP": "fd00:10::5", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    address = tensorboard.upstream_address([pod])
    assert address == "[fd00:10::5]:6006", address
    assert yarl.URL(f"http://{address}/").host == "fd00:10::5"
    pod["status"]["podIP"] = "10.1.2.3"
    assert tensorboard.upstream_address([pod]) == "10.1.2.3:6006"
    pod["status"]["podIP"] = "not-an-address/../x"
    assert tensorboard.upstream_address([pod]) is None


# -- 17. The frame may not download; the run page's chart copes with long series ---------------


def test_tensorboards_frame_may_not_start_downloads():
    assert "allow-downloads" not in tensorboard.FRAME_CSP
    for script in STATIC.glob("*.js"):  # the page's modules (run.js frames TensorBoard)
        assert "allow-downloads" not in script.read_text(), script.name
    assert 'setAttribute("sandbox", "allow-scripts")' in (STATIC / "run.js").read_text()


def test_the_run_pages_charts_draw_a_long_series(chromium):
    """The page's own modules, as they are, served from a stand-in origin: half a million
    points drawn (uPlot), their table of values bounded, and the first wall time of a long run
    found (a spread of every point into Math.min threw a RangeError)."""
    types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}

    def serve(route) -> None:
        path = route.request.url.split("://static.test/", 1)[1].split("?")[0]
        if path == "page.html":
            route.fulfill(body="<html><body><div id='view'></div></body></html>",
                          content_type="text/html")  # fmt: skip
            return
        file = (STATIC / path).resolve()
        if STATIC not in file.parents or not file.is_file():
            route.fulfill(status=404, body="")
            return
        route.fulfill(body=file.read_bytes(), content_type=types.get(file.suffix, "text/plain"))

    page = chromium.new_page()
    try:
        page.route("http://static.test/**", serve)
        page.goto("http://static.test/page.html")
        drawn = page.evaluate("""async () => {
            const charts = await import("http://static.test/charts.js");
            const curves = await import("http://static.test/curves.js");
            const points = Array.from({length: 500000}, (_, i) => [i, Math.sin(i) + 2]);
            const stamped = Array.from({length: 500000}, (_, i) => [1000 + i, i, 1]);
            try {
                const view = document.getElementById("view");
                charts.lineChart(view, {title: "loss", series: [{label: "train/loss", points}]});
                const figure = view.querySelector("figure.chart");
                return {canvas: !!figure.querySelector("canvas"),
                        rows: figure.querySelectorAll("table.values tbody tr").length,
                        first: curves.firstWallTime({"train/loss": stamped})};
            } catch (e) { return {threw: String(e)}; }
        }""")
    finally:
        page.close()
    assert "threw" not in drawn, drawn
    assert drawn["canvas"], drawn
    assert 0 < drawn["rows"] <= 201, drawn
    assert drawn["first"] == 1000, drawn


# -- 12. A watch that falls silent is not trusted for ever -------------------------------------


def test_a_silent_watch_is_given_up_and_a_failing_one_marks_the_list_stale():
    """A stand-in API server (what is tested is the hub's reaction to a connection that goes
    quiet without closing, which a real API server does not do on demand): the first watch
    sends its headers and then nothing; after it, every request fails."""
    import ssl

    from aiohttp import web
    from gft_dashboard.apiserver import ApiServer

    async def scenario() -> tuple[list[str], bool]:
        asked: list[str] = []

        async def finetunes(request: web.Request) -> web.StreamResponse:
            kind = "watch" if request.query.get("watch") else "list"
            asked.append(kind)
            if len(asked) > 2:
                return web.json_response({"message": "down"}, status=500)
            if kind == "list":
                return web.json_response({"metadata": {"resourceVersion": "7"}, "items": []})
            response = web.StreamResponse()
            await response.prepare(request)
            await asyncio.sleep(3600)  # a half-open connection: never a byte, never closed
            return response

        app = web.Application()
        app.router.add_get("/apis/finetune.gemma.dev/v1alpha1/gemmafinetunes", finetunes)
        runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        api = ApiServer(f"http://127.0.0.1:{port}", ssl.create_default_context(),
                        ssl.create_default_context(), {})  # fmt: skip
        await api.start()
        fanout = hub.FineTuneHub(api)
        fanout.idle_seconds = 1.0
        task = asyncio.ensure_future(fanout.run())
        try:
            deadline = time.monotonic() + 15
            while fanout.synced or len(asked) < 3:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            return asked, fanout.synced
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await api.close()
            await runner.cleanup()

    asked, synced = run(scenario())
    assert asked[:2] == ["list", "watch"] and len(asked) >= 3, f"the silent watch was kept: {asked}"
    assert not synced, "the list still says it is synced while the API server fails"


# -- 11. Proxy mode sends only the groups it may impersonate -----------------------------------


def test_a_proxied_users_other_groups_are_dropped_not_sent():
    from gft_dashboard import auth

    settings = auth.Settings(
        auth="proxy", group_prefix="oidc:", allowed_groups=frozenset({"oidc:ml-team"})
    )
    who = auth.proxied_identity(
        {"X-Forwarded-User": "ada", "X-Forwarded-Groups": "ml-team,everyone,other-team"},
        settings,
    )
    # The API server refuses a whole request if one impersonated group is not allowed.
    assert who == Identity(user="ada", groups=("oidc:ml-team",))
    system = {"X-Forwarded-User": "ada", "X-Forwarded-Groups": "system:masters"}
    with pytest.raises(auth.Refused, match="system:masters"):  # refused, not quietly dropped
        auth.proxied_identity(system, auth.Settings(auth="proxy", allowed_groups=frozenset("a")))
