"""gft-dashboard's server against the proving ground's real API server and RBAC, with two users
of different rights (service accounts bound to the built-in ``view`` and ``edit`` roles, which
the install's aggregated roles extend to GemmaFineTunes): what each sees, what each may do, the
live stream, the API server's own validation errors, and the refusals (no token, no CSRF token,
a forged request)."""

from __future__ import annotations

import json
import threading

import pytest
import yaml
from conftest import wait_for

from dashboard.client import Browser, finetune

pytestmark = [pytest.mark.cluster]


def test_no_token_no_entry(setup):
    anonymous = Browser(setup["base"])
    assert anonymous.get("/api/finetunes").status_code == 401
    assert anonymous.get("/api/stream").status_code == 401
    bad = anonymous.post("/api/login", {"token": "not-a-token"})
    assert bad.status_code == 401, bad.text
    page = anonymous.get("/")
    assert page.status_code == 200 and "app.js" in page.text
    csp = page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp


def test_each_user_sees_only_the_namespaces_they_may_list(setup):
    viewer = Browser(setup["base"], setup["tokens"]["viewer"])
    items = viewer.get("/api/finetunes").json()["items"]
    names = {(i["namespace"], i["name"]) for i in items}
    assert (setup["team"], "seen") in names
    assert not any(ns == setup["other"] for ns, _ in names)
    assert viewer.get("/api/whoami").json()["user"].endswith(f"{setup['team']}:viewer")


def test_the_stream_delivers_a_status_change_live(setup, cluster):
    viewer = Browser(setup["base"], setup["tokens"]["viewer"])
    events: list[tuple[str, dict]] = []

    def read():
        with viewer.get("/api/stream", stream=True) as r:
            kind = None
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[6:])))
                    if kind == "changed" and events[-1][1].get("percent") == 40.0:
                        return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_for("the snapshot", lambda: events and events[0][0] == "snapshot", timeout=20)
    assert {r["name"] for r in events[0][1]} >= {"seen"}
    assert "hidden" not in {r["name"] for r in events[0][1]}
    status = {"status": {"phase": "Running", "progress": {"step": 4, "totalSteps": 10,
                                                          "percent": 40.0}}}  # fmt: skip
    cluster.kubectl("patch", "gft", "seen", "-n", setup["team"], "--subresource=status",
                    "--type=merge", "-p", json.dumps(status))  # fmt: skip
    reader.join(timeout=20)
    changed = [d for k, d in events if k == "changed" and d["name"] == "seen"]
    assert changed and changed[-1]["percent"] == 40.0 and changed[-1]["light"] == "running"


def test_a_viewer_gets_no_controls_and_a_forged_request_is_refused(setup, cluster):
    team = setup["team"]
    viewer = Browser(setup["base"], setup["tokens"]["viewer"])
    detail = viewer.get(f"/api/finetunes/{team}/seen").json()
    assert detail["can"] == {"delete": False, "patch": False, "create": False,
                             "tryStart": False, "tryAsk": False}  # fmt: skip
    forged = viewer.delete(f"/api/finetunes/{team}/seen")
    assert forged.status_code == 403, forged.text
    assert viewer.post(f"/api/finetunes/{team}/seen/suspend").status_code == 403
    # Without the CSRF header the dashboard refuses before asking anyone.
    no_csrf = viewer.s.delete(f"{setup['base']}/api/finetunes/{team}/seen", timeout=10)
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
    assert cluster.kubectl("get", "gft", "seen", "-n", team).returncode == 0
    # TensorBoard is framed only for a fine-tune the user may read.
    assert viewer.get(f"/api/finetunes/{setup['other']}/hidden/tensorboard").status_code == 403
    assert viewer.get(f"/api/finetunes/{team}/seen/tensorboard").status_code == 200


def test_an_editor_starts_validates_suspends_and_stops(setup, cluster):
    team = setup["team"]
    editor = Browser(setup["base"], setup["tokens"]["editor"])
    broken = yaml.safe_dump(finetune("made-here", team, learningRate=-1))
    refused = editor.post("/api/finetunes", {"yaml": broken, "dryRun": True})
    assert refused.status_code == 422, refused.text
    assert "spec.training.learningRate" in refused.json()["error"]
    unparsable = editor.post("/api/finetunes", {"yaml": "kind: GemmaFineTune\nspec: [\n"})
    assert unparsable.status_code == 400 and "line 3" in unparsable.text, unparsable.text
    good = yaml.safe_dump(finetune("made-here", team))
    checked = editor.post("/api/finetunes", {"yaml": good, "dryRun": True})
    assert checked.status_code == 200, checked.text
    assert cluster.kubectl("get", "gft", "made-here", "-n", team, check=False).returncode != 0
    created = editor.post("/api/finetunes", {"yaml": good})
    assert created.status_code == 201, created.text
    assert editor.get(f"/api/finetunes/{team}/made-here").json()["can"]["delete"] is True
    suspended = editor.post(f"/api/finetunes/{team}/made-here/suspend")
    assert suspended.status_code == 200 and suspended.json()["summary"]["suspend"] is True
    spec = cluster.kubectl_json("get", "gft", "made-here", "-n", team)["spec"]
    assert spec["suspend"] is True
    assert editor.delete(f"/api/finetunes/{team}/made-here").status_code == 200
    # Not in another team's namespace: the API server says no, the dashboard passes it on.
    other = yaml.safe_dump(finetune("x", setup["other"]))
    elsewhere = editor.post("/api/finetunes", {"yaml": other})
    assert elsewhere.status_code == 403, elsewhere.text


def test_behind_an_authenticating_proxy_the_named_user_is_impersonated(setup, cluster):
    """--auth proxy: the X-Forwarded-User/-Groups of the proxy in front are who acts; the
    dashboard impersonates them, so the API server's RBAC applies to that user."""
    team = setup["team"]
    cluster.kubectl("create", "rolebinding", "grace", "--clusterrole=view", "--user=grace",
                    "-n", team)  # fmt: skip
    proc, base = setup["start"]("--auth", "proxy")
    try:
        viewer = Browser(base)
        viewer.s.headers.update({"X-Forwarded-User": "grace", "X-Forwarded-Groups": "ml,dev"})
        names = {(i["namespace"], i["name"]) for i in viewer.get("/api/finetunes").json()["items"]}
        assert (team, "seen") in names and not any(ns == setup["other"] for ns, _ in names)
        assert viewer.delete(f"/api/finetunes/{team}/seen").status_code == 403
        assert Browser(base).get("/api/finetunes").status_code == 401  # no header, no one
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        cluster.kubectl("delete", "rolebinding", "grace", "-n", team, check=False)
