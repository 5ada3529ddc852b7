"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): a user signs in,
the list updates live when a fine-tune's status changes, the run page shows the read-only user
no controls, an editor starts a fine-tune from the form (validated by the API server's dry
run, small learning rates and typos included) and suspends it through the confirmation
dialog; TensorBoard's own scalar card draws its points in the run page while a hostile
TensorBoard's script can do nothing to the dashboard (what reaches the server is looked at
there, through a recording front); a session that ends says so. (A real run's page, curves and
all, is looked at in tests/e2e/test_demo_flow.py.)"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path

import pytest
from conftest import wait_for
from playwright.sync_api import expect

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def signed_in(chromium, base: str, token: str):
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{base}/")
    page.fill("#token", token)
    page.click("#signin")
    page.wait_for_selector("#list")
    return page


def test_the_list_updates_live_and_a_viewer_sees_no_controls(setup, chromium, cluster):
    team = setup["team"]
    page = signed_in(chromium, setup["base"], setup["tokens"]["viewer"])
    row = f"tr.row[data-key='{team}/seen']"
    page.wait_for_selector(row)
    assert page.locator(f"tr.row[data-key^='{setup['other']}/']").count() == 0
    status = {"status": {"phase": "Running", "progress": {"step": 6, "totalSteps": 10,
              "percent": 60.0, "etaSeconds": 40}, "metrics": {"loss": 1.234}}}  # fmt: skip
    cluster.kubectl("patch", "gft", "seen", "-n", team, "--subresource=status",
                    "--type=merge", "-p", json.dumps(status))  # fmt: skip
    # No reload: the row changes because the server pushed the change.
    expect(page.locator(row)).to_contain_text("60%")
    assert "1.234" in page.locator(row).inner_text()
    page.click(row)
    expect(page.locator("#phase")).to_contain_text("Running")  # from the run page's stream
    expect(page.locator("#controls")).to_contain_text("not change it")
    assert page.locator("#stop").count() == 0 and page.locator("#suspend").count() == 0
    assert "not change it" in page.content()
    # TensorBoard is framed from its own ticket's path (the frame needs no cookie), sandboxed
    # to scripts alone (no downloads from the dashboard's origin).
    expect(page.locator("iframe#tb")).to_have_attribute("src", re.compile(f"/gft/tb/{team}/seen/"))
    expect(page.locator("iframe#tb")).to_have_attribute("sandbox", "allow-scripts")
    page.close()


def test_an_editor_starts_from_the_form_and_suspends_with_confirmation(setup, chromium, cluster):
    team = setup["team"]
    page = signed_in(chromium, setup["base"], setup["tokens"]["editor"])
    page.goto(f"{setup['base']}/#/new")
    page.wait_for_selector("#yaml")
    page.fill("#f-name", "from-the-form")
    page.fill("#f-ns", team)
    page.fill("#f-lr", "-1")  # the API server refuses this, naming the field
    page.click("#to-yaml")
    page.click("#validate")
    # (Locator assertions: the page's CSP forbids evaluating strings, Playwright's included.)
    expect(page.locator("#result")).to_contain_text("spec.training.learningRate")
    # A small rate: the form writes it as JavaScript does (5e-7), which is a number.
    page.fill("#f-lr", "0.0000005")
    page.click("#to-yaml")
    assert "learningRate: 5e-7" in page.locator("#yaml").input_value()
    page.click("#validate")
    expect(page.locator("#result")).to_contain_text("accepts it")
    # A typo in the YAML editor is named, not dropped.
    page.fill("#yaml", page.locator("#yaml").input_value().replace("learningRate", "learningrate"))
    page.click("#validate")
    expect(page.locator("#result")).to_contain_text("learningrate")
    page.fill("#f-lr", "0.0002")
    page.click("#to-yaml")
    page.click("#create")
    page.wait_for_selector("#suspend")
    assert cluster.kubectl("get", "gft", "from-the-form", "-n", team).returncode == 0
    page.click("#suspend")
    page.wait_for_selector("dialog#confirm[open]")
    assert "checkpoint" in page.locator("#confirm-text").inner_text()
    page.click("#confirm-ok")
    wait_for(
        "spec.suspend true",
        lambda: cluster.kubectl_json("get", "gft", "from-the-form", "-n", team)["spec"].get(
            "suspend"
        ),
        timeout=20,
    )
    page.close()


def _series_points(frame) -> int:
    """The most points any line of TensorBoard's scalar cards draws (its SVG path's segments)."""
    paths = frame.locator("scalar-card line-chart path")
    return max(((paths.nth(i).get_attribute("d") or "").count("L") for i in range(paths.count())),
               default=0)  # fmt: skip


class Front:
    """A front for the dashboard on loopback (as an Ingress stands before it) that notes each
    request as it reaches the server: (method, path with query, whether it carried a session
    cookie). Answers stream through untouched."""

    HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.seen: list[tuple[str, str, bool]] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.url = ""

    def __enter__(self) -> Front:
        self.thread = threading.Thread(target=self.loop.run_until_complete,
                                       args=(self._serve(),), daemon=True)  # fmt: skip
        self.thread.start()
        assert self.ready.wait(30), "the recording front did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=30)

    async def _serve(self) -> None:
        import aiohttp
        from aiohttp import web
        from multidict import CIMultiDict

        self.stop = asyncio.Event()
        client = aiohttp.ClientSession(auto_decompress=False)

        async def forward(request: web.Request) -> web.StreamResponse:
            self.seen.append((request.method, request.path_qs, "gft_session" in request.cookies))
            headers = CIMultiDict((k, v) for k, v in request.headers.items()
                                  if k.lower() not in self.HOP)  # fmt: skip
            async with client.request(request.method, self.upstream + request.path_qs,
                                      headers=headers, data=await request.read(),
                                      allow_redirects=False) as r:  # fmt: skip
                back = web.StreamResponse(status=r.status, headers=CIMultiDict(
                    (k, v) for k, v in r.headers.items() if k.lower() not in self.HOP))  # fmt: skip
                await back.prepare(request)
                async for chunk in r.content.iter_any():
                    await back.write(chunk)
                return back

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app, shutdown_timeout=1, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self.ready.set()
        await self.stop.wait()
        await runner.cleanup()
        await client.close()


def test_tensorboard_draws_its_scalars_and_its_script_cannot_act_on_the_dashboard(
    setup, chromium, cluster
):
    from dashboard.pods import reports

    team = setup["team"]
    with Front(setup["root"]) as front:
        report = _tensorboard_and_the_hostile_page(front.url + "/gft", setup, chromium, cluster,
                                                   reports)  # fmt: skip
    # What reached the server from the hostile page's script (its requests say ?from=hostile)
    # carried no session: the sandboxed frame acts as nobody. The page's own requests did
    # carry one, so a session sent would have been seen.
    hostile = [s for s in front.seen if "from=hostile" in s[1]]
    assert any("/api/whoami" in path for _, path, _ in hostile), front.seen[-20:]
    assert not any(session for _, _, session in hostile), hostile
    assert any(session for _, path, session in front.seen if path.startswith("/gft/api/")
               and "from=hostile" not in path), "the front never saw a session cookie"  # fmt: skip
    assert cluster.kubectl("get", "gft", "hostile", "-n", team, check=False).returncode == 0
    # And what its script saw.
    assert "gft_" not in str(report["cookie"]) and str(report["parent"]).startswith("refused")
    assert str(report["whoami"]).startswith("refused"), report  # an opaque origin reads nothing


def _tensorboard_and_the_hostile_page(base, setup, chromium, cluster, reports) -> dict:
    team = setup["team"]
    page = signed_in(chromium, base, setup["tokens"]["editor"])
    page.goto(f"{base}/#/ft/{team}/seen")
    page.locator("iframe#tb").scroll_into_view_if_needed()  # TensorBoard draws what is seen
    frame = page.frame_locator("iframe#tb")
    frame.locator("scalar-card").first.wait_for(timeout=90_000)
    # Time Series POSTs for its data: the card's line has the run's 20 points (19 segments).
    wait_for("TensorBoard's loss card drawn", lambda: _series_points(frame) >= 19, timeout=60)
    # A run whose "TensorBoard" is the author's own page: its script runs, sandboxed, and reports.
    page.goto(f"{base}/#/ft/{team}/hostile")
    report = wait_for("the hostile page's report", lambda: reports(cluster, team, "evil"),
                      timeout=90)[-1]  # fmt: skip
    page.close()
    return report


def test_a_session_signs_out_and_an_expired_one_says_so(setup, chromium, cluster):
    team = setup["team"]
    cluster.kubectl("create", "serviceaccount", "short-lived", "-n", team)
    cluster.kubectl("create", "rolebinding", "short-lived", "--clusterrole=view",
                    f"--serviceaccount={team}:short-lived", "-n", team)  # fmt: skip
    token = cluster.kubectl("create", "token", "short-lived", "-n", team).stdout.strip()
    page = signed_in(chromium, setup["base"], token)
    page.click("#signout")
    page.wait_for_selector("#token")
    page.fill("#token", token)
    page.click("#signin")
    page.wait_for_selector(f"tr.row[data-key='{team}/seen']")
    cluster.kubectl("delete", "serviceaccount", "short-lived", "-n", team)
    expect(page.locator("#expired")).to_contain_text("session expired", timeout=30_000)
    page.close()
