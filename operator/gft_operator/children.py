"""The children of a GemmaFineTune, computed from its spec: pure functions, no API calls.

``desired_children`` returns every object that should exist (output PVC, ConfigMap, Service,
Ingress, Job) as plain manifests with owner references already set; the handlers create the
missing ones. ``job_patch`` says what may change on a live Job: only ``suspend`` (never with a
Kueue queue) and ``ttlSecondsAfterFinished``; the pod template of a live Job is never patched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import kopf
from gft_api import API_VERSION, KIND
from gft_api.contract import (
    CONFIG_DIR,
    CONFIG_FILE_NAME,
    HF_TOKEN_ENV,
    NON_RETRYABLE_EXIT_CODES,
    TERMINATION_MESSAGE_PATH,
    TRAINER_COMMAND,
    DataShaping,
    DataSource,
    ExitCode,
    ModelSource,
    Observability,
    OutputSettings,
    TrainerConfig,
)
from gft_api.v1alpha1 import GemmaFineTuneSpec, ReclaimPolicy, child_names

Manifest = dict[str, Any]

TRAINER = "trainer"
TENSORBOARD = "tensorboard"
TENSORBOARD_PORT = 6006
METRICS_PORT = 9090

OUTPUT_DIR = "/output"
TENSORBOARD_DIR = f"{OUTPUT_DIR}/tensorboard"
HF_HOME = f"{OUTPUT_DIR}/.cache/huggingface"
MODEL_DIR = "/mnt/model"
DATASET_DIR = "/mnt/dataset"
DATASET_CONFIGMAP_DIR = "/mnt/dataset-configmap"

NAME_LABEL = "finetune.gemma.dev/name"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MANAGED_BY = "gft-operator"


@dataclass(frozen=True)
class Defaults:
    """Operator-wide settings that the spec does not carry."""

    image: str = "ghcr.io/gemma-finetune/trainer:0.1.0"
    """Trainer image when ``spec.image`` is empty."""

    run_as_user: int = 1000
    """Numeric user (and group) of the training pod: the restricted PodSecurity level needs a
    non-root user, and a numeric one lets the kubelet check it without reading the image."""


@dataclass(frozen=True)
class Owner:
    """The GemmaFineTune that owns the children."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: Any) -> Owner:
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])

    def reference_body(self) -> Manifest:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid},
        }


def labels(name: str) -> dict[str, str]:
    """Labels on every child; ``finetune.gemma.dev/name`` selects them."""
    return {
        "app.kubernetes.io/name": "gemma-finetune",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        NAME_LABEL: name,
    }


def _meta(owner: Owner, name: str, component: str) -> Manifest:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**labels(owner.name), "app.kubernetes.io/component": component},
    }


def _adopt(obj: Manifest, owner: Owner) -> Manifest:
    kopf.append_owner_reference(obj, owner=owner.reference_body())
    return obj


def output_claim_name(owner: Owner, spec: GemmaFineTuneSpec) -> str:
    return spec.output.existing_claim or child_names(owner.name)["pvc"]


# ---------------------------------------------------------------------------------------------
# The trainer's config
# ---------------------------------------------------------------------------------------------
def trainer_config(owner: Owner, spec: GemmaFineTuneSpec) -> TrainerConfig:
    """The one config file the trainer reads, with paths as the pod mounts them."""
    model = spec.model
    if model.volume is not None:
        model_path = _join(MODEL_DIR, model.volume.path)
    else:
        model_path = model.path or model.name
    ds = spec.dataset
    if ds.volume is not None:
        source = DataSource(
            train_files=[_join(DATASET_DIR, ds.volume.path)],
            eval_files=[_join(DATASET_DIR, ds.volume.eval_path)] if ds.volume.eval_path else [],
        )
    elif ds.config_map is not None:
        cm = ds.config_map
        source = DataSource(
            train_files=[f"{DATASET_CONFIGMAP_DIR}/{cm.key}"],
            eval_files=[f"{DATASET_CONFIGMAP_DIR}/{cm.eval_key}"] if cm.eval_key else [],
        )
    elif ds.hub is not None:
        source = DataSource(
            hub_id=ds.hub.id,
            hub_config=ds.hub.config,
            hub_train_split=ds.hub.split,
            hub_eval_split=ds.hub.eval_split,
        )
    else:
        assert ds.path is not None  # the spec guarantees exactly one source
        source = DataSource(
            train_files=[ds.path], eval_files=[ds.eval_path] if ds.eval_path else []
        )
    return TrainerConfig(
        run_name=f"{owner.namespace}/{owner.name}",
        model=ModelSource(
            name_or_path=model_path,
            revision=model.revision,
            cache_dir=f"{HF_HOME}/hub",
            attn_implementation=model.attn_implementation,
        ),
        dataset=source,
        data=DataShaping.model_validate(ds.model_dump(include=set(DataShaping.model_fields))),
        method=spec.method,
        training=spec.training,
        output=OutputSettings(
            dir=OUTPUT_DIR,
            checkpoint_every_steps=spec.output.checkpoint_every_steps,
            keep_checkpoints=spec.output.keep_checkpoints,
        ),
        observability=Observability(tensorboard_dir=TENSORBOARD_DIR, metrics_port=METRICS_PORT),
    )


def _join(root: str, sub: str | None) -> str:
    return f"{root}/{sub.strip('/')}" if sub else root


def config_map(owner: Owner, spec: GemmaFineTuneSpec) -> Manifest:
    """The rendered config. Holds no secret: the hub token reaches the trainer as an env var."""
    return _adopt(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(owner, child_names(owner.name)["configmap"], "config"),
            "data": {CONFIG_FILE_NAME: trainer_config(owner, spec).dump()},
        },
        owner,
    )


# ---------------------------------------------------------------------------------------------
# Storage, Service, Ingress
# ---------------------------------------------------------------------------------------------
def output_pvc(owner: Owner, spec: GemmaFineTuneSpec) -> Manifest | None:
    """The output claim the operator creates; ``None`` when the user named an existing one.

    Retained on delete (no owner reference, so garbage collection leaves it) unless the user
    chose ``reclaimPolicy: Delete``.
    """
    if spec.output.existing_claim:
        return None
    claim = spec.output.claim
    pvc: Manifest = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(owner, child_names(owner.name)["pvc"], "output"),
        "spec": {
            "accessModes": [claim.access_mode],
            "resources": {"requests": {"storage": str(claim.size)}},
        },
    }
    if claim.storage_class_name:
        pvc["spec"]["storageClassName"] = claim.storage_class_name
    if claim.reclaim_policy == ReclaimPolicy.DELETE:
        _adopt(pvc, owner)
    return pvc


def service(owner: Owner, spec: GemmaFineTuneSpec) -> Manifest:
    """TensorBoard and the trainer's /metrics, in front of the training pod."""
    ports = [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}]
    if spec.tensorboard.enabled:
        ports.insert(0, {"name": TENSORBOARD, "port": TENSORBOARD_PORT, "targetPort": TENSORBOARD})
    return _adopt(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(owner, child_names(owner.name)["service"], "service"),
            "spec": {
                # The trainer pod while it runs, the TensorBoard Deployment's pod after it
                # (a finished trainer pod is not ready, so it drops out of the endpoints).
                "selector": {NAME_LABEL: owner.name},
                "ports": ports,
            },
        },
        owner,
    )


def ingress(owner: Owner, spec: GemmaFineTuneSpec) -> Manifest | None:
    """An Ingress to TensorBoard, when asked for."""
    ing = spec.tensorboard.ingress
    if ing is None or not spec.tensorboard.enabled:
        return None
    name = child_names(owner.name)["ingress"]
    meta = _meta(owner, name, "tensorboard")
    if ing.annotations:
        meta["annotations"] = dict(ing.annotations)
    body: Manifest = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": meta,
        "spec": {
            "rules": [
                {
                    "host": ing.host,
                    "http": {
                        "paths": [
                            {
                                "path": ing.path,
                                "pathType": "Prefix",
                                "backend": {
                                    "service": {
                                        "name": child_names(owner.name)["service"],
                                        "port": {"name": TENSORBOARD},
                                    }
                                },
                            }
                        ]
                    },
                }
            ]
        },
    }
    if ing.ingress_class_name:
        body["spec"]["ingressClassName"] = ing.ingress_class_name
    if ing.tls_secret_name:
        body["spec"]["tls"] = [{"hosts": [ing.host], "secretName": ing.tls_secret_name}]
    return _adopt(body, owner)


def tensorboard_url(owner: Owner, spec: GemmaFineTuneSpec) -> str | None:
    """Where TensorBoard answers: the Ingress when there is one, else the in-cluster Service."""
    if not spec.tensorboard.enabled:
        return None
    ing = spec.tensorboard.ingress
    if ing is not None:
        scheme = "https" if ing.tls_secret_name else "http"
        return f"{scheme}://{ing.host}{ing.path}"
    svc = child_names(owner.name)["service"]
    return f"http://{svc}.{owner.namespace}.svc:{TENSORBOARD_PORT}{tensorboard_prefix(spec)}/"


def tensorboard_prefix(spec: GemmaFineTuneSpec) -> str:
    """TensorBoard's ``--path_prefix``: the Ingress path without its trailing slash."""
    ing = spec.tensorboard.ingress
    return ing.path.rstrip("/") if ing is not None else ""


def tensorboard_container(spec: GemmaFineTuneSpec, image: str) -> Manifest:
    """TensorBoard over the output volume's event files (read-only)."""
    command = ["tensorboard", "--logdir", TENSORBOARD_DIR, "--bind_all"]
    command += ["--port", str(TENSORBOARD_PORT)]
    if tensorboard_prefix(spec):
        command += ["--path_prefix", tensorboard_prefix(spec)]
    return {
        "name": TENSORBOARD,
        "image": spec.tensorboard.image or image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": command,
        "ports": [{"name": TENSORBOARD, "containerPort": TENSORBOARD_PORT}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        "volumeMounts": [{"name": "output", "mountPath": OUTPUT_DIR, "readOnly": True}],
        "securityContext": _CONTAINER_SECURITY,
    }


def tensorboard_deployment(
    owner: Owner, spec: GemmaFineTuneSpec, defaults: Defaults = Defaults()
) -> Manifest:
    """TensorBoard after the run: the sidecar stopped with the trainer, this serves the same
    event files behind the same Service until ``keepAfterFinishSeconds`` has passed."""
    name = child_names(owner.name)["tensorboard"]
    pod_labels = {**labels(owner.name), "app.kubernetes.io/component": TENSORBOARD}
    pod_spec: Manifest = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(defaults),
        "containers": [tensorboard_container(spec, spec.image or defaults.image)],
        "volumes": [
            {
                "name": "output",
                "persistentVolumeClaim": {
                    "claimName": output_claim_name(owner, spec),
                    "readOnly": True,
                },
            }
        ],
    }
    _place(pod_spec, spec)
    return _adopt(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(owner, name, TENSORBOARD),
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": pod_labels},
                "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
            },
        },
        owner,
    )


# ---------------------------------------------------------------------------------------------
# The Job
# ---------------------------------------------------------------------------------------------
def pod_failure_policy() -> Manifest:
    """Disruptions first (eviction, preemption, node loss: ignored, retried without counting);
    non-retryable trainer exits fail the Job at once; a clean stop after a checkpoint is
    ignored (the next attempt resumes); any other trainer failure counts against backoffLimit.
    Exit-code rules name the trainer container: init containers (the TensorBoard sidecar)
    would match them otherwise."""
    return {
        "rules": [
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": TRAINER,
                    "operator": "In",
                    "values": list(NON_RETRYABLE_EXIT_CODES),
                },
            },
            {
                "action": "Ignore",
                "onExitCodes": {
                    "containerName": TRAINER,
                    "operator": "In",
                    "values": [int(ExitCode.STOPPED)],
                },
            },
            {
                "action": "Count",
                "onExitCodes": {"containerName": TRAINER, "operator": "NotIn", "values": [0]},
            },
        ]
    }


_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _trainer_env(spec: GemmaFineTuneSpec) -> list[Manifest]:
    env: list[Manifest] = [
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    ref = spec.model.hf_token_secret_ref
    if ref is not None:
        env.append(
            {
                "name": HF_TOKEN_ENV,
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    for var in spec.env:
        env.append(var.to_wire())
    return env


def _resources(spec: GemmaFineTuneSpec) -> Manifest:
    res = spec.resources
    amounts: dict[str, str] = {}
    if res.cpu is not None:
        amounts["cpu"] = str(res.cpu)
    if res.memory is not None:
        amounts["memory"] = str(res.memory)
    if res.gpus:
        amounts[res.gpu_resource_name] = str(res.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _volumes(owner: Owner, spec: GemmaFineTuneSpec) -> tuple[list[Manifest], list[Manifest]]:
    """The pod's volumes and the trainer's mounts."""
    names = child_names(owner.name)
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": names["configmap"]}},
        {
            "name": "output",
            "persistentVolumeClaim": {"claimName": output_claim_name(owner, spec)},
        },
        {
            "name": "dshm",
            "emptyDir": {"medium": "Memory", "sizeLimit": str(spec.resources.shm_size)},
        },
    ]
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "output", "mountPath": OUTPUT_DIR},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if spec.model.volume is not None:
        claim = spec.model.volume.claim_name
        volumes.append(
            {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})
    ds = spec.dataset
    if ds.volume is not None:
        claim = ds.volume.claim_name
        volumes.append(
            {"name": "dataset", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": "dataset", "mountPath": DATASET_DIR, "readOnly": True})
    if ds.config_map is not None:
        volumes.append({"name": "dataset-configmap", "configMap": {"name": ds.config_map.name}})
        mounts.append(
            {"name": "dataset-configmap", "mountPath": DATASET_CONFIGMAP_DIR, "readOnly": True}
        )
    return volumes, mounts


def _pod_security(defaults: Defaults) -> Manifest:
    """The pod security context the restricted PodSecurity level admits."""
    return {
        "runAsNonRoot": True,
        "runAsUser": defaults.run_as_user,
        "runAsGroup": defaults.run_as_user,
        "fsGroup": defaults.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _place(pod_spec: Manifest, spec: GemmaFineTuneSpec) -> None:
    """Node selector and tolerations of the spec (TensorBoard goes where the volume is)."""
    res = spec.resources
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in res.tolerations]


def job(owner: Owner, spec: GemmaFineTuneSpec, defaults: Defaults = Defaults()) -> Manifest:
    """The Job running the trainer (and TensorBoard as a native sidecar)."""
    image = spec.image or defaults.image
    volumes, mounts = _volumes(owner, spec)
    trainer: Manifest = {
        "name": TRAINER,
        "image": image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": list(TRAINER_COMMAND),
        "env": _trainer_env(spec),
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "securityContext": _CONTAINER_SECURITY,
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: Manifest = {
        "restartPolicy": "Never",  # podFailurePolicy needs it; the Job makes new pods instead
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        "securityContext": _pod_security(defaults),
        "containers": [trainer],
        "volumes": volumes,
    }
    if spec.tensorboard.enabled:
        # A native sidecar: it starts before the trainer and stops when the trainer ends.
        sidecar = {**tensorboard_container(spec, image), "restartPolicy": "Always"}
        pod_spec["initContainers"] = [sidecar]
    _place(pod_spec, spec)
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name

    pod_meta: Manifest = {
        "labels": {**labels(owner.name), "app.kubernetes.io/component": TRAINER},
        # Scrape hints for a Prometheus without the Prometheus Operator (which uses the
        # PodMonitor in manifests/monitoring instead).
        "annotations": {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(METRICS_PORT),
            "prometheus.io/path": "/metrics",
            **spec.pod_annotations,
        },
    }
    meta = _meta(owner, child_names(owner.name)["job"], TRAINER)
    job_spec: Manifest = {
        # With a Kueue queue the Job starts suspended and Kueue alone unsuspends it.
        "suspend": True if spec.queue_name else spec.suspend,
        "completions": 1,
        "parallelism": 1,
        "backoffLimit": spec.backoff_limit,
        "podReplacementPolicy": "Failed",  # never two trainers writing one output at once
        "podFailurePolicy": pod_failure_policy(),
        "template": {"metadata": pod_meta, "spec": pod_spec},
    }
    if spec.queue_name:
        meta["labels"][KUEUE_QUEUE_LABEL] = spec.queue_name
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return _adopt(
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}, owner
    )


def job_patch(spec: GemmaFineTuneSpec, live: Manifest, finished: bool) -> Manifest | None:
    """The merge patch that brings a live Job in line with the spec, or ``None``.

    Only mutable fields: ``suspend`` (left to Kueue when a queue is named; a finished Job
    cannot be suspended) and ``ttlSecondsAfterFinished``. The pod template is immutable and
    never patched.
    """
    live_spec = live.get("spec", {})
    patch: Manifest = {}
    if not spec.queue_name and not finished and bool(live_spec.get("suspend")) != spec.suspend:
        patch["suspend"] = spec.suspend
    if live_spec.get("ttlSecondsAfterFinished") != spec.ttl_seconds_after_finished:
        patch["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return {"spec": patch} if patch else None


def desired_children(
    owner: Owner, spec: GemmaFineTuneSpec, defaults: Defaults = Defaults()
) -> list[Manifest]:
    """Every child that should exist, in creation order (the Job last)."""
    objs = [
        output_pvc(owner, spec),
        config_map(owner, spec),
        service(owner, spec),
        ingress(owner, spec),
        job(owner, spec, defaults),
    ]
    return [o for o in objs if o is not None]
