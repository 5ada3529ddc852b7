"""The demo's path, driven as a user drives it (kubectl, helm, kubectl port-forward) and checked:
the chart installs the operator in the cluster, the example fine-tunes the real Gemma 3 270M,
live progress and loss show in ``kubectl get gft``, the eval loss falls at least 5x, the
adapter on the output volume loads with peft and answers in the trained direction, TensorBoard
serves the run's scalars through the port-forward the demo prints, and a delete leaves only the
retained output claim.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.parse
from dataclasses import dataclass

import pytest
from conftest import wait_for
from operator_process import get_gft

from devcluster import demo as demo_mod

# Whichever of the tests runs first trains the run in its set-up: each may take 600 s.
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(600)]

NS, NAME = demo_mod.NAMESPACE, demo_mod.NAME
REPO = demo_mod.REPO
TRAINER_READY = 240  # seconds: a new trainer process imports torch and loads 270M on 2 cores


@pytest.fixture(scope="module")
def demo(cluster):
    d = demo_mod.Demo(cluster=cluster, say=lambda line: print(line, flush=True))
    try:
        d.install()
        yield d
    finally:
        # Even when the install failed half-way: an operator left running in the cluster
        # would act on every later test's fine-tunes beside that test's own operator.
        for proc in (d._live_forward, *d.background):
            if proc is not None:
                proc.kill()
        cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)
        with contextlib.suppress(demo_mod.DemoError):
            demo_mod.uninstall(d)


def gft(c) -> dict:
    return get_gft(c, NS, NAME)


def row(c) -> dict[str, str]:
    """``kubectl get gft``'s row by column name, as the user reads it."""
    header, line = c.kubectl("get", "gft", NAME, "-n", NS).stdout.splitlines()[:2]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    return dict(zip(names, cells, strict=True))


@dataclass
class Trained:
    live: dict[str, str]  # kubectl get gft's row while it trained
    done: dict  # the status once it ended
    final_row: dict[str, str]


# The demo's run, trained once and looked at by the tests below, each within its own timeout:
# 30 steps of the real 270M on 2 CPU cores. As one test (with a suspend and a resume, now the
# operator's tests' on the tiny model) it took 297 s on CI's machine alone, and 511 s of its
# 600 beside the suite's other sessions; the training alone is the larger part of that.
@pytest.fixture(scope="module")
def trained(demo) -> Trained:
    c = demo.cluster
    demo.apply()
    live = wait_for(
        "progress and loss in kubectl get gft",
        lambda: (r := row(c))["PHASE"] == "Running" and r["PROGRESS"] and r["LOSS"] and r,
        timeout=TRAINER_READY,
    )
    done = wait_for(
        "Succeeded",
        lambda: (s := gft(c).get("status") or {}).get("phase") in ("Succeeded", "Failed") and s,
        timeout=600,
    )
    return Trained(live=live, done=done, final_row=row(c))


def test_kubectl_get_gft_shows_the_run_live_and_its_result(trained):
    assert 0 <= float(trained.live["PROGRESS"]) < 100 and float(trained.live["LOSS"]) > 0
    done = trained.done
    assert done["phase"] == "Succeeded", done
    assert done["result"]["globalStep"] == 30
    assert trained.final_row["LOSS"], "the final loss stays in kubectl get gft"


def test_tensorboard_and_the_dashboard_show_the_run(demo, trained):
    done = trained.done
    # TensorBoard through the port-forward the demo prints: the run's scalars, by its name.
    demo.tensorboard()
    query = urllib.parse.urlencode({"run": f"{NS}/{NAME}", "tag": "eval/loss"})
    evals = json.loads(demo_mod._get(f"{demo.tensorboard_url}data/plugin/scalars/scalars?{query}"))
    steps = [int(step) for _, step, _ in evals]
    assert steps[0] == 0 and steps[-1] == 30, evals
    first, last = evals[0][2], done["result"]["evalLoss"]
    assert last * 5 <= first, f"eval loss {first} -> {last}: not a 5x fall"
    # TensorBoard's own page, in a real browser, through the same route: the run, its curve.
    # And the dashboard's run page with the real run's curves (GFT_SCREENSHOTS=1 writes the
    # screenshots the README shows).
    import browser

    with browser.chromium() as chromium:
        page = chromium.new_page(viewport={"width": 1280, "height": 900})
        page.goto(demo.tensorboard_url)
        page.get_by_text(f"{NS}/{NAME}").first.wait_for(timeout=60_000)
        page.get_by_text("train/loss").first.wait_for(timeout=60_000)
        page.close()
        page = chromium.new_page(viewport={"width": 1280, "height": 900})
        page.goto(demo.dashboard_url)
        page.fill("#token", demo.token_file.read_text().strip())
        page.click("#signin")
        page.locator(f"tr.row[data-key='{NS}/{NAME}']").wait_for()
        shots = os.environ.get("GFT_SCREENSHOTS") and REPO / "docs"
        if shots:
            page.screenshot(path=str(shots / "dashboard-list.png"))
        page.click(f"tr.row[data-key='{NS}/{NAME}']")
        page.locator("#curves figure.chart").first.wait_for(timeout=60_000)  # from TensorBoard
        # The demo's user may edit the namespace; a finished run offers Delete, not Stop.
        page.locator("#delete").wait_for(timeout=10_000)
        assert page.locator("#stop").count() == 0
        page.locator("#result", has_text="30 of 30").wait_for(timeout=10_000)  # its steps
        # The latest sample answers, from TensorBoard's text tab (their time budget, a share
        # of the run's, may have left some evaluations without).
        sample = page.locator("#samples .sample").first
        sample.wait_for(timeout=60_000)
        assert "Answer" in sample.inner_text() and "Prompt" in sample.inner_text()
        if shots:
            page.screenshot(path=str(shots / "dashboard-run.png"), full_page=True)
        page.close()

    # The dashboard, in the cluster, through its port-forward: signed in as the demo's user,
    # it lists the run and frames its TensorBoard (sandboxed, once the user may read the run).
    import requests

    browser = requests.Session()
    browser.get(demo.dashboard_url, timeout=10)
    csrf = {"X-CSRF-Token": browser.cookies.get("gft_csrf", "")}
    signed = browser.post(f"{demo.dashboard_url}api/login", headers=csrf, timeout=30,
                          json={"token": demo.token_file.read_text().strip()})  # fmt: skip
    assert signed.status_code == 200 and signed.json()["user"].endswith(":demo-user")
    listed = browser.get(f"{demo.dashboard_url}api/finetunes", timeout=30).json()["items"]
    (row_,) = [r for r in listed if (r["namespace"], r["name"]) == (NS, NAME)]
    assert row_["phase"] == "Succeeded" and row_["light"] == "done" and row_["percent"] == 100
    detail = browser.get(f"{demo.dashboard_url}api/finetunes/{NS}/{NAME}", timeout=30).json()
    assert detail["can"]["delete"] is True and detail["object"]["status"]["result"]
    # TensorBoard: by the ticket the run page frames it with (the frame sends no cookie).
    framed = browser.get(f"{demo.dashboard_url}api/finetunes/{NS}/{NAME}/tensorboard", timeout=30)
    root = demo.dashboard_url.rstrip("/")
    runs = requests.get(f"{root}{framed.json()['url']}data/runs", timeout=30)
    assert runs.status_code == 200 and f"{NS}/{NAME}" in runs.json(), runs.text
    assert "sandbox allow-scripts" in runs.headers["Content-Security-Policy"]


def test_the_adapter_answers_in_the_trained_direction(demo, trained):
    """The adapter loads from the output volume with peft and answers in the trained direction."""
    from devcluster.answers import base_and_adapter

    done = trained.done

    adapter = demo._adapter_on_this_machine(done)
    assert (adapter / "adapter_model.safetensors").exists()
    ((before, after),) = base_and_adapter(demo.model, adapter, [demo_mod.PROMPT])
    # Greedy answers vary from run to run on a busy machine's threads; the facts learnt do not.
    facts = ("Pip", "otter", "tiny GPU", "kelp", "Kelp Harbor", "Lora", "lighthouse")
    assert any(f in after for f in facts) and not any(f in before for f in facts), (before, after)


def test_delete_leaves_only_the_retained_output_claim(demo, trained):
    """Every child goes, the output claim is retained (reclaimPolicy Retain)."""
    c = demo.cluster
    c.kubectl("delete", "gft", NAME, "-n", NS, "--wait", "--timeout", "180s")
    kinds = "job,service,configmap,deployment,networkpolicy,ingress"
    left = c.kubectl_json("get", kinds, "-n", NS, "-l", f"finetune.gemma.dev/name={NAME}")
    assert left["items"] == [], [i["metadata"]["name"] for i in left["items"]]
    assert c.kubectl_json("get", "pvc", f"{NAME}-output", "-n", NS)["status"]["phase"] == "Bound"
