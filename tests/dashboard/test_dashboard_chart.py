"""The chart's dashboard, rendered with real helm: what its own service account may do (only
read the fine-tunes that feed the shared list; in proxy mode, also impersonate users and the
named groups, never a system: group), whose container holds its token (the dashboard's alone,
never oauth2-proxy's), oauth2-proxy as the sidecar in front of a dashboard bound to loopback in
proxy mode, how long its sessions last and what it logs, a NetworkPolicy that admits only what
must reach it, one replica, and Secure cookies wherever the Ingress terminates TLS."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from chart.render import CHART, helm

PROXY = [
    "dashboard.auth=proxy",
    "dashboard.proxy.oidcIssuerURL=https://login.example.com",
    "dashboard.proxy.secretName=oidc",
    "dashboard.proxy.groups={oidc:ml-team,oidc:data-team}",
    "dashboard.proxy.groupPrefix=oidc:",
]


def template(*sets: str) -> list[dict]:
    args = [helm(), "template", "gft", str(CHART), "-n", "gft-system",
            "--show-only", "templates/dashboard.yaml"]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(docs: list[dict], kind: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def containers(docs: list[dict]) -> dict[str, dict]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


def refused(*sets: str) -> str:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        template(*sets)
    return failed.value.stderr


def test_the_dashboards_own_account_only_reads_the_fine_tunes():
    rules = one(template(), "ClusterRole")["rules"]
    assert rules == [{"apiGroups": ["finetune.gemma.dev"], "resources": ["gemmafinetunes"],
                      "verbs": ["list", "watch"]}]  # fmt: skip
    # Proxy mode: users (RBAC cannot narrow them by a pattern) and only the named groups. An
    # account that may impersonate any group is cluster-admin by another name: no such grant.
    proxied = one(template(*PROXY), "ClusterRole")["rules"]
    assert proxied == [
        rules[0],
        {"apiGroups": [""], "resources": ["users"], "verbs": ["impersonate"]},
        {"apiGroups": [""], "resources": ["groups"], "verbs": ["impersonate"],
         "resourceNames": ["oidc:ml-team", "oidc:data-team"]},
    ]  # fmt: skip
    unnamed = [s for s in PROXY if not s.startswith("dashboard.proxy.groups")]
    assert "dashboard.proxy.groups" in refused(*unnamed)
    assert "system:masters" in refused(*unnamed, "dashboard.proxy.groups={system:masters}")


def test_only_the_dashboards_container_holds_its_token():
    for sets in ((), PROXY):
        pod = one(template(*sets), "Deployment")["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, sets
        (volume,) = [v for v in pod["volumes"] if "projected" in v]
        sources = volume["projected"]["sources"]
        assert any("serviceAccountToken" in s for s in sources)
        holders = {
            c["name"]
            for c in pod["containers"]
            if any(m["name"] == volume["name"] for m in c.get("volumeMounts") or [])
        }
        assert holders == {"dashboard"}, holders  # oauth2-proxy faces the internet: no token
        dashboard = next(c for c in pod["containers"] if c["name"] == "dashboard")
        (mount,) = [m for m in dashboard["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
        assert mount["readOnly"] is True


def test_proxy_mode_narrows_groups_signs_in_only_named_groups_and_refreshes_sessions():
    docs = template(*PROXY)
    dash, proxy = containers(docs)["dashboard"], containers(docs)["oauth2-proxy"]
    # The dashboard drops any group not named before impersonating (else the API server would
    # refuse the whole request), and oauth2-proxy signs in only members of a named group.
    assert "--allowed-groups=oidc:ml-team,oidc:data-team" in dash["args"], dash["args"]
    args = proxy["args"]
    assert "--allowed-group=ml-team" in args and "--allowed-group=data-team" in args, args
    # A session lasts an hour, refreshed (groups read again) while it is used: not 7 days.
    assert "--cookie-expire=1h" in args and "--cookie-refresh=10m" in args, args
    # X-Forwarded-User is the claim the API server names users by (sub, unless told).
    assert not any(a.startswith("--prefer-email-to-user") for a in args)
    by_email = containers(template(*PROXY, "dashboard.proxy.usernameClaim=email"))
    assert "--prefer-email-to-user=true" in by_email["oauth2-proxy"]["args"]
    # TensorBoard's tickets are in its paths: the request log has no paths.
    (logging,) = [a for a in args if a.startswith("--request-logging-format=")]
    assert "RequestURI" not in logging and "{{.StatusCode}}" in logging


def test_one_replica_holds_the_sessions_and_tickets():
    assert "dashboard.replicas" in refused("dashboard.replicas=2")
    assert "dashboard.replicas" in refused(*PROXY, "dashboard.replicas=3")
    service = one(template(), "Service")
    assert "sessionAffinity" not in service["spec"]  # ClientIP is the Ingress's, not a browser's


def test_proxy_mode_puts_oauth2_proxy_in_front_of_a_dashboard_on_loopback():
    docs = template(*PROXY, "dashboard.pathPrefix=/gft")
    dash, proxy = containers(docs)["dashboard"], containers(docs)["oauth2-proxy"]
    assert "--address=127.0.0.1:8090" in dash["args"] and "ports" not in dash
    assert proxy["image"] == "quay.io/oauth2-proxy/oauth2-proxy:v7.15.6"
    args = proxy["args"]
    for expected in ("--upstream=http://127.0.0.1:8090/", "--provider=oidc",
                     "--oidc-issuer-url=https://login.example.com", "--proxy-prefix=/gft/oauth2",
                     "--skip-auth-route=^/gft/tb/", "--cookie-path=/gft/"):  # fmt: skip
        assert expected in args, (expected, args)
    assert [p["containerPort"] for p in proxy["ports"]] == [4180]
    secrets = {e["valueFrom"]["secretKeyRef"]["key"] for e in proxy["env"]}
    assert secrets == {"client-id", "client-secret", "cookie-secret"}
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/gft/healthz"
    assert "dashboard.proxy.oidcIssuerURL" in refused("dashboard.auth=proxy")


def test_the_network_policy_admits_only_the_front_port_from_the_named_namespaces():
    # What the policy says; the proving ground enforces no NetworkPolicy (no CNI plugin there),
    # so this content is what is tested, not its effect.
    policy = one(template(), "NetworkPolicy")
    assert policy["spec"]["ingress"] == []  # port-forward and probes need no rule
    named = one(template(*PROXY, "dashboard.allowFromNamespaces={ingress-nginx}"),
                "NetworkPolicy")  # fmt: skip
    (rule,) = named["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http"}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "ingress-nginx"}}}]  # fmt: skip
    # In proxy mode the port named http is oauth2-proxy's; the dashboard names no port at all.
    pods = containers(template(*PROXY))
    assert [p["name"] for p in pods["oauth2-proxy"]["ports"]] == ["http"]
    assert "ports" not in pods["dashboard"]
    assert policy["spec"]["podSelector"] == one(template(), "Deployment")["spec"]["selector"]


def test_cookies_are_secure_wherever_the_ingress_terminates_tls():
    plain = containers(template("dashboard.ingress.enabled=true"))["dashboard"]
    assert "--secure-cookies" not in plain["args"]
    tls = template("dashboard.ingress.enabled=true", "dashboard.ingress.tlsSecretName=gft-tls")
    assert "--secure-cookies" in containers(tls)["dashboard"]["args"]
    proxied = template(*PROXY, "dashboard.ingress.enabled=true",
                       "dashboard.ingress.tlsSecretName=gft-tls")  # fmt: skip
    assert "--cookie-secure=true" in containers(proxied)["oauth2-proxy"]["args"]
