"""The children of a GemmaFineTune, computed from its spec: pure functions, no API calls.

``desired_children`` returns every object that should exist (output PVC, ConfigMap, Service,
Ingress, Job) as plain manifests with owner references already set; the handlers create the
missing ones. ``job_patch`` says what may change on a live Job: only ``suspend`` (never with a
Kueue queue); the pod template of a live Job is never patched.

Each run owns its files: everything the trainer writes goes under ``runs/<uid>`` on the output
volume, so a fine-tune re-created under the same name (a new object, a new uid) starts fresh
and two fine-tunes sharing an ``existingClaim`` never touch each other's checkpoints.

The Job and its pods carry the ``OUTCOME_FINALIZER``: a finished Job (and the pod holding the
trainer's termination message) cannot disappear — TTL, a delete by hand, the operator being
down — before the operator has written the run's outcome into the status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import kopf
from gft_api import API_VERSION, KIND
from gft_api.contract import (
    CONFIG_DIR,
    CONFIG_FILE_NAME,
    DATASET_S3_CREDENTIAL_ENV,
    HF_TOKEN_ENV,
    HUB_EXPORT_TOKEN_ENV,
    NON_RETRYABLE_EXIT_CODES,
    S3_CREDENTIAL_ENV,
    TERMINATION_MESSAGE_PATH,
    TRAINER_COMMAND,
    DataShaping,
    DataSource,
    ExitCode,
    HubTarget,
    ModelSource,
    Observability,
    OutputSettings,
    S3Dataset,
    S3Target,
    TrainerConfig,
)
from gft_api.conventions import (
    MANAGED_BY,
    METRICS_PORT,
    NAME_LABEL,
    TENSORBOARD,
    TENSORBOARD_PORT,
    TRAINER,
    UID_LABEL,
)
from gft_api.v1alpha1 import GemmaFineTuneSpec, ReclaimPolicy, child_names
from pydantic import BaseModel

from gft_operator.policy import Policy

Manifest = dict[str, Any]

RENDEZVOUS_PORT = 29500  # rank 0's store, where a multi-node run's ranks meet (torch's default)

OUTPUT_DIR = "/output"
HF_HOME = f"{OUTPUT_DIR}/.cache/huggingface"
MODEL_DIR = "/mnt/model"
DATASET_DIR = "/mnt/dataset"
DATASET_CONFIGMAP_DIR = "/mnt/dataset-configmap"

KUBE_SCORE_IGNORE = {
    # Deliberate (README, "Checked by kube-score"): images are pinned by tag and the author
    # picks spec.imagePullPolicy; egress goes to the hub, registries and the API server, whose
    # addresses are the cluster's own; one TensorBoard per run is enough.
    "kube-score/ignore": "container-image-pull-policy,pod-networkpolicy,deployment-replicas"
}
OUTCOME_FINALIZER = "finetune.gemma.dev/outcome"
"""On the Job and its pods until the operator has recorded what they say about the run."""
RUNS_DIR = "runs"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


@dataclass(frozen=True)
class Defaults:
    """Operator-wide settings that the spec does not carry."""

    image: str = "ghcr.io/gemma-finetune/trainer:0.1.0"
    """Trainer image when ``spec.image`` is empty."""

    run_as_user: int = 10001
    """Numeric user (and group) of the training pod: the restricted PodSecurity level needs a
    non-root user, and a numeric one lets the kubelet check it without reading the image
    (10000 and up: no clash with a user of the node)."""

    policy: Policy = field(default_factory=Policy)
    """The admin's bounds on what a fine-tune may ask for, and the NetworkPolicy settings."""

    tensorboard_node_selector: dict[str, str] = field(default_factory=dict)
    """Where TensorBoard runs after a run (the admin's choice, say a CPU pool): not the run's
    own node selector, which would hold a GPU node for as long as it is kept."""


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


def run_path(owner: Owner) -> str:
    """This run's folder on the output volume, relative to its root."""
    return f"{RUNS_DIR}/{owner.uid}"


def run_dir(owner: Owner) -> str:
    """This run's folder as the trainer and TensorBoard see it."""
    return f"{OUTPUT_DIR}/{run_path(owner)}"


def tensorboard_dir(owner: Owner) -> str:
    return f"{run_dir(owner)}/tensorboard"


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
    elif ds.s3 is not None:
        source = DataSource(s3=_narrowed(S3Dataset, ds.s3))
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
        data=_narrowed(DataShaping, ds),
        method=spec.method,
        training=spec.training,
        output=OutputSettings(
            dir=run_dir(owner),
            checkpoint_every_steps=spec.output.checkpoint_every_steps,
            keep_checkpoints=spec.output.keep_checkpoints,
            export=spec.output.export,
            s3=_s3_target(owner, spec),
            hub=_narrowed(HubTarget, spec.output.hub) if spec.output.hub else None,
            resume_from=_join(OUTPUT_DIR, spec.resume_from.path) if spec.resume_from else None,
        ),
        observability=Observability(
            tensorboard_dir=tensorboard_dir(owner), metrics_port=METRICS_PORT
        ),
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


def nodes_service(owner: Owner, spec: GemmaFineTuneSpec) -> Manifest | None:
    """The headless Service through which a multi-node run's pods find each other by name
    (``<name>-0.<name>-nodes``: pod 0 holds the rendezvous). Pods are listed before they are
    ready, so that the ranks can meet while they start."""
    if spec.resources.nodes <= 1:
        return None
    return _adopt(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(owner, child_names(owner.name)["nodes"], "nodes"),
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": {NAME_LABEL: owner.name, "app.kubernetes.io/component": TRAINER},
                "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}],
            },
        },
        owner,
    )


def ingress(owner: Owner, spec: GemmaFineTuneSpec, policy: Policy | None = None) -> Manifest | None:
    """An Ingress to TensorBoard, when asked for."""
    ing = spec.tensorboard.ingress
    if ing is None or not spec.tensorboard.enabled:
        return None
    name = child_names(owner.name)["ingress"]
    meta = _meta(owner, name, "tensorboard")
    forced = policy.ingress_annotations if policy is not None else {}
    annotations = {**ing.annotations, **forced}  # the admin's win
    if annotations:
        meta["annotations"] = annotations
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
                                "path": spec.tensorboard.path_prefix,
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


def network_policy(owner: Owner, spec: GemmaFineTuneSpec, policy: Policy) -> Manifest | None:
    """Who may reach the fine-tune's pods (trainer, TensorBoard after the run): the operator
    (live status from the metrics port), the dashboard, and the namespaces the admin names (the
    ingress controller, Prometheus). Egress stays open: the trainer downloads from the hub."""
    if not policy.network_policy:
        return None
    ports = [{"port": "metrics"}]
    if spec.tensorboard.enabled:
        ports.append({"port": TENSORBOARD})

    def namespace(name: str) -> Manifest:
        return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}

    def ours(app: str) -> Manifest:
        return {
            **namespace(policy.operator_namespace),
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": app}},
        }

    # The dashboard (installed beside the operator) reads the metrics and proxies TensorBoard.
    sources = [
        ours("gemma-finetune-operator"),
        ours("gemma-finetune-dashboard"),
        *(namespace(n) for n in policy.network_policy_namespaces),
    ]
    rules: list[Manifest] = [{"from": sources, "ports": ports}]
    if spec.resources.nodes > 1:
        # A multi-node run's ranks talk to each other on ports of their own choosing (gloo,
        # NCCL): every port, from the run's own pods only.
        rules.append({"from": [{"podSelector": {"matchLabels": {UID_LABEL: owner.uid}}}]})
    return _adopt(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(owner, child_names(owner.name)["networkpolicy"], "network"),
            "spec": {
                "podSelector": {"matchLabels": {NAME_LABEL: owner.name}},
                "policyTypes": ["Ingress"],
                "ingress": rules,
            },
        },
        owner,
    )


def tensorboard_url(owner: Owner, spec: GemmaFineTuneSpec) -> str | None:
    """Where TensorBoard answers: the Ingress when there is one, else the in-cluster Service."""
    if not spec.tensorboard.enabled:
        return None
    ing = spec.tensorboard.ingress
    if ing is not None:
        scheme = "https" if ing.tls_secret_name else "http"
        return f"{scheme}://{ing.host}{spec.tensorboard.path_prefix}"
    svc = child_names(owner.name)["service"]
    return f"http://{svc}.{owner.namespace}.svc:{TENSORBOARD_PORT}{tensorboard_prefix(spec)}/"


def tensorboard_prefix(spec: GemmaFineTuneSpec) -> str:
    """TensorBoard's ``--path_prefix``: ``pathPrefix`` without its trailing slash."""
    return spec.tensorboard.path_prefix.rstrip("/")


def tensorboard_container(owner: Owner, spec: GemmaFineTuneSpec, image: str) -> Manifest:
    """TensorBoard over this run's event files on the output volume (read-only)."""
    command = ["tensorboard", "--logdir", tensorboard_dir(owner), "--bind_all"]
    command += ["--port", str(TENSORBOARD_PORT)]
    if tensorboard_prefix(spec):
        command += ["--path_prefix", tensorboard_prefix(spec)]
    return {
        "name": TENSORBOARD,
        "image": spec.tensorboard.image or image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": command,
        "ports": [{"name": TENSORBOARD, "containerPort": TENSORBOARD_PORT}],
        "readinessProbe": {
            "httpGet": {"path": f"{tensorboard_prefix(spec)}/", "port": TENSORBOARD},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
        },
        "livenessProbe": {
            "tcpSocket": {"port": TENSORBOARD},
            "initialDelaySeconds": 30,
            "periodSeconds": 30,
            "timeoutSeconds": 5,
        },
        "resources": {
            "requests": {"cpu": "100m", "memory": "256Mi", "ephemeral-storage": "64Mi"},
            "limits": {"cpu": "1", "memory": "1Gi", "ephemeral-storage": "1Gi"},
        },
        "volumeMounts": [
            {"name": "output", "mountPath": OUTPUT_DIR, "readOnly": True},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
        ],
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
        "containers": [tensorboard_container(owner, spec, spec.image or defaults.image)],
        "volumes": [
            {
                "name": "output",
                "persistentVolumeClaim": {
                    "claimName": output_claim_name(owner, spec),
                    "readOnly": True,
                },
            },
            _tmp_volume(),
        ],
    }
    _place(pod_spec, spec, trainer=False)
    if defaults.tensorboard_node_selector:
        pod_spec["nodeSelector"] = dict(defaults.tensorboard_node_selector)
    return _adopt(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {**_meta(owner, name, TENSORBOARD), "annotations": dict(KUBE_SCORE_IGNORE)},
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
    "readOnlyRootFilesystem": True,  # scratch goes to the /tmp emptyDir, results to /output
    "seccompProfile": {"type": "RuntimeDefault"},
}
TMP_VOLUME = "tmp"
TRAINER_SCRATCH = "10Gi"
"""Size limit of the trainer's /tmp (torch's compile and kernel caches, tokenizer scratch)."""


def _tmp_volume(size: str = "1Gi") -> Manifest:
    return {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": size}}


def _trainer_env(owner: Owner, spec: GemmaFineTuneSpec) -> list[Manifest]:
    env: list[Manifest] = [
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "HOME", "value": "/tmp"},  # the root file system is read-only
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
    # After the user's variables: where names repeat, the last one wins.
    if spec.resources.nodes > 1:
        names = child_names(owner.name)
        env += [
            {"name": "GFT_NODES", "value": str(spec.resources.nodes)},
            {"name": "GFT_MASTER_ADDR", "value": f"{names['job']}-0.{names['nodes']}"},
            {"name": "GFT_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        ]
    if spec.output.s3 is not None:
        secret = spec.output.s3.credentials_secret_ref.name
        for name in S3_CREDENTIAL_ENV:
            env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": name}}})
    dataset_s3 = spec.dataset.s3
    if dataset_s3 is not None and dataset_s3.credentials_secret_ref is not None:
        secret = dataset_s3.credentials_secret_ref.name
        for name, key in zip(DATASET_S3_CREDENTIAL_ENV, S3_CREDENTIAL_ENV, strict=True):
            env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    if spec.output.hub is not None:
        ref = spec.output.hub.token_secret_ref
        env.append(
            {
                "name": HUB_EXPORT_TOKEN_ENV,
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    return env


_Model = TypeVar("_Model", bound=BaseModel)


def _narrowed(model: type[_Model], value: BaseModel) -> _Model:
    """A spec section as the trainer's contract has it: the spec's fields of ``model`` only
    (the secret references and the other spec-only fields stay behind)."""
    return model.model_validate(value.model_dump(include=set(model.model_fields)))


def _s3_target(owner: Owner, spec: GemmaFineTuneSpec) -> S3Target | None:
    """The bucket as the trainer sees it: the key prefix ends in the fine-tune's own name."""
    s3 = spec.output.s3
    if s3 is None:
        return None
    target = _narrowed(S3Target, s3)
    own = f"{owner.namespace}/{owner.name}"
    target.prefix = f"{target.prefix.rstrip('/')}/{own}" if target.prefix else own
    return target


def _resources(spec: GemmaFineTuneSpec) -> Manifest:
    res = spec.resources
    amounts: dict[str, str] = {}
    if res.cpu is not None:
        amounts["cpu"] = str(res.cpu)
    if res.memory is not None:
        amounts["memory"] = str(res.memory)
    if res.gpus:
        amounts[res.gpu_resource_name] = str(res.gpus)
    # Hub downloads and checkpoints go to the output volume; the node's disk holds /tmp only.
    return {
        "requests": {**amounts, "ephemeral-storage": "1Gi"},
        "limits": {**amounts, "ephemeral-storage": TRAINER_SCRATCH},
    }


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
        _tmp_volume(TRAINER_SCRATCH),
    ]
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "output", "mountPath": OUTPUT_DIR},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
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


def _place(pod_spec: Manifest, spec: GemmaFineTuneSpec, trainer: bool = True) -> None:
    """Node selector and tolerations of the spec. TensorBoard after the run keeps only the
    tolerations: it needs no GPU node (the node selector would hold one for as long as it is
    kept), and the scheduler places it where the claim's volume can be mounted (within the
    admin's ``--tensorboard-node-selector``); the tolerations let it go to a tainted node where
    the volume is bound to one."""
    res = spec.resources
    if res.node_selector and trainer:
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
        "env": _trainer_env(owner, spec),
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
        sidecar = {**tensorboard_container(owner, spec, image), "restartPolicy": "Always"}
        pod_spec["initContainers"] = [sidecar]
    _place(pod_spec, spec)
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name

    pod_meta: Manifest = {
        "labels": {
            **labels(owner.name),
            "app.kubernetes.io/component": TRAINER,
            UID_LABEL: owner.uid,
        },
        # Keeps a finished pod (and the trainer's termination message) until its outcome is
        # in the status, whoever deletes it.
        "finalizers": [OUTCOME_FINALIZER],
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
    meta["annotations"] = dict(KUBE_SCORE_IGNORE)
    meta["labels"][UID_LABEL] = owner.uid
    meta["finalizers"] = [OUTCOME_FINALIZER]
    nodes = spec.resources.nodes
    job_spec: Manifest = {
        # With a Kueue queue the Job starts suspended and Kueue alone unsuspends it.
        "suspend": True if spec.queue_name else paused(spec),
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": spec.backoff_limit,
        "podReplacementPolicy": "Failed",  # never two trainers writing one output at once
        "podFailurePolicy": pod_failure_policy(),
        "template": {"metadata": pod_meta, "spec": pod_spec},
    }
    if nodes > 1:
        # Pod i is rank group i (JOB_COMPLETION_INDEX), named <job>-i under the headless
        # Service; the run is done when pod 0 (rank 0, which saves and exports) is.
        job_spec["completionMode"] = "Indexed"
        job_spec["successPolicy"] = {"rules": [{"succeededIndexes": "0"}]}
        pod_spec["subdomain"] = child_names(owner.name)["nodes"]
        trainer["ports"].append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT})
    if spec.queue_name:
        meta["labels"][KUEUE_QUEUE_LABEL] = spec.queue_name
    if spec.queue_priority_class:
        meta["labels"][KUEUE_PRIORITY_LABEL] = spec.queue_priority_class
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    # No ttlSecondsAfterFinished: the operator deletes a finished Job itself, once the run's
    # outcome is in the status (the TTL controller would race it).
    return _adopt(
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}, owner
    )


def paused(spec: GemmaFineTuneSpec) -> bool:
    """Whether no trainer should run: suspended, or stopped for good (``spec.stop``: the
    trainer stops the way it does for a suspend, saving a checkpoint, and the status then
    ends the run)."""
    return spec.suspend or spec.stop


def job_patch(spec: GemmaFineTuneSpec, live: Manifest, finished: bool) -> Manifest | None:
    """The merge patch that brings a live Job in line with the spec, or ``None``.

    Only ``suspend`` (left to Kueue when a queue is named; a finished Job cannot be
    suspended). A ``ttlSecondsAfterFinished`` that an older operator set is removed: the
    operator owns the TTL now. The pod template is immutable and never patched.
    """
    live_spec = live.get("spec", {})
    patch: Manifest = {}
    if not spec.queue_name and not finished and bool(live_spec.get("suspend")) != paused(spec):
        patch["suspend"] = paused(spec)
    if live_spec.get("ttlSecondsAfterFinished") is not None:
        patch["ttlSecondsAfterFinished"] = None
    return {"spec": patch} if patch else None


def workload_patch(spec: GemmaFineTuneSpec, workload: Manifest) -> Manifest | None:
    """The merge patch that makes Kueue's Workload of the Job follow ``spec.suspend``, or
    ``None``. With a queue, suspending is Kueue's to do: an inactive Workload is evicted (its
    Job suspended, the trainer saving a checkpoint) and waits; active again, it queues for
    admission like any other."""
    active = (workload.get("spec") or {}).get("active", True)
    if active == (not paused(spec)):
        return None
    return {"spec": {"active": not paused(spec)}}


def desired_children(
    owner: Owner, spec: GemmaFineTuneSpec, defaults: Defaults = Defaults()
) -> list[Manifest]:
    """Every child that should exist, in creation order (the Job last)."""
    objs = [
        output_pvc(owner, spec),
        config_map(owner, spec),
        service(owner, spec),
        nodes_service(owner, spec),
        network_policy(owner, spec, defaults.policy),
        ingress(owner, spec, defaults.policy),
        job(owner, spec, defaults),
    ]
    return [o for o in objs if o is not None]
