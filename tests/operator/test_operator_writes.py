# ruff: noqa: F811  (pytest fixtures imported from operator_process are parameters here)
"""What the operator writes, and what the API server makes of it (issue 25), on the proving
ground with KWOK nodes:

- children are written with server-side apply under the field manager ``gft-operator``,
  owning only the fields it sets (the default IngressClass admission and another
  controller's annotation survive an update of the Ingress);
- every refusal of the API server (quota, an admission policy) becomes a condition with the
  API server's reason and message and a Warning event, and is retried with back-off; the CRD
  itself refuses what the Job would refuse, naming the field;
- the admin policy is a ValidatingAdmissionPolicy the chart ships: ``kubectl apply`` refuses a
  fine-tune outside it on create and on update; the operator's own check covers the Ingress
  on every change, for clusters without the policy;
- over long uptime the operator's memory and work are bounded by what is live: finished runs
  cost nothing per resync, its own writes are forgotten once the watch echoes them, and the
  Warning events of other objects are not kept.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
import uuid

import pytest
from chart.render import CHART, helm
from conftest import wait_for
from operator_process import (  # noqa: F401 (fixtures)
    apply,
    events_of,
    get_gft,
    installed,
    operator_looked_again,
    reconciles,
    scratch,
    start_operator,
    wait_phase,
)
from operator_samples import finetune

pytestmark = pytest.mark.cluster

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
ALLOWED_HOSTS = ".example.com"
ALLOWED_INGRESS_ANNOTATIONS = "ok.example.com/*"


@pytest.fixture(scope="module")
def operator(installed, tmp_path_factory):
    """The operator with an admin policy on the TensorBoard Ingress (its own check, as on a
    cluster without the ValidatingAdmissionPolicy)."""
    op = start_operator(
        installed,
        tmp_path_factory,
        f"--allowed-ingress-host-suffix={ALLOWED_HOSTS}",
        f"--allowed-ingress-annotation={ALLOWED_INGRESS_ANNOTATIONS}",
    )
    yield op
    op.kill(signal.SIGTERM)


def on_kwok(name: str, **spec) -> dict:
    spec.setdefault("resources", {"gpus": 1, "nodeSelector": {"type": "kwok"}})
    return finetune(name, **spec)


def kept_running(name: str, **spec) -> dict:
    spec.setdefault("podAnnotations", {"gft.dev/kwok-keep-running": "1"})
    return on_kwok(name, **spec)


def patch_spec(c, namespace: str, name: str, spec: dict, check: bool = True):
    return c.kubectl(
        "patch",
        "gft",
        name,
        "-n",
        namespace,
        "--type",
        "merge",
        "-p",
        json.dumps({"spec": spec}),
        check=check,
    )


def metric(op, name: str) -> dict[str, float]:
    """Samples of one of the operator's own metrics, by their labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with _DIRECT.open(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name
    }


# ---------------------------------------------------------------------------------------------
# Finding 2: children are applied (server-side), not overwritten whole
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def default_ingress_class(installed):
    name = f"gft-default-{uuid.uuid4().hex[:5]}"
    installed.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "IngressClass",
                "metadata": {
                    "name": name,
                    "annotations": {"ingressclass.kubernetes.io/is-default-class": "true"},
                },
                "spec": {"controller": "example.com/ingress-controller"},
            }
        ),
    )
    probe = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": "probe"},
        "spec": {"defaultBackend": {"service": {"name": "s", "port": {"number": 80}}}},
    }

    def admitted_class():  # the admission plugin reads IngressClasses from a cache of its own
        out = installed.kubectl(
            "create",
            "-n",
            "default",
            "--dry-run=server",
            "-o",
            "json",
            "-f",
            "-",
            input=json.dumps(probe),
        ).stdout
        return json.loads(out)["spec"].get("ingressClassName") == name

    wait_for("the default IngressClass to be used", admitted_class, timeout=30)
    yield name
    installed.kubectl("delete", "ingressclass", name, "--wait=false")


def test_the_ingress_is_applied_not_overwritten(operator, namespace, default_ingress_class):
    """The DefaultIngressClass admission plugin sets ``ingressClassName`` on the Ingress, and
    another controller annotates it. Before: the next change of the fine-tune's Ingress
    replaced the whole spec and annotations, removing both (and fought over them on every
    change). Now the operator applies only the fields it sets, as field manager gft-operator."""
    c = operator.cluster
    ingress = {"host": "tb.example.com", "annotations": {"ok.example.com/tag": "a"}}
    apply(c, namespace, kept_running("tb", tensorboard={"ingress": ingress}))
    live = wait_for(
        "the Ingress",
        lambda: json.loads(
            c.kubectl("get", "ingress", "tb", "-n", namespace, "-o", "json", check=False).stdout
            or "null"
        ),
    )
    assert live["spec"].get("ingressClassName") == default_ingress_class  # the admission's
    c.kubectl("annotate", "ingress", "tb", "-n", namespace, "other.example.org/owner=them")
    patch_spec(
        c,
        namespace,
        "tb",
        {
            "tensorboard": {
                "ingress": {"host": "tb2.example.com", "annotations": {"ok.example.com/tag": None}}
            }
        },
    )

    def updated():
        obj = c.kubectl_json("get", "ingress", "tb", "-n", namespace)
        return obj if obj["spec"]["rules"][0]["host"] == "tb2.example.com" else None

    live = wait_for("the Ingress updated", updated)
    operator_looked_again(operator)
    live = c.kubectl_json("get", "ingress", "tb", "-n", namespace, "--show-managed-fields")
    assert live["spec"].get("ingressClassName") == default_ingress_class
    annotations = live["metadata"].get("annotations") or {}
    assert annotations.get("other.example.org/owner") == "them", annotations
    assert "ok.example.com/tag" not in annotations  # the operator's own, no longer asked for
    managers = {(m["manager"], m["operation"]) for m in live["metadata"]["managedFields"]}
    assert ("gft-operator", "Apply") in managers, managers
    c.kubectl("delete", "gft", "tb", "-n", namespace, "--wait=false")


# ---------------------------------------------------------------------------------------------
# Finding 3: refusals become a condition and an event, with back-off
# ---------------------------------------------------------------------------------------------
def test_a_quota_refusing_the_output_claim_is_said_and_retried(operator, namespace):
    """Before: the claim's create answered 403 (exceeded quota) and the status stayed empty
    while a log line repeated; `kubectl get gft` showed no phase, no reason, no event."""
    c = operator.cluster
    c.kubectl("create", "quota", "no-claims", "--hard=persistentvolumeclaims=0", "-n", namespace)
    apply(c, namespace, on_kwok("claimless"))
    status = wait_phase(c, namespace, "claimless", "Pending", "QuotaExceeded", timeout=60)
    assert "exceeded quota" in status["message"] and "claimless-output" in status["message"]
    applied = {x["type"]: x for x in status["conditions"]}["Applied"]
    assert applied["status"] == "False" and applied["reason"] == "QuotaExceeded"
    warnings = [e for e in events_of(c, namespace, "claimless") if e["type"] == "Warning"]
    assert any(e["reason"] == "QuotaExceeded" for e in warnings), warnings
    c.kubectl("delete", "quota", "no-claims", "-n", namespace)
    status = wait_phase(c, namespace, "claimless", "Succeeded", timeout=90)  # the back-off
    assert not any(x["type"] == "Applied" for x in status["conditions"])


@pytest.fixture
def refusing_policy(installed, namespace):
    """A ValidatingAdmissionPolicy of the cluster's that refuses training Jobs in
    ``namespace``."""
    name = f"no-training-{uuid.uuid4().hex[:5]}"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": ["batch"],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["jobs"],
                    }
                ]
            },
            "validations": [
                {"expression": "false", "message": "training Jobs are not allowed here"}
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
            },
        },
    }
    for obj in (policy, binding):
        installed.kubectl("apply", "-f", "-", input=json.dumps(obj))
    # The API server compiles a new policy a moment later: wait until it refuses.
    probe = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "probe"},
        "spec": {
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}
            }
        },
    }
    wait_for(
        "the policy to refuse",
        lambda: (
            "not allowed here"
            in installed.kubectl(
                "create",
                "-n",
                namespace,
                "--dry-run=server",
                "-f",
                "-",
                input=json.dumps(probe),
                check=False,
            ).stderr
        ),
        timeout=30,
    )
    yield name
    installed.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name)


def test_an_admission_policy_refusing_the_job_is_said(operator, namespace, refusing_policy):
    """Before: the Job's create was refused (422) and nothing but the operator's log said so."""
    c = operator.cluster
    apply(c, namespace, on_kwok("refused"))

    def refused():
        status = get_gft(c, namespace, "refused").get("status") or {}
        return status if "not allowed here" in (status.get("message") or "") else None

    status = wait_for("the refusal in the status", refused, timeout=60)
    assert status["phase"] == "Pending" and status["reason"] == "Invalid", status
    assert "Job refused" in status["message"] and refusing_policy in status["message"]
    warnings = [e for e in events_of(c, namespace, "refused") if e["type"] == "Warning"]
    assert any("not allowed here" in e["message"] for e in warnings), warnings
    attempts = f"{namespace}/refused: Job refused"
    first = operator.log().count(attempts)
    time.sleep(8)  # (a rate is measured over time) retried with back-off, not in a loop
    assert operator.log().count(attempts) - first <= 3  # 2 s, 4 s, 8 s apart at most


INVALID_FOR_THE_JOB = [
    (
        "toleration-exists-with-value",
        {"resources": {"gpus": 1, "tolerations": [{"operator": "Exists", "value": "b"}]}},
        "spec.resources.tolerations[0]",
    ),
    (
        "toleration-equal-without-key",
        {"resources": {"gpus": 1, "tolerations": [{"operator": "Equal", "value": "b"}]}},
        "spec.resources.tolerations[0]",
    ),
    (
        "toleration-seconds-without-noexecute",
        {
            "resources": {
                "gpus": 1,
                "tolerations": [
                    {"key": "a", "effect": "NoSchedule", "tolerationSeconds": 5},
                ],
            }
        },
        "spec.resources.tolerations[0]",
    ),
    ("toleration-key", {"resources": {"tolerations": [{"key": "bad key!"}]}}, "tolerations[0]"),
    ("pod-annotation-key", {"podAnnotations": {"bad key!": "x"}}, "spec.podAnnotations"),
    ("node-selector-key", {"resources": {"nodeSelector": {"a/b/c": "x"}}}, "nodeSelector"),
    ("node-selector-value", {"resources": {"nodeSelector": {"a": "not ok!"}}}, "nodeSelector"),
    (
        "ingress-annotation-key",
        {"tensorboard": {"ingress": {"host": "a.example.com", "annotations": {"-x": "y"}}}},
        "spec.tensorboard.ingress.annotations",
    ),
]


@pytest.mark.parametrize(
    ("spec", "field"),
    [(s, f) for _, s, f in INVALID_FOR_THE_JOB],
    ids=[i for i, *_ in INVALID_FOR_THE_JOB],
)
def test_the_crd_refuses_what_the_job_would_refuse(installed, scratch, spec, field):
    """Before: the CRD admitted these; the Job (or the Ingress) was then refused with 422 and
    the fine-tune showed nothing. Now `kubectl apply` refuses them, naming the field."""
    manifest = finetune(f"bad-{uuid.uuid4().hex[:5]}", **spec)
    result = installed.kubectl(
        "create", "-n", scratch, "-f", "-", input=json.dumps(manifest), check=False
    )
    assert result.returncode != 0, f"accepted: {json.dumps(spec)}"
    assert field in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# Admission: the admin policy as a ValidatingAdmissionPolicy
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def admission_policy(installed):
    """The chart's policy objects, rendered with a policy and applied as `helm install` would."""
    values = [
        "policy.allowedImagePrefixes={ghcr.io/ok/}",
        f"policy.allowedIngressHostSuffixes={{{ALLOWED_HOSTS}}}",
        "policy.allowedIngressClassNames={public}",
        "policy.allowedPodAnnotationPrefixes={gft.dev/}",
        f"policy.allowedIngressAnnotationKeys={{{ALLOWED_INGRESS_ANNOTATIONS}}}",
        "policy.ingress.requireTLS=true",
    ]
    cmd = [helm(), "template", "gft", str(CHART), "-n", "gft-system"]
    cmd += ["--show-only", "templates/admission-policy.yaml"]
    for value in values:
        cmd += ["--set", value]
    rendered = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    installed.kubectl("apply", "-f", "-", input=rendered)
    probe = json.dumps(finetune("probe", image="evil.example/trainer:1"))

    def refused() -> bool:
        return installed.kubectl("create", "-n", "default", "--dry-run=server", "-f", "-",
                                 input=probe, check=False).returncode != 0  # fmt: skip

    wait_for("the policy to refuse", refused, timeout=30)
    yield
    installed.kubectl("delete", "-f", "-", input=rendered, check=False)
    # The API server's policy cache lets the deleted policy refuse for a moment longer: the
    # next test's fine-tune (an image outside ghcr.io/ok/) must not meet it.
    wait_for("the policy to be gone", lambda: not refused(), timeout=30)


def test_the_admin_policy_is_enforced_at_admission(installed, namespace, admission_policy):
    """Before: the policy was checked only before a run's first Job, so the mutable
    ``spec.tensorboard.ingress`` could be changed to anything afterwards, and Ingress
    annotation keys were never checked. Now `kubectl apply` refuses, on create and update."""
    c = installed
    ok_ingress = {"host": "tb.example.com", "ingressClassName": "public", "tlsSecretName": "tls"}
    cases = [
        ({"image": "evil.example/trainer:1"}, "spec.image"),
        ({"tensorboard": {"ingress": {**ok_ingress, "host": "tb.evil.org"}}}, "host"),
        ({"tensorboard": {"ingress": {**ok_ingress, "ingressClassName": "x"}}}, "class"),
        (
            {"tensorboard": {"ingress": {"host": "tb.example.com", "ingressClassName": "public"}}},
            "TLS",
        ),
        ({"podAnnotations": {"sidecar.istio.io/inject": "true"}}, "spec.podAnnotations"),
        (
            {
                "tensorboard": {
                    "ingress": {
                        **ok_ingress,
                        "annotations": {"nginx.ingress.kubernetes.io/server-snippet": "x"},
                    }
                }
            },
            "spec.tensorboard.ingress.annotations",
        ),
    ]
    for spec, says in cases:
        result = apply(c, namespace, finetune("bad", **spec), check=False)
        assert result.returncode != 0, f"admitted: {spec}"
        assert says in result.stderr and "gft-policy" in result.stderr, result.stderr
    good = finetune(
        "good",
        image="ghcr.io/ok/trainer:1",
        tensorboard={"ingress": {**ok_ingress, "annotations": {"ok.example.com/a": "b"}}},
    )
    apply(c, namespace, good)
    moved = patch_spec(
        c, namespace, "good", {"tensorboard": {"ingress": {"host": "tb.evil.org"}}}, check=False
    )
    assert moved.returncode != 0 and "host" in moved.stderr, moved.stderr  # on update too
    assert get_gft(c, namespace, "good")["spec"]["tensorboard"]["ingress"]["host"] == (
        "tb.example.com"
    )


def test_the_operator_checks_the_ingress_on_every_change(operator, namespace):
    """Without the admission policy (the operator's own check). Before: a change of the
    Ingress after the first Job was never checked: the Ingress followed the spec to any host."""
    c = operator.cluster
    apply(c, namespace, kept_running("moving", tensorboard={"ingress": {"host": "a.example.com"}}))
    wait_phase(c, namespace, "moving", "Running", timeout=60)
    wait_for(
        "the Ingress",
        lambda: c.kubectl("get", "ingress", "moving", "-n", namespace, check=False).returncode == 0,
    )
    patch_spec(c, namespace, "moving", {"tensorboard": {"ingress": {"host": "tb.evil.org"}}})

    def said():
        status = get_gft(c, namespace, "moving")["status"]
        cond = {x["type"]: x for x in status["conditions"]}.get("Applied")
        return cond if cond and cond["reason"] == "PolicyViolation" else None

    cond = wait_for("the policy violation in the status", said, timeout=30)
    assert "tb.evil.org" in cond["message"] and ALLOWED_HOSTS in cond["message"]
    assert c.kubectl("get", "ingress", "moving", "-n", namespace, check=False).returncode != 0
    assert get_gft(c, namespace, "moving")["status"]["phase"] == "Running"  # the run goes on
    c.kubectl("delete", "gft", "moving", "-n", namespace, "--wait=false")


# ---------------------------------------------------------------------------------------------
# Finding 4: memory and work bounded by what is live
# ---------------------------------------------------------------------------------------------
def test_finished_runs_cost_nothing_per_resync(operator, namespace):
    """Before: every finished run without a TTL was reconciled at every resync, forever (here
    12 runs every 3 s)."""
    c = operator.cluster

    def window() -> float:
        # Reconciles over three resync periods of the test operator (3 s).
        first = reconciles(operator)
        time.sleep(10)
        return reconciles(operator) - first

    # The proving ground is shared: runs other modules left unfinished are the operator's to
    # look at every resync too. What they cost is measured first and allowed for.
    before = window()
    names = [f"done-{i}" for i in range(12)]
    # No TensorBoard after the run: its Deployment's pods on the simulated nodes change, and a
    # change of a child is a reason to look; the resync alone is what is measured here.
    items = [on_kwok(n, tensorboard={"keepAfterFinishSeconds": 0}) for n in names]
    c.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
    )
    for name in names:
        wait_phase(c, namespace, name, "Succeeded", timeout=90)
    # With the fault, 12 runs x 3 resyncs = 36 more than before; the last events of the runs
    # may still arrive in the first window, so a few windows are allowed to settle.
    wait_for(
        "three resyncs that reconcile none of the finished runs",
        lambda: window() - before <= 6,
        timeout=120,
    )


def test_the_operator_keeps_only_what_it_needs(operator, namespace):
    """Before: remembered writes stayed until the object was read again (a pod gone after a
    TTL: forever), the spec cache kept up to 4096 specs with their children, and every
    Warning event of the cluster was kept in memory."""
    c = operator.cluster
    names = [f"short-{i}" for i in range(5)]
    items = [on_kwok(n, ttlSecondsAfterFinished=0) for n in names]
    c.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
    )
    for name in names:
        wait_phase(c, namespace, name, "Succeeded", timeout=90)
    wait_for(
        "the finished Jobs deleted (TTL 0)",
        lambda: not c.kubectl_json("get", "jobs", "-n", namespace)["items"],
        timeout=60,
    )
    wait_for(
        "every own write echoed and forgotten",
        lambda: metric(operator, "gft_operator_remembered_writes") == {"": 0.0},
        timeout=20,
    )
    cached = metric(operator, "gft_operator_cached_objects")
    unfinished = [
        i
        for i in c.kubectl_json("get", "gft", "-A")["items"]
        if (i.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        and not i["metadata"].get("deletionTimestamp")
    ]
    assert cached.get("kind=spec", 0) <= len(unfinished), cached  # one per unfinished run
    # Pods that are not the operator's, failing to schedule: Warning events it does not keep.
    events_before = cached.get("kind=Event", 0)
    for i in range(3):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"other-{i}"},
            "spec": {
                "nodeSelector": {"no": "such-node"},
                "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "c", "image": "x",
                    "securityContext": {"allowPrivilegeEscalation": False,
                                        "capabilities": {"drop": ["ALL"]}},
                }],
            },
        }  # fmt: skip
        apply(c, namespace, pod)
    wait_for(
        "their FailedScheduling events",
        lambda: (
            len(
                c.kubectl_json(
                    "get", "events", "-n", namespace, "--field-selector", "reason=FailedScheduling"
                )["items"]
            )
            >= 3
        ),
        timeout=60,
    )
    # A control: a fine-tune whose pod cannot be scheduled either; its events are kept.
    apply(c, namespace, finetune("stuck", resources={"gpus": 1, "nodeSelector": {"no": "such"}}))
    wait_phase(c, namespace, "stuck", "Pending", "Unschedulable", timeout=60)
    kept = wait_for(
        "the control's event kept",
        lambda: (
            (n := metric(operator, "gft_operator_cached_objects").get("kind=Event", 0))
            > events_before
            and n
        ),
        timeout=30,
    )
    ours = [
        e
        for e in c.kubectl_json(
            "get", "events", "-n", namespace, "--field-selector", "type=Warning"
        )["items"]
        if e["involvedObject"]["name"].startswith("stuck")
    ]
    assert kept <= events_before + len(ours), (kept, events_before, len(ours))
