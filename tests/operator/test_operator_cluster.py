# ruff: noqa: F811  (pytest fixtures imported from operator_process are parameters here)
"""The API and the operator on the proving ground, driven with kubectl the way users do.

KWOK nodes (``kwok-gpu-*``) play the GPU nodes: their pods "run" and end at once, which is
enough for the API, the children and every lifecycle path that does not need a real trainer.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from conftest import wait_for
from operator_process import (  # noqa: F401 (fixtures)
    OperatorProcess,
    apply,
    events_of,
    get_gft,
    installed,
    operator,
    operator_looked_again,
    running_operator,
    scratch,
    wait_phase,
    watch_job_events,
)
from operator_samples import finetune

pytestmark = pytest.mark.cluster

OPERATOR_USER = "system:serviceaccount:gft-system:gft-operator"


def on_kwok(name="demo", **spec):
    """A GemmaFineTune whose pod lands on a KWOK GPU node (where pods end at once)."""
    spec.setdefault("resources", {"gpus": 1, "nodeSelector": {"type": "kwok"}})
    return finetune(name, **spec)


# ---------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------
def test_kubectl_explain_answers_from_the_docstrings(installed):
    out = installed.kubectl("explain", "gft.spec.method.lora.r").stdout
    assert "Rank of the adapter matrices" in out
    out = installed.kubectl("explain", "gft.spec.terminationGracePeriodSeconds").stdout
    assert "checkpoint" in out
    out = installed.kubectl("explain", "gft.status.progress.etaSeconds").stdout
    assert "Estimated seconds" in out


def _bad(**spec):
    return finetune("bad", **spec)


_LONG = "a" * 57
INVALID = [
    # (id, manifest, what the API server's message must name)
    ("epochs-and-maxsteps", _bad(training={"epochs": 1, "maxSteps": 10}), "spec.training"),
    ("neither-epochs-nor-maxsteps", _bad(training={"learningRate": 1e-4}), "spec.training"),
    (
        "qlora-without-gpu",
        _bad(method={"type": "qlora"}, resources={"gpus": 0}),
        "spec.method.type",
    ),
    ("unknown-method", _bad(method={"type": "dora"}), "spec.method.type"),
    ("lora-rank-zero", _bad(method={"lora": {"r": 0}}), "spec.method.lora.r"),
    ("lora-rank-string", _bad(method={"lora": {"r": "sixteen"}}), "spec.method.lora.r"),
    ("dropout-one", _bad(method={"lora": {"dropout": 1.0}}), "spec.method.lora.dropout"),
    (
        "bad-target-module",
        _bad(method={"lora": {"targetModules": ["q proj"]}}),
        "spec.method.lora.targetModules[0]",
    ),
    (
        "learning-rate-zero",
        _bad(training={"maxSteps": 5, "learningRate": 0}),
        "spec.training.learningRate",
    ),
    ("negative-batch", _bad(training={"maxSteps": 5, "batchSize": -1}), "spec.training.batchSize"),
    (
        "warmup-too-big",
        _bad(training={"maxSteps": 5, "warmupRatio": 0.9}),
        "spec.training.warmupRatio",
    ),
    (
        "unknown-scheduler",
        _bad(training={"maxSteps": 5, "lrScheduler": "cyclic"}),
        "spec.training.lrScheduler",
    ),
    ("maxsteps-string", _bad(training={"maxSteps": "lots"}), "spec.training.maxSteps"),
    (
        "unknown-format",
        _bad(dataset={"hub": {"id": "a/b"}, "format": "csv"}),
        "spec.dataset.format",
    ),
    ("no-dataset-source", _bad(dataset={"format": "chat"}), "spec.dataset"),
    (
        "two-dataset-sources",
        _bad(dataset={"hub": {"id": "a/b"}, "path": "/data/t.jsonl"}),
        "spec.dataset",
    ),
    (
        "eval-fraction-too-big",
        _bad(dataset={"hub": {"id": "a/b"}, "evalFraction": 0.9}),
        "spec.dataset.evalFraction",
    ),
    (
        "seq-length-too-short",
        _bad(dataset={"hub": {"id": "a/b"}, "maxSeqLength": 4}),
        "spec.dataset.maxSeqLength",
    ),
    ("relative-dataset-path", _bad(dataset={"path": "data/t.jsonl"}), "spec.dataset.path"),
    (
        "model-missing",
        {**_bad(), "spec": {k: v for k, v in _bad()["spec"].items() if k != "model"}},
        "spec.model",
    ),
    (
        "model-volume-and-path",
        _bad(model={"name": "g", "path": "/m", "volume": {"claimName": "m"}}),
        "spec.model",
    ),
    ("too-many-gpus", _bad(resources={"gpus": 64}), "spec.resources.gpus"),
    ("bad-memory", _bad(resources={"memory": "lots"}), "spec.resources.memory"),
    (
        "bad-toleration-operator",
        _bad(resources={"tolerations": [{"key": "a", "operator": "Maybe"}]}),
        "spec.resources.tolerations[0].operator",
    ),
    (
        "grace-too-short",
        _bad(terminationGracePeriodSeconds=5),
        "spec.terminationGracePeriodSeconds",
    ),
    ("negative-backoff", _bad(backoffLimit=-1), "spec.backoffLimit"),
    ("suspend-string", _bad(suspend="yes"), "spec.suspend"),
    (
        "existing-claim-and-pvc",
        _bad(output={"existingClaim": "x", "pvc": {"size": "1Gi"}}),
        "spec.output",
    ),
    (
        "bad-reclaim-policy",
        _bad(output={"pvc": {"reclaimPolicy": "Recycle"}}),
        "spec.output.pvc.reclaimPolicy",
    ),
    ("keep-zero-checkpoints", _bad(output={"keepCheckpoints": 0}), "spec.output.keepCheckpoints"),
    (
        "env-value-and-valuefrom",
        _bad(
            env=[
                {
                    "name": "A",
                    "value": "1",
                    "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
                }
            ]
        ),
        "spec.env[0]",
    ),
    # Issue 9: input the API used to admit, to fail later (or never).
    ("queue-not-a-label-value", _bad(queueName="gpu queue!"), "spec.queueName"),
    ("priority-without-queue", _bad(queuePriorityClass="high"), "spec.queuePriorityClass"),
    (
        "nodes-without-a-shared-volume",
        _bad(resources={"gpus": 1, "nodes": 2}),
        "spec.resources.nodes",
    ),
    ("image-with-whitespace", _bad(image="ghcr.io/x/trainer: 1.0"), "spec.image"),
    (
        "tensorboard-image-with-whitespace",
        _bad(tensorboard={"image": "tb latest"}),
        "spec.tensorboard.image",
    ),
    (
        "hub-token-in-env",
        _bad(env=[{"name": "HF_TOKEN", "value": "hf_abc"}]),
        "model.hfTokenSecretRef",
    ),
    (
        "hub-token-in-env-from-a-secret",
        _bad(
            env=[
                {
                    "name": "HUGGING_FACE_HUB_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
                }
            ]
        ),
        "spec.env[0].name",
    ),
    ("env-overrides-hf-home", _bad(env=[{"name": "HF_HOME", "value": "/tmp"}]), "spec.env[0].name"),
    (
        "env-twice",
        _bad(env=[{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
        "spec.env[1]",
    ),
    ("resume-from-outside", _bad(resumeFrom={"path": "runs/../../etc"}), "spec.resumeFrom.path"),
    ("resume-from-absolute", _bad(resumeFrom={"path": "/etc/passwd"}), "spec.resumeFrom.path"),
    (
        "path-prefix-relative",
        _bad(tensorboard={"pathPrefix": "tb"}),
        "spec.tensorboard.pathPrefix",
    ),
    (
        "exact-match-best-without-examples",
        _bad(training={"maxSteps": 10, "metricForBest": "eval_exact_match"}),
        "spec.training.metricForBest",
    ),
    (
        "divergence-factor-at-one",
        _bad(training={"maxSteps": 10, "divergenceFactor": 1}),
        "spec.training.divergenceFactor",
    ),
    (
        "early-stopping-without-patience",
        _bad(training={"maxSteps": 10, "earlyStopping": {"patience": 0}}),
        "spec.training.earlyStopping.patience",
    ),
    ("export-neither", _bad(output={"export": "middle"}), "spec.output.export"),
    (
        "hub-merged-without-a-merged-model",
        _bad(output={"hub": {"repo": "me/pip", "merged": True, "tokenSecretRef": {"name": "h"}}}),
        "spec.output.hub.merged",
    ),
    (
        "s3-bucket-not-a-bucket-name",
        _bad(output={"s3": {"bucket": "My_Bucket", "credentialsSecretRef": {"name": "k"}}}),
        "spec.output.s3.bucket",
    ),
    ("s3-without-credentials", _bad(output={"s3": {"bucket": "models"}}), "credentialsSecretRef"),
    ("unknown-field", _bad(learningRate=1e-4), "learningRate"),
    ("name-too-long", finetune(_LONG), "metadata.name"),
    ("name-not-dns-1035", finetune("1st-run"), "metadata.name"),
]


@pytest.mark.parametrize(
    ("manifest", "field"), [(m, f) for _, m, f in INVALID], ids=[i for i, _, _ in INVALID]
)
def test_invalid_manifests_are_refused_naming_the_field(installed, scratch, manifest, field):
    result = installed.kubectl(
        "create", "-n", scratch, "-f", "-", input=json.dumps(manifest), check=False
    )
    assert result.returncode != 0, f"accepted: {json.dumps(manifest['spec'])}"
    assert field in result.stderr, result.stderr


def test_the_spec_is_immutable_but_what_can_take_effect(installed, namespace):
    apply(installed, namespace, finetune("fixed", suspend=True))
    refused = {
        "spec.model": {"model": {"name": "google/gemma-3-1b-it"}},
        "spec.method": {"method": {"type": "full"}},
        "spec.training": {"training": {"maxSteps": 99}},
        "spec.dataset": {"dataset": {"maxSeqLength": 64}},
        "spec.resources": {"resources": {"gpus": 2}},
        "spec.output": {"output": {"keepCheckpoints": 5}},
        "spec.queueName": {"queueName": "q"},
        "spec.tensorboard.enabled": {"tensorboard": {"enabled": False}},
        "spec.backoffLimit": {"backoffLimit": 9},
        # Issue 9: these could be edited but never reached the running pod.
        "spec.imagePullPolicy": {"imagePullPolicy": "Always"},
        "spec.tensorboard.image": {"tensorboard": {"image": "tensorboard:2"}},
        "spec.tensorboard.pathPrefix": {"tensorboard": {"pathPrefix": "/tb/"}},
        "spec.resumeFrom": {"resumeFrom": {"path": "runs/x/adapter"}},
        "spec.env": {"env": [{"name": "A", "value": "1"}]},
    }
    for field, patch in refused.items():
        result = installed.kubectl(
            "patch",
            "gft",
            "fixed",
            "-n",
            namespace,
            "--type",
            "merge",
            "-p",
            json.dumps({"spec": patch}),
            check=False,
        )
        assert result.returncode != 0 and field in result.stderr, (field, result.stderr)
    installed.kubectl(
        "patch",
        "gft",
        "fixed",
        "-n",
        namespace,
        "--type",
        "merge",
        "-p",
        json.dumps(
            {
                "spec": {
                    "suspend": False,
                    "ttlSecondsAfterFinished": 60,
                    "tensorboard": {
                        "ingress": {"host": "tb.example.com"},
                        "keepAfterFinishSeconds": 60,
                    },
                }
            }
        ),
    )


# ---------------------------------------------------------------------------------------------
# The operator
# ---------------------------------------------------------------------------------------------
def test_children_and_a_run_to_success(operator, namespace):
    c = operator.cluster
    apply(c, namespace, on_kwok(tensorboard={"ingress": {"host": "tb.example.com"}}))
    status = wait_phase(c, namespace, "demo", "Succeeded", timeout=60)
    assert status["completionTime"] and status["startTime"]
    assert status["attempts"] == 1 and status["jobName"] == "demo"
    assert status["tensorboardURL"] == "http://tb.example.com/"
    conditions = {x["type"]: x for x in status["conditions"]}
    assert conditions["Complete"]["status"] == "True"
    assert all(x["observedGeneration"] == 1 for x in status["conditions"])

    gft = get_gft(c, namespace, "demo")
    uid = gft["metadata"]["uid"]
    job = c.kubectl_json("get", "job", "demo", "-n", namespace)
    assert job["metadata"]["ownerReferences"][0]["uid"] == uid
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["initContainers"][0]["restartPolicy"] == "Always"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job["spec"]["podFailurePolicy"]["rules"][0]["action"] == "Ignore"
    for kind, name in (("configmap", "demo-config"), ("service", "demo"), ("ingress", "demo")):
        obj = c.kubectl_json("get", kind, name, "-n", namespace)
        assert obj["metadata"]["ownerReferences"][0]["uid"] == uid, kind
    cm = c.kubectl_json("get", "configmap", "demo-config", "-n", namespace)
    assert "maxSteps: 20" in cm["data"]["config.yaml"]
    pvc = c.kubectl_json("get", "pvc", "demo-output", "-n", namespace)
    assert "ownerReferences" not in pvc["metadata"]  # retained on delete

    # kubectl get shows the phase from a field; each transition left an Event
    row = c.kubectl("get", "gft", "demo", "-n", namespace, "--no-headers").stdout
    assert "Succeeded" in row and "google/gemma-3-270m" in row and "lora" in row
    reasons = wait_for(
        "the Completed event",
        lambda: (
            (r := [e["reason"] for e in events_of(c, namespace, "demo")]) and "Completed" in r and r
        ),
    )
    assert len(reasons) >= 2, reasons
    assert f"{namespace}/demo: created Job demo" in operator.log()


def test_non_retryable_exit_fails_at_once(operator, namespace):
    c = operator.cluster
    apply(c, namespace, on_kwok("badconf", podAnnotations={"gft.dev/kwok-exit-code": "78"}))
    status = wait_phase(c, namespace, "badconf", "Failed", timeout=60)
    assert status["reason"] == "InvalidConfig", status
    assert status["attempts"] == 1
    warnings = [e for e in events_of(c, namespace, "badconf") if e["type"] == "Warning"]
    assert warnings and warnings[-1]["reason"] == "InvalidConfig"


@pytest.mark.slow
def test_retryable_failures_count_against_backoff_limit(operator, namespace):
    c = operator.cluster
    apply(
        c,
        namespace,
        on_kwok("crashy", backoffLimit=1, podAnnotations={"gft.dev/kwok-exit-code": "1"}),
    )
    status = wait_phase(c, namespace, "crashy", "Failed", timeout=90)
    assert status["reason"] == "BackoffLimitExceeded", status
    assert status["attempts"] == 2 and status["failedAttempts"] == 2


def test_unschedulable_gpu_request_says_so(operator, namespace):
    c = operator.cluster
    apply(c, namespace, finetune("huge", resources={"gpus": 16}))
    status = wait_phase(c, namespace, "huge", "Pending", "Unschedulable", timeout=60)
    assert "nvidia.com/gpu" in status["message"]
    conditions = {x["type"]: x for x in status["conditions"]}
    assert conditions["Ready"]["reason"] == "Unschedulable"


def test_quota_refusing_the_pods_surfaces_failed_create(operator, namespace):
    c = operator.cluster
    c.kubectl("create", "quota", "no-pods", "--hard=pods=0", "-n", namespace)
    apply(c, namespace, on_kwok("quota"))
    status = wait_phase(c, namespace, "quota", "Pending", "QuotaExceeded", timeout=60)
    assert "exceeded quota" in status["message"]


def test_suspend_then_resume(operator, namespace):
    c = operator.cluster
    apply(c, namespace, on_kwok("paused", suspend=True))
    status = wait_phase(c, namespace, "paused", "Suspended", "Suspended", timeout=60)
    assert {x["type"]: x for x in status["conditions"]}["Suspended"]["status"] == "True"
    assert c.kubectl_json("get", "job", "paused", "-n", namespace)["spec"]["suspend"] is True
    assert not c.kubectl_json("get", "pods", "-n", namespace)["items"]
    c.kubectl(
        "patch",
        "gft",
        "paused",
        "-n",
        namespace,
        "--type",
        "merge",
        "-p",
        '{"spec":{"suspend":false}}',
    )
    status = wait_phase(c, namespace, "paused", "Succeeded", timeout=60)
    assert {x["type"]: x for x in status["conditions"]}["Suspended"]["status"] == "False"


def _wait_gone(c, namespace, kind, name, timeout=60):
    wait_for(
        f"{kind}/{name} to be gone",
        lambda: c.kubectl("get", kind, name, "-n", namespace, check=False).returncode != 0,
        timeout=timeout,
    )


def test_delete_leaves_only_the_retained_output_claim(operator, namespace):
    c = operator.cluster
    apply(c, namespace, finetune("gone", resources={"gpus": 16}))
    wait_phase(c, namespace, "gone", "Pending", "Unschedulable", timeout=60)
    c.kubectl("delete", "gft", "gone", "-n", namespace)
    for kind, name in (("job", "gone"), ("configmap", "gone-config"), ("service", "gone")):
        _wait_gone(c, namespace, kind, name)
    wait_for(
        "the job's pods to be gone",
        lambda: (
            not c.kubectl_json(
                "get", "pods", "-n", namespace, "-l", "finetune.gemma.dev/name=gone"
            )["items"]
        ),
    )
    assert c.kubectl("get", "pvc", "gone-output", "-n", namespace).returncode == 0


def test_output_claim_with_delete_policy_goes_with_it(operator, namespace):
    c = operator.cluster
    apply(
        c,
        namespace,
        finetune(
            "tidy",
            resources={"gpus": 16},
            output={"pvc": {"size": "1Gi", "reclaimPolicy": "Delete"}},
        ),
    )
    wait_for(
        "the output claim",
        lambda: (
            c.kubectl("get", "pvc", "tidy-output", "-n", namespace, check=False).returncode == 0
        ),
    )
    c.kubectl("delete", "gft", "tidy", "-n", namespace)
    _wait_gone(c, namespace, "pvc", "tidy-output")


def test_children_deleted_by_hand_are_recreated_while_live(operator, namespace):
    c = operator.cluster
    apply(c, namespace, finetune("heal", resources={"gpus": 16}))
    wait_phase(c, namespace, "heal", "Pending", "Unschedulable", timeout=60)
    old_uid = c.kubectl_json("get", "job", "heal", "-n", namespace)["metadata"]["uid"]
    c.kubectl("delete", "configmap", "heal-config", "-n", namespace)
    c.kubectl("delete", "job", "heal", "-n", namespace, "--wait=true")
    wait_for(
        "the ConfigMap to come back",
        lambda: (
            c.kubectl("get", "configmap", "heal-config", "-n", namespace, check=False).returncode
            == 0
        ),
    )

    def new_job():
        r = c.kubectl("get", "job", "heal", "-n", namespace, "-o", "json", check=False)
        return r.returncode == 0 and json.loads(r.stdout)["metadata"]["uid"] != old_uid

    wait_for("a new Job", new_job, timeout=60)


def test_a_finished_run_is_not_restarted_when_its_job_goes(operator, namespace):
    c = operator.cluster
    apply(c, namespace, on_kwok("once"))
    wait_phase(c, namespace, "once", "Succeeded", timeout=60)
    c.kubectl("delete", "job", "once", "-n", namespace, "--wait=true")
    operator_looked_again(operator)
    assert c.kubectl("get", "job", "once", "-n", namespace, check=False).returncode != 0
    assert get_gft(c, namespace, "once")["status"]["phase"] == "Succeeded"


@pytest.mark.slow
def test_operator_killed_and_restarted_ten_times_creates_one_job(operator, namespace):
    c = operator.cluster
    watch = watch_job_events(c, namespace)
    try:
        time.sleep(1)
        apply(c, namespace, finetune("sturdy", resources={"gpus": 16}))
        first = wait_phase(c, namespace, "sturdy", "Pending", "Unschedulable", timeout=60)
        since = {x["type"]: x["lastTransitionTime"] for x in first["conditions"]}
        for i in range(10):
            operator.kill(signal.SIGKILL)
            if i == 4:  # a child deleted while the operator is down
                c.kubectl("delete", "configmap", "sturdy-config", "-n", namespace)
            operator.start()
            time.sleep(0.5)
        wait_for(
            "the ConfigMap recreated",
            lambda: (
                c.kubectl(
                    "get", "configmap", "sturdy-config", "-n", namespace, check=False
                ).returncode
                == 0
            ),
        )
        status = get_gft(c, namespace, "sturdy")["status"]
        assert (status["phase"], status["reason"]) == ("Pending", "Unschedulable")
        assert {x["type"]: x["lastTransitionTime"] for x in status["conditions"]} == since
    finally:
        watch.terminate()
        out, _ = watch.communicate(timeout=10)
    added = [line for line in out.splitlines() if line.startswith("ADDED ")]
    assert added == ["ADDED sturdy"], out


# ---------------------------------------------------------------------------------------------
# Reaction time (docs/benchmarks.md, "Operator")
# ---------------------------------------------------------------------------------------------
def _percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@pytest.mark.slow
def test_reaction_time_from_apply_to_job(operator, namespace, tmp_path):
    """Median and p99 over 50 applies of the time from `kubectl apply` to the Job existing
    (and from the apply's return to the Job: the operator's own share), beside the time to
    create the same Job directly with a Kubernetes client. Numbers: docs/benchmarks.md."""
    from gft_operator.kube import Kube, load_config

    c = operator.cluster
    kube = Kube(load_config(str(c.kubeconfig)))
    n = 50
    total, after_apply = [], []
    for i in range(n):
        name = f"r{i}"
        t0 = time.monotonic()
        apply(c, namespace, finetune(name, resources={"gpus": 16}))
        t1 = time.monotonic()
        while kube.get("Job", namespace, name) is None:
            time.sleep(0.005)
        t2 = time.monotonic()
        total.append(t2 - t0)
        after_apply.append(t2 - t1)
    template = kube.get("Job", namespace, "r0")["spec"]["template"]
    template["metadata"] = {"labels": {"bench": "direct"}}
    direct = []
    for i in range(n):
        t0 = time.monotonic()
        kube.create(
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": f"d{i}", "namespace": namespace},
                "spec": {"suspend": True, "template": template},
            }
        )
        direct.append(time.monotonic() - t0)
    result = {"n": n}
    for label, values in (
        ("apply_to_job", total),
        ("applied_to_job", after_apply),
        ("direct_create", direct),
    ):
        result[f"{label}_median_s"] = round(_percentile(values, 0.5), 3)
        result[f"{label}_p99_s"] = round(_percentile(values, 0.99), 3)
    print("REACTION", json.dumps(result))
    (tmp_path / "reaction.json").write_text(json.dumps(result))
    assert result["apply_to_job_p99_s"] < 10, result


def test_output_claim_that_cannot_bind_is_reported(operator, namespace):
    c = operator.cluster
    apply(c, namespace, on_kwok("unbound", output={"pvc": {"storageClassName": "no-such-class"}}))
    status = wait_phase(c, namespace, "unbound", "Pending", "PersistentVolumeClaimNotBound")
    assert "PersistentVolumeClaim" in status["message"]


def test_missing_dataset_configmap_is_reported(operator, namespace):
    c = operator.cluster
    manifest = finetune(
        "nodata",
        dataset={"configMap": {"name": "no-such-records", "key": "train.jsonl"}},
        resources={
            "gpus": 1,
            "nodeSelector": {"gft.dev/runner": "true"},
            "tolerations": [{"key": "gft.dev/runner", "operator": "Exists"}],
        },
    )
    apply(c, namespace, manifest)
    status = wait_phase(c, namespace, "nodata", "Pending", "ConfigMapNotFound")
    assert "no-such-records" in status["message"]


def test_pod_security_refusing_the_pods_surfaces_failed_create(operator, namespace, tmp_path):
    """An operator configured with a root user (--run-as-user 0) makes pods that the namespace's
    restricted PodSecurity level refuses: the Job exists, its pods are never created."""
    c = operator.cluster
    operator.kill()
    root = OperatorProcess(c, operator.kubeconfig, tmp_path / "root.log", "--run-as-user", "0")
    root.start()
    try:
        apply(c, namespace, on_kwok("rooted"))
        status = wait_phase(c, namespace, "rooted", "Pending", "PodSecurityViolation")
        assert "runAsUser" in status["message"]
    finally:
        root.kill()
        operator.start()


def test_create_in_a_terminating_namespace_is_told_apart(installed):
    """A fine-tune reconciled while its namespace is being deleted: the API server refuses new
    objects there, and the client says so with its own error (the operator logs it as such,
    not as a failed reconcile)."""
    from gft_operator.kube import Kube, NamespaceTerminating, load_config

    c = installed
    ns = f"t-terminating-{int(time.time())}"
    c.kubectl("create", "namespace", ns)
    held = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "held", "finalizers": ["gft.dev/test"]},
    }
    apply(c, ns, held)
    c.kubectl("delete", "namespace", ns, "--wait=false")
    kube = Kube(load_config(str(c.kubeconfig)))
    try:
        wait_for(
            f"{ns} terminating",
            lambda: c.kubectl_json("get", "namespace", ns)["status"]["phase"] == "Terminating",
        )
        with pytest.raises(NamespaceTerminating, match="being terminated"):
            kube.create(
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "new", "namespace": ns},
                }
            )
    finally:
        c.kubectl(
            "patch",
            "configmap",
            "held",
            "-n",
            ns,
            "--type",
            "merge",
            "-p",
            '{"metadata":{"finalizers":null}}',
        )


def test_steady_runs_cost_the_api_server_no_reads(operator, namespace):
    """Every reconcile (watch events, the periodic resync) reads from the operator's
    watch-fed caches: while runs go on, the audit log shows no GET and no LIST from the
    operator's user, only its watches and writes. Before: about seven reads a reconcile."""
    c = operator.cluster
    names = [f"steady-{i}" for i in range(3)]
    for name in names:
        apply(c, namespace, on_kwok(name, podAnnotations={"gft.dev/kwok-keep-running": "1"}))
    for name in names:
        wait_phase(c, namespace, name, "Running", timeout=60)
    audit = Path(c.state_dir) / "logs" / "audit.log"
    offset = audit.stat().st_size
    operator_looked_again(operator, times=2)  # two resyncs of all three
    reads = []
    with audit.open() as f:
        f.seek(offset)
        for line in f:
            entry = json.loads(line)
            ref = entry.get("objectRef") or {}
            if (
                entry.get("user", {}).get("username") == OPERATOR_USER
                and entry.get("verb") in ("get", "list")
                and entry.get("stage") == "ResponseComplete"
                # The trainers' /metrics through the pod proxy (metrics.access: proxy) are the
                # trainers' numbers, not a read of the cluster's state.
                and ref.get("subresource") != "proxy"
                # Another test's namespace being deleted meanwhile: its children go first,
                # and the operator confirms (one list by name) that their fine-tune still
                # exists before making them again. Not a steady run's cost.
                and ref.get("namespace") in (None, namespace)
            ):
                reads.append(f"{entry['verb']} {entry['requestURI']}")
    assert reads == [], reads
    c.kubectl("delete", "gft", *names, "-n", namespace, "--wait=false")
