"""The dashboard in a cluster that several teams share (issue 24): what one namespace's user
must not be able to do to another's, or to the dashboard itself. Each test is one finding of
the review; all run against the proving ground's real API server and RBAC, the shared dashboard
of conftest.py (token mode, under /gft) and the pods it puts on the runner node."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time

import pytest
import requests
import yaml
from conftest import wait_for

from dashboard import pods
from dashboard.client import Browser, finetune, free_port

pytestmark = [pytest.mark.cluster]


def ticket_url(user: Browser, ns: str, name: str) -> str:
    """The TensorBoard address the run page frames (path with the ticket, trailing slash)."""
    got = user.get(f"/api/finetunes/{ns}/{name}/tensorboard")
    assert got.status_code == 200, got.text
    return got.json()["url"]


def tensorboard_up(root: str, url: str, path: str = ""):
    def answered():
        r = requests.get(root + url + path, timeout=10)
        return r if r.status_code == 200 else None

    return wait_for(f"TensorBoard at {url}{path}", answered, timeout=90)


# -- 1. TensorBoard's content never runs on the dashboard's origin ----------------------------


def test_tensorboard_is_served_sandboxed_by_ticket_and_follows_no_redirect(setup):
    team, root = setup["team"], setup["root"]
    editor = Browser(setup["base"], setup["tokens"]["editor"])
    url = ticket_url(editor, team, "hostile")
    assert url.startswith(f"/gft/tb/{team}/hostile/") and url.endswith("/")
    # The ticket is the credential: the sandboxed frame has no cookies to send.
    page = tensorboard_up(root, url)
    csp = page.headers["Content-Security-Policy"]
    assert "sandbox allow-scripts" in csp and "allow-same-origin" not in csp, csp
    assert "frame-ancestors 'self'" in csp and "connect-src 'self'" in csp, csp
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert "tb-frame.js" in page.text  # our shim goes in first; the page's own script stays
    # Without a ticket, with a made-up one, or with this one for another fine-tune: nothing.
    assert requests.get(f"{root}/gft/tb/{team}/hostile/", timeout=10).status_code in (403, 404)
    forged = url.rstrip("/").rsplit("/", 1)[0] + "/not-a-ticket/"
    assert requests.get(root + forged, timeout=10).status_code == 403
    assert requests.get(root + url.replace("/hostile/", "/seen/"), timeout=10).status_code == 403
    # An upstream redirect is answered as an error, never followed; nor is a huge answer kept.
    moved = requests.get(root + url + "redirect", timeout=30, allow_redirects=False)
    assert moved.status_code == 502 and "redirect" in moved.text, moved.text
    big = requests.get(root + url + "big", timeout=60)
    assert big.status_code == 502 and "larger than" in big.text, big.text[:200]


# -- 2. TensorBoard's data POSTs, for a user who may read the fine-tune ------------------------


def test_tensorboards_data_posts_pass_for_a_reader_and_nothing_else_does(setup):
    team, root = setup["team"], setup["root"]
    viewer = Browser(setup["base"], setup["tokens"]["viewer"])
    url = ticket_url(viewer, team, "seen")
    tensorboard_up(root, url, "data/runs")
    series = [{"plugin": "scalars", "tag": "train/loss", "run": f"{team}/seen"}]
    got = requests.post(root + url + "data/plugin/timeseries/timeSeries",
                        data={"requests": json.dumps(series)},
                        headers={"X-XSRF-Protected": "1"}, timeout=30)  # fmt: skip
    assert got.status_code == 200, got.text
    points = got.json()[0]["runToSeries"][f"{team}/seen"]
    assert len(points) == 20 and points[0]["value"] == 3.0
    # Only TensorBoard's data endpoints take a POST.
    other = requests.post(root + url + "data/runs", headers={"X-XSRF-Protected": "1"}, timeout=30)
    assert other.status_code == 405, other.text
    # A user who may not read the fine-tune gets no ticket for it.
    assert viewer.get(f"/api/finetunes/{setup['other']}/hidden/tensorboard").status_code == 403


# -- 3. Proxy mode: identity only from the hop nobody else reaches, never a system: group -----


def test_proxy_mode_listens_on_loopback_only_and_never_impersonates_system_groups(setup, cluster):
    team = setup["team"]
    # Anywhere but loopback it refuses to start: only the sidecar may reach it.
    port = free_port()
    outside = subprocess.Popen(
        [sys.executable, "-m", "gft_dashboard", "--auth", "proxy", "--address",
         f"0.0.0.0:{port}", "--kubeconfig", str(cluster.kubeconfig)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out, _ = outside.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        outside.kill()
        pytest.fail("--auth proxy started listening on 0.0.0.0, reachable by every pod")
    assert outside.returncode == 2 and "loopback" in out, out
    group = f"gft-team-{team}"
    cluster.kubectl("create", "rolebinding", "proxied-team", "--clusterrole=view",
                    f"--group={group}", "-n", team)  # fmt: skip
    proc, base = setup["start"]("--auth", "proxy")
    try:
        forged = Browser(base)
        forged.s.headers.update({"X-Forwarded-User": "mallory",
                                 "X-Forwarded-Groups": "system:masters"})  # fmt: skip
        refused = forged.get("/api/finetunes")
        assert refused.status_code == 403 and "system:masters" in refused.text, refused.text
        dry = forged.post("/api/finetunes", {"yaml": yaml.safe_dump(finetune("x", "kube-system")),
                                             "dryRun": True})  # fmt: skip
        assert dry.status_code == 403, dry.text
        as_system = Browser(base)
        as_system.s.headers.update({"X-Forwarded-User": "system:admin"})
        assert as_system.get("/api/finetunes").status_code == 403
        # Only oauth2-proxy's X-Forwarded-* name a user (it strips them from what it is sent).
        other_header = Browser(base)
        other_header.s.headers.update({"X-Auth-Request-User": "ada@example.com"})
        assert other_header.get("/api/finetunes").status_code == 401
        ada = Browser(base)
        ada.s.headers.update({"X-Forwarded-User": "ada@example.com", "X-Forwarded-Groups": group})
        names = {(i["namespace"], i["name"]) for i in ada.get("/api/finetunes").json()["items"]}
        assert (team, "seen") in names and not any(ns == setup["other"] for ns, _ in names)
        assert ada.get("/api/whoami").json()["user"] == "ada@example.com"
        assert ada.delete(f"/api/finetunes/{team}/seen").status_code == 403  # view only
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        cluster.kubectl("delete", "rolebinding", "proxied-team", "-n", team, check=False)


# -- 4. Nothing parsed before the caller is authenticated --------------------------------------


def test_nothing_is_parsed_before_the_caller_is_known_and_aliases_are_refused(setup):
    stranger = Browser(setup["base"])
    for cookie in ("gft_session", "gft_token"):
        stranger.s.cookies.set(cookie, "junk", path="/")
    # A body that does not parse: a stranger is told who they are not, not what the YAML is.
    unparsable = stranger.post("/api/finetunes", {"yaml": "kind: GemmaFineTune\nspec: [\n"})
    assert unparsable.status_code == 401, unparsable.text
    editor = Browser(setup["base"], setup["tokens"]["editor"])
    levels = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    levels += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    bomb = editor.post("/api/finetunes", {"yaml": "\n".join(levels) + "\n", "dryRun": True})
    assert bomb.status_code == 400 and "alias" in bomb.text and "line 2" in bomb.text, bomb.text
    huge = editor.post("/api/finetunes", {"yaml": "#" * (2 << 20), "dryRun": True})
    assert huge.status_code == 413, huge.text[:200]


# -- 5. Every path parameter is a Kubernetes name before a URL is built ------------------------

ROUTES = [
    ("GET", "/api/finetunes/{ns}/{name}"),
    ("DELETE", "/api/finetunes/{ns}/{name}"),
    ("GET", "/api/finetunes/{ns}/{name}/log"),
    ("GET", "/api/finetunes/{ns}/{name}/gpus"),
    ("GET", "/api/finetunes/{ns}/{name}/tensorboard"),
    ("POST", "/api/finetunes/{ns}/{name}/suspend"),
    ("POST", "/api/finetunes/{ns}/{name}/resume"),
    ("GET", "/tb/{ns}/{name}/ticket/"),
    ("POST", "/tb/{ns}/{name}/ticket/data/plugin/timeseries/timeSeries"),
]
BAD = [
    ("kube-system%2Fpods", "x", "namespace"),
    ("..%2Fkube-system", "x", "namespace"),
    ("Team", "x", "namespace"),
    ("{team}", "a%2F..%2Fb", "name"),
    ("{team}", "%2E%2E", "name"),
    ("{team}", "x" * 254, "name"),
]


@pytest.mark.parametrize(("method", "route"), ROUTES, ids=[f"{m} {r}" for m, r in ROUTES])
def test_every_route_checks_its_names_before_building_a_url(setup, method, route):
    editor = Browser(setup["base"], setup["tokens"]["editor"])
    for ns, name, which in BAD:
        path = route.format(ns=ns.format(team=setup["team"]), name=name)
        got = editor.s.request(method, setup["base"] + path, headers={
            **editor.headers(), "X-XSRF-Protected": "1"}, timeout=30)  # fmt: skip
        assert got.status_code == 400 and which in got.text, (path, got.status_code, got.text)


def test_a_namespace_in_the_body_is_checked_too(setup):
    editor = Browser(setup["base"], setup["tokens"]["editor"])
    manifest = finetune("x", "../kube-system")
    got = editor.post("/api/finetunes", {"yaml": yaml.safe_dump(manifest), "dryRun": True})
    assert got.status_code == 400 and "metadata.namespace" in got.text, got.text


# -- 6. One user cannot starve the others -------------------------------------------------------


def test_one_users_forty_followed_logs_do_not_slow_another_users_request(setup, cluster):
    team, base = setup["team"], setup["base"]
    # The editor signs in with three tokens of their own: the limit is theirs, not a token's.
    tokens = [cluster.kubectl("create", "token", "editor", "-n", team).stdout.strip()
              for _ in range(3)]  # fmt: skip
    editors = [Browser(base, token) for token in tokens]
    statuses: list[int] = []
    opened: list[requests.Response] = []
    guard = threading.Lock()

    def follow(editor: Browser):
        s = requests.Session()
        s.cookies.update(editor.s.cookies)
        r = s.get(f"{base}/api/finetunes/{team}/seen/log", stream=True, timeout=60)
        with guard:
            statuses.append(r.status_code)
            opened.append(r)

    threads = [
        threading.Thread(target=follow, args=(editors[i % 3],), daemon=True) for i in range(40)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert len(statuses) == 40, statuses
        held = statuses.count(200)
        assert 1 <= held <= 12 and statuses.count(429) == 40 - held, statuses
        limited = next(r for r in opened if r.status_code == 429)
        assert "at most" in limited.text, limited.text
        # Meanwhile another user is served at once, their own followed log included.
        viewer = Browser(base, setup["tokens"]["viewer"])
        started = time.monotonic()
        assert viewer.get(f"/api/finetunes/{team}/seen").status_code == 200
        with viewer.get(f"/api/finetunes/{team}/seen/log", stream=True) as own:
            assert own.status_code == 200
            assert b"step" in next(own.iter_content(chunk_size=None))
        assert time.monotonic() - started < 10, "another user's requests were held up"
    finally:
        for r in opened:
            r.close()


# -- 7. The session is an opaque id, scoped to the prefix, ended by logout ---------------------


def _claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_the_session_cookie_is_opaque_scoped_and_ends_at_logout(setup):
    token = setup["tokens"]["viewer"]
    user = Browser(setup["base"])
    signed = user.post("/api/login", {"token": token})
    assert signed.status_code == 200, signed.text
    header = signed.headers["Set-Cookie"]
    assert token not in header and token not in json.dumps(dict(user.s.cookies))
    session = next(c for c in user.s.cookies if c.name == "gft_session")
    assert session.path == "/gft/" and session.has_nonstandard_attr("HttpOnly")
    assert "samesite=strict" in header.lower()
    assert session.expires is not None and session.expires <= _claims(token)["exp"] + 1
    assert user.get("/api/finetunes").status_code == 200
    stolen = dict(user.s.cookies)
    assert user.post("/api/logout").status_code == 200
    replay = requests.get(setup["base"] + "/api/finetunes", cookies=stolen, timeout=10)
    assert replay.status_code == 401, replay.text


# -- 8. Streams re-check the user's rights, and say when the session has expired --------------


class Stream(threading.Thread):
    """Reads a stream (server-sent events or a followed log) until it ends."""

    def __init__(self, user: Browser, path: str) -> None:
        super().__init__(daemon=True)
        self.user, self.path, self.lines, self.ended = user, path, [], threading.Event()

    def run(self) -> None:
        try:
            with self.user.get(self.path, stream=True) as r:
                for line in r.iter_lines(decode_unicode=True):
                    self.lines.append(line)
        except requests.RequestException as e:
            self.lines.append(f"[error {e}]")
        self.ended.set()


def _user(cluster, ns: str, name: str) -> str:
    cluster.kubectl("create", "serviceaccount", name, "-n", ns)
    cluster.kubectl("create", "rolebinding", name, "--clusterrole=view",
                    f"--serviceaccount={ns}:{name}", "-n", ns)  # fmt: skip
    return cluster.kubectl("create", "token", name, "-n", ns).stdout.strip()


def test_streams_end_when_rights_go_and_say_when_the_session_expired(setup, cluster):
    team = setup["team"]
    leaver = Browser(setup["base"], _user(cluster, team, "leaver"))
    events = Stream(leaver, "/api/stream")
    log = Stream(leaver, f"/api/finetunes/{team}/seen/log")
    events.start()
    log.start()
    wait_for(
        "the snapshot and the first log line",
        lambda: "event: snapshot" in events.lines and any("step" in x for x in log.lines),
    )
    cluster.kubectl("delete", "rolebinding", "leaver", "-n", team)
    assert log.ended.wait(30), "the log kept streaming after the RoleBinding was removed"
    assert "no longer" in log.lines[-1], log.lines[-3:]
    # The list stream stays (the user is still someone) but shows nothing of the team now.
    wait_for(
        "the team's rows gone from the stream",
        lambda: any(x.startswith("data: []") for x in events.lines[-3:]),
        timeout=30,
    )
    expirer = Browser(setup["base"], _user(cluster, team, "expirer"))
    events = Stream(expirer, "/api/stream")
    events.start()
    wait_for("the snapshot", lambda: "event: snapshot" in events.lines)
    cluster.kubectl("delete", "serviceaccount", "expirer", "-n", team)  # its token dies with it
    assert events.ended.wait(30), "the stream kept going with a token that no longer works"
    assert "event: expired" in events.lines, events.lines[-5:]
    assert expirer.get("/api/finetunes").status_code == 401


# -- 9. Laptop mode answers only to its own address ---------------------------------------------


def test_laptop_mode_answers_only_to_its_own_address(setup):
    proc, base = setup["start"]("--auth", "kubeconfig")
    try:
        port = base.rsplit(":", 1)[1]
        assert requests.get(f"{base}/api/whoami", timeout=10).status_code == 200
        own = requests.get(f"{base}/api/whoami", headers={"Host": f"localhost:{port}"}, timeout=10)
        assert own.status_code == 200
        rebound = requests.get(f"{base}/api/whoami", timeout=10,
                               headers={"Host": f"attacker.example:{port}"})  # fmt: skip
        assert rebound.status_code == 403 and "Host" in rebound.text, rebound.text
    finally:
        proc.terminate()
        proc.wait(timeout=15)


# -- 11. The dry run validates what it says -----------------------------------------------------


def test_the_dry_run_names_an_unknown_field_and_reads_yaml_numbers_as_numbers(setup):
    team = setup["team"]
    editor = Browser(setup["base"], setup["tokens"]["editor"])
    typo = yaml.safe_dump(finetune("typo", team)).replace(
        "maxSteps:", "learningrate: 2.0e-4\n    maxSteps:"
    )
    refused = editor.post("/api/finetunes", {"yaml": typo, "dryRun": True})
    assert refused.status_code in (400, 422) and "learningrate" in refused.text, refused.text
    for written in ("2e-4", "5e-7", "1E-5"):
        text = yaml.safe_dump(finetune("numbers", team)).replace(
            "maxSteps: 10", f"maxSteps: 10\n    learningRate: {written}")  # fmt: skip
        checked = editor.post("/api/finetunes", {"yaml": text, "dryRun": True})
        assert checked.status_code == 200, (written, checked.text)
        rate = checked.json()["object"]["spec"]["training"]["learningRate"]
        assert rate == float(written), (written, rate)


# -- 12. The operator's metrics reader copies no foreign text (here: through the pod proxy) ------


def test_the_operators_reader_through_the_pod_proxy_copies_no_foreign_text(setup, cluster):
    import kubernetes
    from gft_operator.kube import Kube
    from gft_operator.scraper import Access, Scraper, Target

    team = setup["team"]
    pod = pods.ready_ip(cluster, team, "evil")
    client = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig))
    scraper = Scraper(Kube(client), Access.PROXY, interval=1, timeout=10, sink=lambda *a: False)
    reading, problem = scraper.read(Target(team, "hostile", "evil", pod, 6006, 1, time.time()))
    assert reading is None and problem is not None and "503" in problem.message
    assert "SECRET" not in problem.message, problem.message
