"""The dashboard's edges under a hostile user (the review of issue 24's dashboard, findings 4, 13
and 14), against the shared dashboard of conftest.py: sign-ins that would push others out,
cookies tossed in from a sibling domain, and refusals that echo what they were sent."""

from __future__ import annotations

import pytest
import requests

from dashboard.client import Browser

pytestmark = [pytest.mark.cluster]


def _token(cluster, ns: str, name: str) -> str:
    cluster.kubectl("create", "serviceaccount", name, "-n", ns)
    cluster.kubectl("create", "rolebinding", name, "--clusterrole=view",
                    f"--serviceaccount={ns}:{name}", "-n", ns)  # fmt: skip
    return cluster.kubectl("create", "token", name, "-n", ns).stdout.strip()


# -- 4. Signing in again and again: one session per token, and a rate per user -----------------


def test_a_token_signing_in_again_keeps_its_session_and_a_flood_of_sign_ins_is_slowed(
    setup, cluster
):
    base = setup["base"]
    token = _token(cluster, setup["team"], "signs-in-a-lot")
    first, second = Browser(base, token), Browser(base, token)
    assert first.s.cookies["gft_session"] == second.s.cookies["gft_session"]
    victim = Browser(base, setup["tokens"]["viewer"])
    statuses = []
    for _ in range(70):
        statuses.append(first.post("/api/login", {"token": token}).status_code)
    assert set(statuses) == {200, 429} and statuses[0] == 200, statuses
    refused = first.post("/api/login", {"token": token})
    assert refused.status_code == 429 and "wait a minute" in refused.text, refused.text
    assert victim.get("/api/finetunes").status_code == 200  # nobody else was signed out
    assert first.get("/api/finetunes").status_code == 200  # nor the one signing in


# -- 13. A cookie of ours that comes twice is refused, not chosen ------------------------------


def test_a_session_or_csrf_cookie_that_comes_twice_is_refused(setup):
    user = Browser(setup["base"], setup["tokens"]["viewer"])
    session = user.s.cookies["gft_session"]
    # What a browser sends when a sibling subdomain set gft_session for a longer path.
    for cookie in (f"gft_session=tossed; gft_session={session}", "gft_csrf=a; gft_csrf=b"):
        got = requests.get(setup["base"] + "/api/finetunes", headers={"Cookie": cookie},
                           timeout=10)  # fmt: skip
        assert got.status_code == 400 and "came twice" in got.text, (cookie, got.status_code)
    alone = requests.get(setup["base"] + "/api/finetunes",
                         headers={"Cookie": f"gft_session={session}"}, timeout=10)  # fmt: skip
    assert alone.status_code == 200


# -- 14. Refusals carry the security headers too -----------------------------------------------


def test_refusals_carry_the_security_headers(setup):
    base = setup["base"]
    editor = Browser(base, setup["tokens"]["editor"])
    for path in ("/api/finetunes/Bad%3Cb%3E/x", "/api/whoami", "/no/such/page"):
        got = requests.get(base + path, timeout=10, cookies=(
            editor.s.cookies if path.startswith("/api/finetunes") else None))  # fmt: skip
        assert got.status_code >= 400, (path, got.status_code)
        csp = got.headers.get("Content-Security-Policy", "")
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, (path, got.headers)
        assert got.headers.get("X-Content-Type-Options") == "nosniff", (path, got.headers)
    echoed = requests.get(base + "/api/finetunes/Bad%3Cb%3E/x", cookies=editor.s.cookies,
                          timeout=10)  # fmt: skip
    assert echoed.status_code == 400 and "Bad<b>" in echoed.text  # echoed, but never HTML
    # TensorBoard's paths: the sandbox, on a refusal as on an answer.
    for path in ("/tb/Bad%3Cb%3E/x/ticket/", f"/tb/{setup['team']}/seen/no-such-ticket/"):
        got = requests.get(base + path, timeout=10)
        assert got.status_code in (400, 403), (path, got.status_code)
        csp = got.headers.get("Content-Security-Policy", "")
        assert csp.startswith("sandbox allow-scripts;"), (path, csp)
