"""The chart's proxy mode on the proving ground, the way a platform team runs it: the
dashboard's pod with oauth2-proxy (built from v7.15.6's source) as its sidecar in front and the
dashboard bound to loopback behind it, a real OpenID Connect provider (mockoidc) on the node's
address, and Chromium logging in through both. A forged identity header from another pod gets
nothing."""

from __future__ import annotations

import json
import secrets
import subprocess
import uuid

import pytest
import requests
import yaml
from chart.render import CHART, helm
from conftest import wait_for

from dashboard import pods
from devcluster import build
from devcluster.forwarding import port_forward

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def proxied(cluster, setup, tmp_path_factory, request):
    build.build_tools()
    mockoidc_bin = build.build_own("mockoidc")
    stamp = uuid.uuid4().hex[:5]
    ns, team = f"gft-proxy-{stamp}", setup["team"]
    group = f"gft-team-{stamp}"  # the OIDC group; RBAC binds it, not a user's name
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("create", "rolebinding", "oidc-team", "--clusterrole=view",
                    f"--group={group}", "-n", team)  # fmt: skip
    client_secret = secrets.token_urlsafe(24)
    provider = subprocess.Popen(
        [str(mockoidc_bin), "--address", f"{cluster.node_ip}:0", "--client-id", "gft-dashboard",
         "--client-secret", client_secret, "--email", "ada@example.com", "--groups", group],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    # Ended even when the rest of this setup fails (a finalizer runs then; code after yield not).
    request.addfinalizer(provider.terminate)
    issuer = provider.stdout.readline().strip().removeprefix("issuer: ")
    assert issuer.startswith("http://"), issuer
    cluster.kubectl("create", "secret", "generic", "oidc", "-n", ns,
                    "--from-literal=client-id=gft-dashboard",
                    f"--from-literal=client-secret={client_secret}",
                    f"--from-literal=cookie-secret={secrets.token_hex(16)}")  # fmt: skip
    values = tmp_path_factory.mktemp("proxy") / "values.yaml"
    values.write_text(yaml.safe_dump({"dashboard": {
        "auth": "proxy",
        "pathPrefix": "/gft",
        # The chart asks for the groups the dashboard may impersonate (the proving ground's
        # API server adds no prefix): here the team's one.
        "proxy": {"oidcIssuerURL": issuer, "secretName": "oidc", "groups": [group],
                  "extraArgs": ["--scope=openid email profile groups"]},
        **pods.RUNNER,
    }}))  # fmt: skip
    rendered = subprocess.run(
        [helm(), "template", "gft", str(CHART), "-n", ns, "--show-only",
         "templates/dashboard.yaml", "-f", str(values)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=rendered)
    cluster.kubectl("rollout", "status", "deploy/gft-dashboard", "-n", ns, "--timeout=180s")
    log = values.with_name("port-forward.log")
    forward, port = port_forward(cluster, ns, "svc/gft-dashboard", 80, 0, log=log)
    selector = "app.kubernetes.io/name=gemma-finetune-dashboard"
    pod = cluster.kubectl_json("get", "pods", "-n", ns, "-l", selector)["items"][0]
    yield {"ns": ns, "url": f"http://127.0.0.1:{port}/gft", "pod_ip": pod["status"]["podIP"],
           "group": group}  # fmt: skip
    forward.kill()
    cluster.kubectl("delete", "-f", "-", "--wait=false", input=rendered, check=False)
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    cluster.kubectl("delete", "rolebinding", "oidc-team", "-n", team, check=False)


def test_proxy_mode_signs_in_through_oauth2_proxy_and_a_real_oidc_provider(
    proxied, setup, chromium
):
    team = setup["team"]
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    # No sign-in form of ours: oauth2-proxy sends the browser to the provider and back.
    page.goto(proxied["url"] + "/")
    page.wait_for_selector(f"tr.row[data-key='{team}/seen']", timeout=60_000)
    assert page.locator("#who").inner_text() == "ada@example.com"
    assert page.locator(f"tr.row[data-key^='{setup['other']}/']").count() == 0
    cookies = {c["name"] for c in page.context.cookies()}
    assert "_oauth2_proxy" in cookies and "gft_session" not in cookies
    # What she may do is what her group may: view.
    page.click(f"tr.row[data-key='{team}/seen']")
    page.wait_for_selector("#phase")
    assert page.locator("#stop").count() == 0  # view only, through her team's group
    # Sign out is oauth2-proxy's: it clears its session cookie (mockoidc then signs her in
    # again at once, having no login form of its own).
    with page.expect_response("**/oauth2/sign_out**") as signed_out:
        page.click("#signout")
    cleared = signed_out.value.header_value("set-cookie") or ""
    assert signed_out.value.status == 302 and "_oauth2_proxy=;" in cleared, cleared
    page.close()


FORGER = """
import json, sys, urllib.error, urllib.request
for url in sys.argv[1:]:
    request = urllib.request.Request(url, headers={"X-Forwarded-User": "mallory",
        "X-Forwarded-Groups": "system:masters", "Accept": "application/json"})
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args): return None
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as r:
            print("ANSWER", json.dumps([url, r.status, r.read(300).decode(errors="replace")]))
    except urllib.error.HTTPError as e:
        print("ANSWER", json.dumps([url, e.code, ""]))
    except OSError as e:
        print("ANSWER", json.dumps([url, 0, str(e)]))
"""


def test_a_forged_identity_header_from_another_pod_gets_nothing(proxied, setup, cluster):
    other = setup["other"]
    ip = proxied["pod_ip"]
    urls = [f"http://{ip}:8090/gft/api/finetunes", f"http://{ip}:4180/gft/api/finetunes",
            f"http://{ip}:4180/gft/tb/{other}/hidden/x/data/runs"]  # fmt: skip
    forger = pods.pod("forger", other, ["python", "-c", FORGER, *urls])
    forger["spec"]["restartPolicy"] = "Never"
    cluster.kubectl("apply", "-f", "-", input=json.dumps(forger))

    def answers():
        logs = cluster.kubectl("logs", "forger", "-n", other, check=False).stdout
        found = [json.loads(x[7:]) for x in logs.splitlines() if x.startswith("ANSWER ")]
        return found if len(found) == len(urls) else None

    got = {url: (status, body) for url, status, body in wait_for("the forger's answers", answers,
                                                                  timeout=120)}  # fmt: skip
    # The dashboard itself listens on the pod's loopback only: nothing answers on 8090.
    assert got[urls[0]][0] == 0, got[urls[0]]
    # oauth2-proxy wants a session, whatever the headers say; /tb/ wants a ticket.
    assert got[urls[1]][0] in (302, 401, 403), got[urls[1]]
    assert got[urls[2]][0] in (403, 404), got[urls[2]]
    assert not any("hidden" in body for _, body in got.values()), got
    assert requests.get(proxied["url"] + "/healthz", timeout=10).text == "ok"
