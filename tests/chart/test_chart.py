"""The Helm chart, with real helm (v4, built from the Go module proxy) and kube-score: lint, the
values schema, what each toggle renders, the rendered manifests/ kept current, kube-score on the
chart and on the children of every sample, and a server-side dry run against the proving ground.
The install on the proving ground (operator in the cluster) is in ``test_chart_install.py``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from chart.render import CHART, REPO, helm
from chart.render import main as render_main


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, check=check)


def template(*sets: str, namespace: str = "gft-system") -> list[dict]:
    args = ["template", "gft", str(CHART), "--namespace", namespace]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(run_helm(*args).stdout) if d]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def deployment(docs: list[dict], name: str = "gft-operator") -> dict:
    (found,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == name]
    return found


def cluster_role(docs: list[dict], name: str) -> dict:
    return next(r for r in of_kind(docs, "ClusterRole") if r["metadata"]["name"] == name)


def operator_args(docs: list[dict]) -> list[str]:
    return deployment(docs)["spec"]["template"]["spec"]["containers"][0]["args"]


def test_lint_strict_with_defaults_and_with_every_toggle():
    run_helm("lint", "--strict", str(CHART))
    everything = [
        "metrics.podMonitors.enabled=true",
        "metrics.serviceMonitor.enabled=true",
        "grafanaDashboard.enabled=true",
        "watchNamespaces={a,b}",
        "policy.allowedImagePrefixes={ghcr.io/acme/}",
        "policy.ingress.requireTLS=true",
        "networkPolicy.allowFromNamespaces={ingress-nginx}",
        "metrics.access=proxy",
        "replicas=1",
    ]
    run_helm("lint", "--strict", str(CHART), *[x for s in everything for x in ("--set", s)])


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("iamge.tag=1", "additional properties 'iamge' not allowed"),
        ("image.tagg=1", "additional properties 'tagg' not allowed"),
        ("metrics.access=direct", "metrics/access"),
        ("replicas=0", "replicas"),
        ("policy.ingress.requireTLs=true", "'requireTLs' not allowed"),
        ("trainer.image=has space", "trainer/image"),
    ],
)
def test_the_values_schema_refuses_what_it_does_not_know(value: str, complaint: str):
    result = run_helm("template", "gft", str(CHART), "--set", value, check=False)
    assert result.returncode != 0 and complaint in result.stderr, result.stderr


def test_kube_version_is_stated_and_enforced():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.30.0-0"  # ValidatingAdmissionPolicy is GA in 1.30
    old = run_helm("template", "gft", str(CHART), "--kube-version", "1.29.0", check=False)
    assert old.returncode != 0 and "kubeVersion" in old.stderr, old.stderr


def test_defaults_two_replicas_electing_a_leader_least_privilege_and_no_secrets():
    docs = template()
    operator = deployment(docs)
    assert operator["spec"]["replicas"] == 2
    args = operator_args(docs)
    assert "--leader-elect" in args and "--metrics-access=pod-ip" in args
    assert "--network-policy" in args
    pod = operator["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsUser"] >= 10000
    assert container["livenessProbe"] != container["readinessProbe"]
    assert of_kind(docs, "PodDisruptionBudget")[0]["spec"]["minAvailable"] == 1
    rules = [r for role in of_kind(docs, "ClusterRole") for r in role["rules"]]
    assert not [r for r in rules if "secrets" in r["resources"]]
    assert not [r for r in rules if "pods/proxy" in r["resources"]]  # pod-ip needs no proxy
    (crd,) = of_kind(docs, "CustomResourceDefinition")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    edit = next(r for r in of_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith("edit"))
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert not of_kind(docs, "PodMonitor") and not of_kind(docs, "ConfigMap")


def test_watch_namespaces_gives_roles_in_those_namespaces_only():
    docs = template("watchNamespaces={team-a,team-b}")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in of_kind(docs, "Role")}
    assert {("team-a", "gft-operator"), ("team-b", "gft-operator")} <= roles
    names = {r["metadata"]["name"] for r in of_kind(docs, "ClusterRole")}
    assert "gft-operator" not in names  # only the CRD reader and the aggregated roles
    assert {"--namespace=team-a", "--namespace=team-b"} <= set(operator_args(docs))


def test_toggles_render_what_they_say():
    docs = template(
        "metrics.podMonitors.enabled=true",
        "metrics.podMonitors.additionalLabels.release=kps",
        "metrics.serviceMonitor.enabled=true",
        "grafanaDashboard.enabled=true",
        "grafanaDashboard.folder=ML",
        "metrics.access=proxy",
        "priorityClassName=system-cluster-critical",
        "nodeSelector.pool=ops",
        "policy.allowedImagePrefixes={ghcr.io/acme/}",
        "policy.allowedIngressHostSuffixes={.tb.acme.dev}",
        "policy.ingress.requireTLS=true",
        "policy.ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/auth-url=https://auth",
        "networkPolicy.allowFromNamespaces={ingress-nginx}",
        "replicas=1",
    )
    monitors = {m["metadata"]["name"]: m for m in of_kind(docs, "PodMonitor")}
    assert set(monitors) == {"gft-trainers", "gft-operator"}
    assert monitors["gft-trainers"]["metadata"]["labels"]["release"] == "kps"
    assert of_kind(docs, "ServiceMonitor")
    configmaps = {m["metadata"]["name"]: m for m in of_kind(docs, "ConfigMap")}
    assert set(configmaps) == {"gft-grafana-dashboard", "gft-policy"}, set(configmaps)
    dashboard = configmaps["gft-grafana-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"]["grafana_folder"] == "ML"
    assert json.loads(dashboard["data"]["gft-finetuning.json"])["uid"] == "gft-finetuning"
    rules = [r for role in of_kind(docs, "ClusterRole") for r in role["rules"]]
    assert any("pods/proxy" in r["resources"] for r in rules)
    args = operator_args(docs)
    for expected in (
        "--metrics-access=proxy",
        "--allowed-image-prefix=ghcr.io/acme/",
        "--allowed-ingress-host-suffix=.tb.acme.dev",
        "--require-ingress-tls",
        "--ingress-annotation=nginx.ingress.kubernetes.io/auth-url=https://auth",
        "--network-policy-allow-namespace=ingress-nginx",
    ):
        assert expected in args, (expected, args)
    # The policy, at admission too: the chart fills the policy's parameters from `policy:`.
    assert configmaps["gft-policy"]["data"]["allowedIngressHostSuffixes"] == ".tb.acme.dev"
    (vap,) = of_kind(docs, "ValidatingAdmissionPolicy")
    (binding,) = of_kind(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["paramRef"]["name"] == "gft-policy" == vap["metadata"]["name"]
    assert {"CREATE", "UPDATE"} <= set(
        vap["spec"]["matchConstraints"]["resourceRules"][0]["operations"]
    )
    pod = deployment(docs)["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == {"pool": "ops"}
    assert not of_kind(docs, "PodDisruptionBudget")  # one replica: a PDB would block drains


def test_the_dashboard_acts_as_its_users_and_is_off_able():
    docs = template()
    dash = deployment(docs, "gft-dashboard")
    labels = dash["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "gemma-finetune-dashboard"  # not the operator's
    container = dash["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["gft-dashboard"] and "--auth=token" in container["args"]
    role = cluster_role(docs, "gft-dashboard")
    verbs = {v for r in role["rules"] for v in r["verbs"]}
    assert verbs <= {"get", "list", "watch"}  # its own rights: reads only; actions are the user's
    proxied = template(
        "dashboard.auth=proxy",
        "dashboard.proxy.oidcIssuerURL=https://login.acme.dev",
        "dashboard.proxy.secretName=oidc",
        "dashboard.proxy.groups={ml-team}",
        "dashboard.pathPrefix=/gft",
        "dashboard.ingress.enabled=true",
        "dashboard.ingress.host=gft.acme.dev",
    )
    role = cluster_role(proxied, "gft-dashboard")
    assert any("impersonate" in r["verbs"] for r in role["rules"])
    container, proxy = deployment(proxied, "gft-dashboard")["spec"]["template"]["spec"][
        "containers"
    ]
    assert {"--auth=proxy", "--path-prefix=/gft"} <= set(container["args"])
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/gft/healthz"  # through oauth2-proxy
    (ingress,) = of_kind(proxied, "Ingress")
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["path"] == "/gft"
    off = template("dashboard.enabled=false")
    assert [d["metadata"]["name"] for d in of_kind(off, "Deployment")] == ["gft-operator"]


def test_notes_tell_the_next_three_commands():
    out = run_helm("install", "gft", str(CHART), "-n", "gft-system", "--dry-run=client").stdout
    notes = out.split("NOTES:", 1)[1]
    assert "helm test gft -n gft-system" in notes
    assert "kubectl apply -n NAMESPACE -f" in notes and "kubectl get gft" in notes


def test_rendered_manifests_are_current():
    assert render_main([]) == 0, "manifests/ or the chart's CRD template is stale: `make manifests`"


def children_of_the_samples() -> list[dict]:
    from gft_api.v1alpha1 import GemmaFineTuneSpec
    from gft_operator import children
    from gft_operator.policy import Policy

    docs = []
    for sample in sorted((REPO / "manifests" / "samples").glob("*.yaml")):
        for doc in yaml.safe_load_all(sample.read_text()):
            if doc and doc["kind"] == "GemmaFineTune":
                spec = GemmaFineTuneSpec.model_validate(doc["spec"])
                owner = children.Owner(doc["metadata"]["name"], "ml", "0b7d-uid")
                defaults = children.Defaults(policy=Policy(network_policy=True))
                docs += children.desired_children(owner, spec, defaults)
                docs.append(children.tensorboard_deployment(owner, spec, defaults))
    return docs


def test_kube_score_passes_on_the_chart_and_on_every_samples_children(tmp_path: Path):
    """The findings not followed are ignored by annotation, each with its reason (chart
    README, "Checked by kube-score")."""
    from devcluster.build import tool

    rendered = tmp_path / "chart.yaml"
    rendered.write_text(run_helm("template", "gft", str(CHART), "-n", "gft-system").stdout)
    childs = tmp_path / "children.yaml"
    childs.write_text(yaml.safe_dump_all(children_of_the_samples()))
    for path in (rendered, childs):
        result = subprocess.run(
            [str(tool("kube-score")), "score", str(path)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout[-4000:]


@pytest.mark.cluster
def test_the_chart_passes_a_server_side_dry_run(cluster):
    """The API server's own validation of everything the chart renders (the CRD included)."""
    # Without the test hook: its pod needs its ServiceAccount to exist, which a dry run lacks.
    docs = run_helm("template", "gft", str(CHART), "-n", "gft-dry-run", "--skip-tests").stdout
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "gft-dry-run"}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(namespace))
    # The uninstall hook's pod runs as the operator's ServiceAccount, which admission looks up
    # and a dry run does not create: it is made for real in this throwaway namespace.
    account = {"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "gft-operator", "namespace": "gft-dry-run"}}  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=json.dumps(account))
    try:
        result = cluster.kubectl(
            "apply", "--dry-run=server", "--server-side", "-f", "-", input=docs, check=False
        )
        assert result.returncode == 0, result.stderr
        assert "gemmafinetunes.finetune.gemma.dev serverside-applied (server dry run)" in (
            result.stdout
        )
    finally:
        cluster.kubectl("delete", "namespace", "gft-dry-run", "--wait=false")
