"""The children builders: spec -> ConfigMap, Job, Service, Ingress, PVC (pure, no cluster)."""

from __future__ import annotations

import pytest
import yaml
from gft_api.contract import (
    HF_TOKEN_ENV,
    HUB_EXPORT_TOKEN_ENV,
    NON_RETRYABLE_EXIT_CODES,
    S3_CREDENTIAL_ENV,
    ExitCode,
    TrainerConfig,
)
from gft_api.v1alpha1 import GemmaFineTuneSpec
from gft_operator import children
from operator_samples import finetune

OWNER = children.Owner(name="demo", namespace="ml", uid="1234-uid")


def _spec(**overrides) -> GemmaFineTuneSpec:
    return GemmaFineTuneSpec.model_validate(finetune(**overrides)["spec"])


def _by_kind(objs):
    return {o["kind"]: o for o in objs}


def _pod(job):
    return job["spec"]["template"]["spec"]


def test_children_and_ownership():
    objs = _by_kind(children.desired_children(OWNER, _spec()))
    assert set(objs) == {"PersistentVolumeClaim", "ConfigMap", "Service", "Job"}
    for kind in ("ConfigMap", "Service", "Job"):
        (ref,) = objs[kind]["metadata"]["ownerReferences"]
        assert ref["uid"] == OWNER.uid and ref["controller"] is True
        assert ref["kind"] == "GemmaFineTune"
    # Retained by default: garbage collection would delete an owned PVC with its owner.
    assert "ownerReferences" not in objs["PersistentVolumeClaim"]["metadata"]
    assert children.desired_children(OWNER, _spec())[-1]["kind"] == "Job"


def test_output_pvc_delete_policy_is_owned_and_existing_claim_is_not_created():
    pvc = children.output_pvc(
        OWNER, _spec(output={"pvc": {"size": "10Gi", "reclaimPolicy": "Delete"}})
    )
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
    spec = _spec(output={"existingClaim": "my-claim"})
    assert children.output_pvc(OWNER, spec) is None
    job = children.job(OWNER, spec)
    volumes = {v["name"]: v for v in _pod(job)["volumes"]}
    assert volumes["output"]["persistentVolumeClaim"]["claimName"] == "my-claim"


def test_config_map_renders_a_valid_trainer_config_without_secrets(tmp_path):
    spec = _spec()
    cm = children.config_map(OWNER, spec)
    text = cm["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    config = TrainerConfig.load(path)
    assert config.model.name_or_path == "google/gemma-3-270m"
    assert config.dataset.hub_id == "HuggingFaceH4/no_robots"
    assert config.training.max_steps == 20
    assert config.method.lora.r == 8
    assert config.output.dir == f"/output/runs/{OWNER.uid}"  # each run in its own folder
    assert config.observability.tensorboard_dir == f"/output/runs/{OWNER.uid}/tensorboard"
    assert config.output.resume_from is None
    resumed = _spec(resumeFrom={"path": "runs/old-uid/checkpoints/checkpoint-40/"})
    config = children.trainer_config(OWNER, resumed)
    assert config.output.resume_from == "/output/runs/old-uid/checkpoints/checkpoint-40"
    assert config.run_name == "ml/demo"
    assert "secret" not in text.lower() and HF_TOKEN_ENV not in text
    assert set(yaml.safe_load(text)["model"]) == {"nameOrPath", "cacheDir", "attnImplementation"}


def test_config_paths_follow_the_mounts():
    spec = _spec(
        model={"name": "gemma", "volume": {"claimName": "models", "path": "gemma-3-1b"}},
        dataset={"volume": {"claimName": "data", "path": "train.jsonl", "evalPath": "eval.jsonl"}},
    )
    config = children.trainer_config(OWNER, spec)
    assert config.model.name_or_path == "/mnt/model/gemma-3-1b"
    assert config.dataset.train_files == ["/mnt/dataset/train.jsonl"]
    assert config.dataset.eval_files == ["/mnt/dataset/eval.jsonl"]
    mounts = {
        m["name"]: m for m in _pod(children.job(OWNER, spec))["containers"][0]["volumeMounts"]
    }
    assert mounts["model"]["mountPath"] == "/mnt/model" and mounts["model"]["readOnly"]
    assert mounts["dataset"]["mountPath"] == "/mnt/dataset"

    spec = _spec(dataset={"configMap": {"name": "records", "key": "train.jsonl"}, "format": "text"})
    config = children.trainer_config(OWNER, spec)
    assert config.dataset.train_files == ["/mnt/dataset-configmap/train.jsonl"]
    assert config.data.format == "text"


def test_job_pod_failure_policy():
    job = children.job(OWNER, _spec())
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    fail = rules[1]
    assert fail["action"] == "FailJob"
    assert fail["onExitCodes"]["containerName"] == "trainer"
    assert fail["onExitCodes"]["values"] == list(NON_RETRYABLE_EXIT_CODES)
    assert rules[2]["action"] == "Ignore"
    assert rules[2]["onExitCodes"]["values"] == [ExitCode.STOPPED]
    assert all(r["onExitCodes"]["containerName"] == "trainer" for r in rules[1:])
    assert _pod(job)["restartPolicy"] == "Never"
    assert job["spec"]["podReplacementPolicy"] == "Failed"


def test_job_pod_is_restricted_and_gets_the_token_only_from_the_secret():
    job = children.job(OWNER, _spec())
    pod = _pod(job)
    assert pod["automountServiceAccountToken"] is False
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"] + pod["initContainers"]:
        csc = c["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False
        assert csc["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env[HF_TOKEN_ENV] == {
        "name": HF_TOKEN_ENV,
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
    }
    assert pod["terminationGracePeriodSeconds"] == 600
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_exports_get_their_secrets_as_env_and_the_config_names_no_secret(tmp_path):
    spec = _spec(
        output={
            "s3": {
                "bucket": "models",
                "prefix": "team/",
                "endpoint": "http://s3.example:8333",
                "credentialsSecretRef": {"name": "s3-keys"},
            },
            "hub": {"repo": "me/pip", "tokenSecretRef": {"name": "hub-write", "key": "hf"}},
        }
    )
    env = {e["name"]: e for e in _pod(children.job(OWNER, spec))["containers"][0]["env"]}
    for name in S3_CREDENTIAL_ENV:
        assert env[name]["valueFrom"] == {"secretKeyRef": {"name": "s3-keys", "key": name}}
    assert env[HUB_EXPORT_TOKEN_ENV]["valueFrom"] == {
        "secretKeyRef": {"name": "hub-write", "key": "hf"}
    }
    config = children.trainer_config(OWNER, spec)
    assert config.output.s3 is not None and config.output.s3.prefix == "team/ml/demo"
    assert config.output.hub is not None and config.output.hub.repo == "me/pip"
    text = children.config_map(OWNER, spec)["data"]["config.yaml"]
    assert "s3-keys" not in text and "hub-write" not in text
    assert "credentialsSecretRef" not in text and "tokenSecretRef" not in text


def test_tensorboard_is_a_native_sidecar_over_the_output_volume():
    pod = _pod(children.job(OWNER, _spec()))
    (tb,) = pod["initContainers"]
    assert tb["restartPolicy"] == "Always"
    assert tb["command"][:3] == ["tensorboard", "--logdir", f"/output/runs/{OWNER.uid}/tensorboard"]
    assert "--bind_all" in tb["command"]
    assert tb["volumeMounts"] == [
        {"name": "output", "mountPath": "/output", "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},  # the root file system is read-only
    ]
    assert tb["securityContext"]["readOnlyRootFilesystem"] is True
    assert tb["resources"]["limits"]["memory"] and tb["readinessProbe"]["httpGet"]["path"] == "/"
    pod = _pod(children.job(OWNER, _spec(tensorboard={"enabled": False})))
    assert "initContainers" not in pod
    svc = children.service(OWNER, _spec(tensorboard={"enabled": False}))
    assert [p["name"] for p in svc["spec"]["ports"]] == ["metrics"]


def test_gpus_placement_and_priority_pass_through():
    spec = _spec(
        resources={
            "gpus": 2,
            "cpu": 8,
            "memory": "64Gi",
            "nodeSelector": {"gft.dev/runner": "true"},
            "tolerations": [
                {"key": "gft.dev/runner", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "priorityClassName": "training",
        }
    )
    pod = _pod(children.job(OWNER, spec))
    res = pod["containers"][0]["resources"]
    assert res["limits"] == {
        "cpu": "8",
        "memory": "64Gi",
        "nvidia.com/gpu": "2",
        "ephemeral-storage": "10Gi",  # /tmp only: downloads and checkpoints go to /output
    }
    assert res["requests"] == {**res["limits"], "ephemeral-storage": "1Gi"}
    assert pod["nodeSelector"] == {"gft.dev/runner": "true"}
    assert pod["tolerations"] == [
        {"key": "gft.dev/runner", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["priorityClassName"] == "training"
    cpu_only = _pod(children.job(OWNER, _spec(resources={"gpus": 0})))
    assert cpu_only["containers"][0]["resources"] == {
        "requests": {"ephemeral-storage": "1Gi"},
        "limits": {"ephemeral-storage": "10Gi"},
    }


def test_kueue_queue_creates_the_job_suspended_and_never_patches_suspend():
    spec = _spec(queueName="gpu-queue")
    job = children.job(OWNER, spec)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    live = {"spec": {"suspend": False}}  # Kueue admitted it
    assert children.job_patch(spec, live, finished=False) is None
    live = {"spec": {"suspend": True}}
    assert children.job_patch(_spec(queueName="gpu-queue", suspend=False), live, False) is None


def test_kueue_priority_label_and_suspend_through_the_workload():
    spec = _spec(queueName="gpu-queue", queuePriorityClass="research-high")
    labels = children.job(OWNER, spec)["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/priority-class"] == "research-high"
    assert (
        "kueue.x-k8s.io/priority-class"
        not in (children.job(OWNER, _spec(queueName="q"))["metadata"]["labels"])
    )
    active = {"spec": {"active": True}}
    assert children.workload_patch(_spec(queueName="q"), active) is None
    assert children.workload_patch(_spec(queueName="q", suspend=True), active) == {
        "spec": {"active": False}
    }
    inactive = {"spec": {"active": False}}
    assert children.workload_patch(_spec(queueName="q"), inactive) == {"spec": {"active": True}}
    assert children.workload_patch(_spec(queueName="q"), {"spec": {}}) is None  # default: active


def test_a_multi_node_run_is_an_indexed_job_behind_a_headless_service():
    shared = {"pvc": {"accessMode": "ReadWriteMany"}}
    spec = _spec(resources={"gpus": 8, "nodes": 4}, output=shared)
    job = children.job(OWNER, spec)
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (4, 4)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    pod = _pod(job)
    assert pod["subdomain"] == f"{OWNER.name}-nodes"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["GFT_NODES"] == "4"
    assert env["GFT_MASTER_ADDR"] == f"{OWNER.name}-0.{OWNER.name}-nodes"
    assert env["GFT_MASTER_PORT"] == str(children.RENDEZVOUS_PORT)
    svc = children.nodes_service(OWNER, spec)
    assert svc["metadata"]["name"] == pod["subdomain"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    kinds = [(o["kind"], o["metadata"]["name"]) for o in children.desired_children(OWNER, spec)]
    assert ("Service", f"{OWNER.name}-nodes") in kinds
    one = _spec()
    assert children.nodes_service(OWNER, one) is None
    assert "completionMode" not in children.job(OWNER, one)["spec"]
    assert "GFT_NODES" not in {
        e["name"] for e in _pod(children.job(OWNER, one))["containers"][0]["env"]
    }


def test_stop_suspends_the_job_or_deactivates_the_workload_for_good():
    """spec.stop stops the trainer the way suspend does (a checkpoint first); suspend: false
    cannot bring a stopped run back."""
    live = {"spec": {"suspend": False}}
    assert children.job_patch(_spec(stop=True), live, finished=False) == {"spec": {"suspend": True}}
    assert children.job_patch(_spec(stop=True), {"spec": {"suspend": True}}, False) is None
    assert children.job_patch(_spec(stop=True), live, finished=True) is None
    active = {"spec": {"active": True}}
    assert children.workload_patch(_spec(queueName="q", stop=True), active) == {
        "spec": {"active": False}
    }
    assert children.paused(_spec(stop=True, suspend=False))


def test_job_patch_touches_only_suspend_and_the_operator_owns_the_ttl():
    live = children.job(OWNER, _spec(ttlSecondsAfterFinished=60))
    assert "ttlSecondsAfterFinished" not in live["spec"]  # the operator deletes it itself
    assert children.job_patch(_spec(), live, finished=False) is None
    patch = children.job_patch(_spec(suspend=True, ttlSecondsAfterFinished=60), live, False)
    assert patch == {"spec": {"suspend": True}}
    assert children.job_patch(_spec(suspend=True), live, True) is None  # not once finished
    # A Job an older operator made with the TTL controller's field: the field goes.
    older = {**live, "spec": {**live["spec"], "ttlSecondsAfterFinished": 0}}
    assert children.job_patch(_spec(), older, False) == {"spec": {"ttlSecondsAfterFinished": None}}


def test_the_job_and_its_pods_are_held_until_the_outcome_is_recorded():
    job = children.job(OWNER, _spec())
    assert job["metadata"]["finalizers"] == [children.OUTCOME_FINALIZER]
    template = job["spec"]["template"]["metadata"]
    assert template["finalizers"] == [children.OUTCOME_FINALIZER]
    assert template["labels"][children.UID_LABEL] == OWNER.uid
    assert job["metadata"]["labels"][children.UID_LABEL] == OWNER.uid


def test_ingress_when_asked_and_tensorboard_url():
    spec = _spec(tensorboard={"ingress": {"host": "tb.example.com", "tlsSecretName": "tls"}})
    ing = children.ingress(OWNER, spec)
    rule = ing["spec"]["rules"][0]
    assert rule["host"] == "tb.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"] == {
        "name": "demo",
        "port": {"name": "tensorboard"},
    }
    assert children.tensorboard_url(OWNER, spec) == "https://tb.example.com/"
    assert children.ingress(OWNER, _spec()) is None
    assert children.tensorboard_url(OWNER, _spec()) == "http://demo.ml.svc:6006/"


def test_pod_annotations_extra_env_and_image():
    spec = _spec(
        podAnnotations={"gft.dev/kwok-exit-code": "78", "prometheus.io/scrape": "false"},
        env=[{"name": "FOO", "value": "bar"}],
        image="example.com/trainer:dev",
    )
    job = children.job(OWNER, spec)
    assert job["spec"]["template"]["metadata"]["annotations"] == {
        "gft.dev/kwok-exit-code": "78",
        "prometheus.io/scrape": "false",  # the user's annotations win over the scrape hints
        "prometheus.io/port": "9090",
        "prometheus.io/path": "/metrics",
    }
    trainer = _pod(job)["containers"][0]
    assert {"name": "FOO", "value": "bar"} in trainer["env"]
    assert trainer["image"] == "example.com/trainer:dev"
    assert trainer["command"][0] == "gft-train"


def test_tensorboard_after_the_run_serves_the_same_files_behind_the_same_service():
    spec = _spec(
        tensorboard={"pathPrefix": "/runs/demo/", "ingress": {"host": "tb.example.com"}},
        resources={"gpus": 1, "nodeSelector": {"pool": "a100"}},
    )
    job = children.job(OWNER, spec)
    deployment = children.tensorboard_deployment(OWNER, spec)
    sidecar = _pod(job)["initContainers"][0]
    (after,) = deployment["spec"]["template"]["spec"]["containers"]
    # The same TensorBoard, with the Ingress's path as its prefix, over the same volume.
    assert after["command"] == sidecar["command"]
    assert after["command"][-2:] == ["--path_prefix", "/runs/demo"]
    assert "restartPolicy" not in after and sidecar["restartPolicy"] == "Always"
    pod_spec = deployment["spec"]["template"]["spec"]
    assert pod_spec["volumes"] == [
        {
            "name": "output",
            "persistentVolumeClaim": {"claimName": "demo-output", "readOnly": True},
        },
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    assert "nodeSelector" not in pod_spec  # the scheduler follows the claim, not the GPU pool
    assert "nvidia.com/gpu" not in str(pod_spec)
    assert pod_spec["securityContext"] == _pod(job)["securityContext"]
    assert deployment["metadata"]["name"] == "demo-tb"
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    # The Service selects both the trainer's pod and TensorBoard's.
    selector = children.service(OWNER, spec)["spec"]["selector"]
    for labels in (
        job["spec"]["template"]["metadata"]["labels"],
        deployment["spec"]["template"]["metadata"]["labels"],
    ):
        assert selector.items() <= labels.items()
    assert children.tensorboard_url(OWNER, spec) == "http://tb.example.com/runs/demo/"
    assert children.tensorboard_url(OWNER, _spec()) == "http://demo.ml.svc:6006/"


def test_the_admin_policy_bounds_what_a_fine_tune_asks_for():
    from gft_operator.policy import Policy, violations

    strict = Policy(
        allowed_image_prefixes=("ghcr.io/acme/",),
        allowed_ingress_host_suffixes=(".tb.acme.dev",),
        allowed_ingress_classes=("internal",),
        allowed_pod_annotation_prefixes=("acme.dev/",),
        allowed_ingress_annotation_keys=("acme.dev/*", "nginx.ingress.kubernetes.io/auth-url"),
        require_ingress_tls=True,
    )
    fine = _spec(
        image="ghcr.io/acme/trainer:1",
        tensorboard={
            "ingress": {
                "host": "run.tb.acme.dev",
                "ingressClassName": "internal",
                "tlsSecretName": "tls",
                "annotations": {"acme.dev/x": "1", "nginx.ingress.kubernetes.io/auth-url": "u"},
            }
        },
        podAnnotations={"acme.dev/team": "nlp"},
    )
    assert violations(fine, "ghcr.io/acme/trainer:0", strict) == []
    wild = _spec(
        image="docker.io/evil/miner:latest",
        tensorboard={
            "image": "ghcr.io/acme/tb:1",
            "ingress": {
                "host": "tb.evil.com",
                "ingressClassName": "public",
                "annotations": {"nginx.ingress.kubernetes.io/server-snippet": "x"},
            },
        },
        podAnnotations={"sidecar.istio.io/inject": "false"},
    )
    found = violations(wild, "ghcr.io/acme/trainer:0", strict)
    assert [f.split()[0] for f in found] == [
        "spec.image",
        "spec.podAnnotations",
        "spec.tensorboard.ingress.host",
        "spec.tensorboard.ingress.ingressClassName",
        "spec.tensorboard.ingress.tlsSecretName",
        "spec.tensorboard.ingress.annotations",
    ]
    assert "docker.io/evil/miner:latest" in found[0] and "ghcr.io/acme/" in found[0]
    assert violations(wild, "x", Policy()) == []  # no policy: anything goes
    # The admin's Ingress annotations win over the author's.
    forced = Policy(ingress_annotations={"nginx.ingress.kubernetes.io/auth-url": "https://a"})
    spec = _spec(
        tensorboard={
            "ingress": {
                "host": "h.example.com",
                "annotations": {"nginx.ingress.kubernetes.io/auth-url": "", "x": "y"},
            }
        }
    )
    ing = children.ingress(OWNER, spec, forced)
    assert ing["metadata"]["annotations"] == {
        "nginx.ingress.kubernetes.io/auth-url": "https://a",
        "x": "y",
    }


def test_a_network_policy_lets_only_the_operator_and_named_namespaces_in():
    from gft_operator.policy import Policy

    assert children.network_policy(OWNER, _spec(), Policy()) is None
    netpol = children.network_policy(
        OWNER,
        _spec(),
        Policy(
            network_policy=True,
            operator_namespace="ops",
            network_policy_namespaces=("ingress-nginx",),
        ),
    )
    spec = netpol["spec"]
    assert spec["podSelector"] == {"matchLabels": {"finetune.gemma.dev/name": "demo"}}
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": "metrics"}, {"port": "tensorboard"}]
    assert rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ops"
    }
    assert rule["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "gemma-finetune-operator"
    }
    assert rule["from"][1]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "gemma-finetune-dashboard"
    }
    assert rule["from"][2] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}
    }
    assert netpol["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid


def test_tensorboard_after_the_run_does_not_pin_the_trainers_gpu_nodes():
    """Finding 9. Before: the after-run TensorBoard copied the trainer's nodeSelector and held
    a GPU node (for keepAfterFinishSeconds, an hour by default) to serve event files."""
    spec = _spec(
        resources={
            "gpus": 1,
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        }
    )
    pod_spec = children.tensorboard_deployment(OWNER, spec)["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod_spec and "affinity" not in pod_spec
    # The toleration stays: where the claim's volume is bound to a tainted node, it may go.
    assert pod_spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    # The admin may send it to a pool of its own (--tensorboard-node-selector).
    pooled = children.Defaults(tensorboard_node_selector={"pool": "cpu"})
    deployment = children.tensorboard_deployment(OWNER, spec, pooled)
    assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}
    trainer = children.job(OWNER, spec, pooled)["spec"]["template"]["spec"]
    assert trainer["nodeSelector"] == {"nvidia.com/gpu.present": "true"}  # the run's own


def test_the_tensorboard_node_selector_flag_takes_node_labels_only():
    """A flag the API server would refuse on every after-run TensorBoard stops the operator
    at its start, naming the flag."""
    from gft_operator.__main__ import _labels

    assert _labels(["gft.dev/runner=true", "pool=cpu"]) == {"gft.dev/runner": "true", "pool": "cpu"}
    for bad in ("no-equals", "a/b/c=x", "x=not ok!", "=v"):
        with pytest.raises(SystemExit, match="--tensorboard-node-selector"):
            _labels([bad])
