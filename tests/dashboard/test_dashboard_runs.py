"""The dashboard as the place where fine-tunes are compared and understood (issue 27), in
headless Chromium and through its API, on real runs that train on the runner node through the
real operator (tests/dashboard/runs.py): a log that opens at the present of a long run, two
runs compared (curves overlaid, the settings that differ, results, cost, answers), a run page
that follows its run to its end (Stop), a Try-it answer from a finished run's adapter, the
list as a workbench, and the page used without a mouse, in the dark and at phone width.
``GFT_SCREENSHOTS=1`` writes the README's screenshots of the list, a live run page and a
comparison (docs/dashboard-{workbench,live-run,compare}.png; the demo's own,
docs/dashboard-{list,run}.png, come from tests/e2e/test_demo_flow.py)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from conftest import wait_for
from operator_process import start_operator, wait_phase
from playwright.sync_api import expect
from runner_runs import model_dir  # noqa: F401 (a fixture: the tiny Gemma 3 the runs train)

from dashboard import runs as lab_runs
from dashboard.client import Browser

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "docs" if os.environ.get("GFT_SCREENSHOTS") else None
TRAINED = 420  # seconds for three tiny runs to start (torch imports) and train, on 2 busy cores


@pytest.fixture(scope="module")
def lab(setup, cluster, tmp_path_factory):
    ns, tokens = lab_runs.lab_namespace(cluster)
    operator = start_operator(cluster, tmp_path_factory, "--namespace", ns,
                              "--metrics-interval", "2")  # fmt: skip
    lab_runs.chatty(cluster, setup["team"])
    yield {"ns": ns, "tokens": tokens, "operator": operator, "applied": set()}
    operator.kill(signal.SIGTERM)
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    cluster.kubectl("delete", "pv", "-l", f"gft-test/lab={ns}", "--wait=false", check=False)
    cluster.kubectl("delete", "pod", "chatty-0", "-n", setup["team"], "--wait=false", check=False)


@pytest.fixture(scope="module")
def trained(lab, cluster, model_dir):  # noqa: F811 (the fixture imported above)
    """The three runs, applied (once) and started; ``calm`` and ``bold`` waited for."""
    found = lab_runs.runs(model_dir)
    lab_runs.runner_claims(cluster, lab["ns"], list(found))
    for ft in found.values():
        cluster.kubectl("apply", "-n", lab["ns"], "-f", "-", input=json.dumps(ft))
    for name in ("calm", "bold"):
        wait_phase(cluster, lab["ns"], name, "Succeeded", timeout=TRAINED)
    return lab


def signed_in(chromium, base: str, token: str, **context):
    context = {"viewport": {"width": 1280, "height": 900}, **context}  # a test's own wins
    page = chromium.new_context(**context).new_page()
    page.goto(f"{base}/")
    page.fill("#token", token)
    page.click("#signin")
    page.wait_for_selector("#list")
    return page


def labelled(page, label: str):
    """The control a label names: by the label's first words, as a label wrapping a select, a
    range's output or a checkbox also holds the control's own text ("Namespace any ...")."""
    return page.get_by_label(re.compile(rf"^\s*{label}\b"))  # labels are plain words


def shot(page, name: str, **kw) -> None:
    if SHOTS is not None:
        page.screenshot(path=str(SHOTS / name), **kw)


# -- 1. Logs that follow the present --------------------------------------------------------------


def test_a_long_log_opens_at_its_present_and_loads_earlier_lines(setup, lab, chromium):
    team = setup["team"]
    viewer = Browser(setup["base"], setup["tokens"]["viewer"])

    def tail():
        got = viewer.get(f"/api/finetunes/{team}/chatty/log?follow=0&tailLines=3")
        steps = [int(m) for m in re.findall(r"^step (\d+):", got.text, re.M)]
        return len(steps) == 3 and steps[0] >= 29_990 and steps

    # The log API's tail, not its first megabyte (which showed step 0 onwards, for ever).
    steps = wait_for("the tail of chatty's log", tail, timeout=120)
    assert steps == sorted(steps) and steps[-1] - steps[0] == 2
    page = signed_in(chromium, setup["base"], setup["tokens"]["viewer"])
    page.goto(f"{setup['base']}/#/ft/{team}/chatty")
    log = page.locator("#log")
    expect(log.locator("div").last).to_contain_text(re.compile(r"step 3\d{4}:"), timeout=30_000)
    assert "step 0:" not in log.inner_text()
    assert log.locator("div").count() <= 1000
    # It follows: newer steps arrive on the page's one stream.
    last = int(re.search(r"step (\d+):", log.locator("div").last.inner_text()).group(1))
    expect(log.locator("div").last).not_to_contain_text(f"step {last}:", timeout=15_000)
    # Earlier lines on demand, in order, before the first one shown.
    first = int(re.search(r"step (\d+):", log.locator("div").first.inner_text()).group(1))
    page.click("#log-earlier")
    expect(log.locator("div").first).to_contain_text(f"step {first - 500}:", timeout=15_000)
    # Search narrows what is shown; a download is the whole log, as a file.
    page.fill("#log-search", f"step {first}:")
    expect(page.locator("#log-count")).to_contain_text("1 of")
    with page.expect_download() as download:
        page.click("#log-download")
    text = Path(download.value.path()).read_text()
    assert text.startswith("step 0:") and f"step {last}:" in text
    page.close()


# -- 2. Compare runs ----------------------------------------------------------------------------


@pytest.mark.timeout(TRAINED + 120)
def test_two_real_runs_compared_side_by_side(trained, setup, cluster, chromium):
    ns = trained["ns"]
    editor = Browser(setup["base"], trained["tokens"]["editor"])
    got = editor.get(f"/api/compare?run={ns}/calm&run={ns}/bold")
    assert got.status_code == 200, got.text
    c = got.json()
    differs = {d["path"]: d["values"] for d in c["settings"]["differs"]}
    assert differs["training.learningRate"] == [0.002, 0.02]
    assert differs["method.lora.r"] == [4, 8]
    assert "training.maxSteps" in {d["path"] for d in c["settings"]["same"]}
    for run in c["runs"]:
        o = run["outcome"]
        assert o["phase"] == "Succeeded" and o["steps"] == 12 and o["evalLoss"] is not None
        assert o["gpuSeconds"] > 0 and o["energyWh"] > 0, o  # the stand-in GPU's 300 W
    prompts = {s["prompt"]: s["answers"] for s in c["samples"]}
    assert set(lab_runs.PROMPTS) <= set(prompts) and all(all(a) for a in prompts.values())
    # A run the user may not read is named in the refusal.
    hidden = editor.get(f"/api/compare?run={ns}/calm&run={setup['other']}/hidden")
    assert hidden.status_code == 403 and f"{setup['other']}/hidden" in hidden.text

    page = signed_in(chromium, setup["base"], trained["tokens"]["editor"])
    for name in ("calm", "bold"):
        page.check(f"tr.row[data-key='{ns}/{name}'] input[type=checkbox]")
    shot(page, "dashboard-workbench.png")
    page.click("#compare")
    expect(page.locator("#compare-title")).to_contain_text("Comparing 2 runs")
    loss = page.locator("figure.chart", has_text="Training loss")
    expect(loss).to_have_attribute("data-series", "2", timeout=60_000)  # overlaid, one per run
    expect(page.locator("#differs")).to_contain_text("training.learningRate")
    expect(page.locator("#differs")).to_contain_text("method.lora.r")
    assert page.locator("details#same").get_attribute("open") is None  # folded
    expect(page.locator("#outcomes")).to_contain_text("Energy (Wh)")
    expect(page.locator("#compare-samples")).to_contain_text("Capital of Spain?")
    shot(page, "dashboard-compare.png", full_page=True)
    # The address is the comparison: opened as it is, it shows the same.
    url = page.url
    again = page.context.new_page()
    again.goto(url)
    expect(again.locator("#differs")).to_contain_text("training.learningRate")
    again.goto(url + "&x=time")
    expect(again.locator("figure.chart", has_text="Training loss")).to_have_attribute(
        "data-series", "2", timeout=60_000
    )
    expect(again.locator("figure.chart figcaption").first).to_be_visible()
    page.context.close()


# -- 3 and 6. The run page is live, and Stop ends a run as finished ------------------------------


class Connections:
    """The requests of a page that have not finished: its long connections."""

    def __init__(self, page) -> None:
        self.open: dict = {}
        page.on("request", lambda r: self.open.__setitem__(id(r), r.url))
        page.on("requestfinished", lambda r: self.open.pop(id(r), None))
        page.on("requestfailed", lambda r: self.open.pop(id(r), None))

    def long(self) -> list[str]:
        return [u for u in self.open.values() if "/api/" in u]


@pytest.mark.timeout(TRAINED + 240)
def test_the_run_page_follows_its_run_to_the_end_on_one_connection(
    trained, setup, cluster, chromium
):
    ns = trained["ns"]
    wait_phase(cluster, ns, "long", "Running", "TrainerRunning", timeout=TRAINED)
    page = signed_in(chromium, setup["base"], trained["tokens"]["editor"])
    context = page.context
    tabs = []
    for _ in range(4):  # the fourth tab stalled when each held two connections
        tab = context.new_page()
        watched = Connections(tab)
        tab.goto(f"{setup['base']}/#/ft/{ns}/long")
        tabs.append((tab, watched))
    for tab, watched in tabs:
        expect(tab.locator("#phase")).to_contain_text("Running", timeout=30_000)
        expect(tab.locator("#log div").last).to_contain_text("step", timeout=60_000)
        # Short reads come and go (GPUs, TensorBoard); one connection stays: the run's stream.
        # (Playwright hands events over while it is called: the check waits through it.)
        wait_for("one long connection",
                 lambda t=tab, w=watched: t.wait_for_timeout(100) or len(w.long()) == 1,
                 timeout=30, interval=0.05, on_timeout=watched.long)  # fmt: skip
        assert "/live" in watched.long()[0], watched.long()
    for tab, _ in tabs[1:]:
        tab.close()
    tab = tabs[0][0]
    expect(tab.locator("#suspend")).to_be_visible()
    shot(tab, "dashboard-live-run.png", full_page=True)
    tab.click("#stop")
    expect(tab.locator("dialog#confirm")).to_be_visible()
    confirm = tab.locator("#confirm-text").inner_text()
    assert "checkpoint" in confirm and "Kept" in confirm and "cannot be resumed" in confirm
    tab.click("#confirm-ok")
    # No reload: the stream redraws the phase, the conditions and the buttons as it ends.
    expect(tab.locator("#phase")).to_contain_text("Succeeded · Stopped", timeout=120_000)
    expect(tab.locator("#conditions tr[data-type=Complete]")).to_contain_text("True")
    expect(tab.locator("#result")).to_contain_text("Stopped")
    assert tab.locator("#suspend").count() == 0 and tab.locator("#stop").count() == 0
    expect(tab.locator("#delete")).to_be_visible()
    status = cluster.kubectl_json("get", "gft", "long", "-n", ns)["status"]
    assert status["reason"] == "Stopped" and status["result"]["outcome"] == "Stopped"
    assert status["lastCheckpoint"]["step"] == status["result"]["globalStep"], status
    assert status["result"]["cost"]["gpuSeconds"] > 0
    # A stop cannot be undone: the API server says so, naming the field.
    undo = cluster.kubectl("patch", "gft", "long", "-n", ns, "--type=merge",
                           "-p", '{"spec":{"stop":false}}', check=False)  # fmt: skip
    assert undo.returncode != 0 and "stop cannot be undone" in undo.stderr, undo.stderr
    # A finished run's page asks nothing more of TensorBoard or the GPUs, once it has its
    # curves (from the TensorBoard the operator keeps up after the run).
    asked: list[str] = []
    tab.on("request", lambda r: asked.append(r.url))

    def quiet() -> bool:
        asked.clear()
        tab.wait_for_timeout(12_000)  # twice the page's refresh period, and more
        return not [u for u in asked if "/tb/" in u or "/gpus" in u]

    wait_for("the finished run's page to stop reading", quiet, timeout=180, interval=0)
    expect(tab.locator("#curves figure.chart").first).to_be_visible()
    context.close()


# -- 10. Try it ------------------------------------------------------------------------------------


@pytest.mark.timeout(TRAINED + 300)
def test_try_it_answers_with_the_runs_adapter_beside_the_base_model(
    trained, setup, cluster, chromium
):
    from runner_runs import run_dir

    ns = trained["ns"]
    viewer = Browser(setup["base"], trained["tokens"]["viewer"])
    assert viewer.post(f"/api/finetunes/{ns}/calm/try").status_code == 403  # may not create pods
    page = signed_in(chromium, setup["base"], trained["tokens"]["editor"])
    page.goto(f"{setup['base']}/#/ft/{ns}/calm")
    expect(page.locator("#try")).to_be_visible(timeout=30_000)
    page.click("#try-start")
    expect(page.locator("#try-state")).to_contain_text("Ready", timeout=240_000)
    (pod,) = cluster.kubectl_json("get", "pods", "-n", ns, "-l",
                                  "finetune.gemma.dev/try-of=calm")["items"]  # fmt: skip
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "GemmaFineTune"
    page.fill("#try-prompt", "Capital of Spain?")
    page.click("#try-ask")
    expect(page.locator("#try-base-note")).to_contain_text("tokens", timeout=120_000)
    shown = {m: page.locator(f"#try-{m}").text_content() for m in ("tuned", "base")}
    want = lab_runs.greedy_answers(cluster, ns, "calm", run_dir(cluster, ns, "calm"),
                                   "Capital of Spain?", 256)  # fmt: skip
    assert shown == want, (shown, want)  # the run's adapter, greedily; and the base's
    # Left alone, it ends by itself (the session dashboard's --try-idle-seconds 30).
    wait_for("the Try-it pod to stop when idle", lambda: cluster.kubectl_json(
        "get", "pod", pod["metadata"]["name"], "-n", ns)["status"].get("phase") == "Succeeded",
        timeout=120)  # fmt: skip
    page.context.close()


# -- 5. The list as a workbench; 9. usable without a mouse, in the dark, at phone width ---------


def test_the_list_is_a_workbench_for_the_keyboard_too(trained, setup, chromium):
    ns = trained["ns"]
    page = signed_in(chromium, setup["base"], trained["tokens"]["editor"])
    row = lambda name: page.locator(f"tr.row[data-key='{ns}/{name}']")  # noqa: E731
    expect(row("bold")).to_contain_text("tiny-gemma3")
    expect(row("bold")).to_contain_text("lora")
    expect(row("bold").locator("td.c-cost")).to_contain_text("Wh")  # its cost, from the trainer
    assert re.search(r"\d", row("bold").locator("td.c-evalLoss").inner_text())
    # Status in words, not by colour alone.
    expect(row("bold").locator("td.c-phase")).to_contain_text("Succeeded")
    page.get_by_label("Search").fill("bol")
    expect(page.locator("tr.row")).to_have_count(1)
    page.get_by_label("Search").fill("")
    page.get_by_label("Phase").select_option("Succeeded")
    expect(page.locator("tr.row")).to_have_count(3)
    heading = page.locator("th[data-key=name]")
    heading.locator("button").click()
    expect(heading).to_have_attribute("aria-sort", "descending")  # it was sorted by name
    expect(page.locator("tr.row").first).to_have_attribute("data-key", f"{ns}/long")
    heading.locator("button").click()
    expect(page.locator("tr.row").first).to_have_attribute("data-key", f"{ns}/bold")
    # Rows are links: the keyboard reaches them and opens the run.
    link = page.locator(f"a[href='#/ft/{ns}/bold']")
    for _ in range(60):
        page.keyboard.press("Tab")
        if link.evaluate("a => a === document.activeElement"):
            break
    else:
        pytest.fail("the keyboard never reached the run's link")
    page.keyboard.press("Enter")
    expect(page.locator("#run-title")).to_contain_text(f"{ns}/bold")
    page.context.close()
    # A viewer is offered no Start (no New, no Clone) and no controls.
    viewer = signed_in(chromium, setup["base"], trained["tokens"]["viewer"])
    expect(viewer.locator("#new-link")).to_be_hidden()
    viewer.goto(f"{setup['base']}/#/ft/{ns}/bold")
    expect(viewer.locator("#controls")).to_contain_text("not change it")
    assert viewer.locator("#clone").count() == 0 and viewer.locator("#try").is_hidden()
    viewer.context.close()


def test_at_phone_width_in_the_dark_with_labels_for_every_control(trained, setup, chromium):
    ns = trained["ns"]
    page = signed_in(chromium, setup["base"], trained["tokens"]["viewer"],
                     viewport={"width": 390, "height": 844}, color_scheme="dark")  # fmt: skip
    background = page.locator("body").evaluate("b => getComputedStyle(b).backgroundColor")
    assert background == "rgb(13, 17, 23)", background  # the dark palette, from the system
    for label in ("Search", "Namespace", "Phase", "Model", "Method"):
        expect(labelled(page, label)).to_be_visible()
    fits = "() => document.documentElement.scrollWidth <= innerWidth"
    assert page.evaluate(fits), "the list is wider than the phone"
    page.goto(f"{setup['base']}/#/ft/{ns}/calm")
    expect(page.locator("#curves figure.chart").first).to_be_visible(timeout=60_000)
    for label in ("Smoothing", "Log scale", "From", "to", "Pod", "Previous container", "Wrap"):
        expect(labelled(page, label)).to_be_attached()
    assert page.evaluate(fits), "the run page is wider than the phone"
    page.context.close()
