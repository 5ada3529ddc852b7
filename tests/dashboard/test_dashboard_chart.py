"""The chart's dashboard, rendered with real helm: what its own service account may do (only
read the fine-tunes that feed the shared list; in proxy mode, also impersonate, never a
system: group of its own choosing), oauth2-proxy as the sidecar in front of a dashboard bound
to loopback in proxy mode, a NetworkPolicy that admits only what must reach it, and Secure
cookies wherever the Ingress terminates TLS."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from chart.render import CHART, helm

PROXY = [
    "dashboard.auth=proxy",
    "dashboard.proxy.oidcIssuerURL=https://login.example.com",
    "dashboard.proxy.secretName=oidc",
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


def test_the_dashboards_own_account_only_reads_the_fine_tunes():
    rules = one(template(), "ClusterRole")["rules"]
    assert rules == [{"apiGroups": ["finetune.gemma.dev"], "resources": ["gemmafinetunes"],
                      "verbs": ["list", "watch"]}]  # fmt: skip
    proxied = one(template(*PROXY), "ClusterRole")["rules"]
    assert proxied[0] == rules[0]
    assert proxied[1:] == [{"apiGroups": [""], "resources": ["users", "groups"],
                            "verbs": ["impersonate"]}]  # fmt: skip
    named = one(template(*PROXY, "dashboard.proxy.groups={ml-team,data-team}"), "ClusterRole")
    assert named["rules"][1:] == [
        {"apiGroups": [""], "resources": ["users"], "verbs": ["impersonate"]},
        {"apiGroups": [""], "resources": ["groups"], "verbs": ["impersonate"],
         "resourceNames": ["ml-team", "data-team"]},
    ]  # fmt: skip


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
    with pytest.raises(subprocess.CalledProcessError) as refused:
        template("dashboard.auth=proxy")
    assert "dashboard.proxy.oidcIssuerURL" in refused.value.stderr


def test_the_network_policy_admits_only_the_front_port_from_the_named_namespaces():
    policy = one(template(), "NetworkPolicy")
    assert policy["spec"]["ingress"] == []  # port-forward and probes need no rule
    named = one(template(*PROXY, "dashboard.allowFromNamespaces={ingress-nginx}"),
                "NetworkPolicy")  # fmt: skip
    (rule,) = named["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http"}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "ingress-nginx"}}}]  # fmt: skip


def test_cookies_are_secure_wherever_the_ingress_terminates_tls():
    plain = containers(template("dashboard.ingress.enabled=true"))["dashboard"]
    assert "--secure-cookies" not in plain["args"]
    tls = template("dashboard.ingress.enabled=true", "dashboard.ingress.tlsSecretName=gft-tls")
    assert "--secure-cookies" in containers(tls)["dashboard"]["args"]
    proxied = template(*PROXY, "dashboard.ingress.enabled=true",
                       "dashboard.ingress.tlsSecretName=gft-tls")  # fmt: skip
    assert "--cookie-secure=true" in containers(proxied)["oauth2-proxy"]["args"]
