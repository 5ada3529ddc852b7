"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): a user signs in,
the list updates live when a fine-tune's status changes, the run page shows the read-only user
no controls, and an editor starts a fine-tune from the form (validated by the API server's dry
run) and suspends it through the confirmation dialog. (A real run's page, curves and all, is
looked at in tests/e2e/test_demo_flow.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import browser
import pytest
from conftest import wait_for
from playwright.sync_api import expect

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chromium():
    with browser.chromium() as launched:
        yield launched


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
    page.wait_for_selector("#phase")
    assert "Running" in page.locator("#phase").inner_text()
    assert page.locator("#stop").count() == 0 and page.locator("#suspend").count() == 0
    assert "not change it" in page.content()
    assert page.locator("iframe#tb").get_attribute("src").endswith(f"/tb/{team}/seen/")
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
    page.fill("#f-lr", "0.0002")
    page.click("#to-yaml")
    page.click("#create")
    page.wait_for_selector("#phase")
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
