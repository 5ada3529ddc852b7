"""``GemmaFineTune`` (``finetune.gemma.dev/v1alpha1``): the spec and status, as typed models.

This module is the one source of truth for the API. ``gft_api.crd`` generates the CRD's
structural ``openAPIV3Schema`` from these models: field docstrings become the descriptions that
``kubectl explain`` shows, ``Field`` bounds become schema bounds, and the CEL rules written here
(``x-kubernetes-validations``) become the API server's cross-field checks. The same rules are
repeated in Python validators where pydantic can check them, so a spec that the API server
refuses is also refused by ``GemmaFineTuneSpec.model_validate``.

The ML sections (data shaping, method, hyperparameters) are ``gft_api.training``'s types, shared
word for word with the trainer's config file.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from gft_api.base import ApiModel
from gft_api.contract import (
    DATASET_S3_ONE_OF,
    HUB_MERGED_NEEDS_MERGE,
    HubTarget,
    S3Dataset,
    S3Target,
    TrainerSummary,
)
from gft_api.training import DataShaping, ExportChoice, Hyperparameters, Method, MethodType

# ---------------------------------------------------------------------------------------------
# Names. The Job is named after the GemmaFineTune and its pods carry the ``job-name`` label, which
# is limited to 63 characters; the other children append a suffix. A Service name must be a
# DNS-1035 label (start with a letter), so the GemmaFineTune's name must be one too.
# ---------------------------------------------------------------------------------------------
CHILD_SUFFIXES = ("-config", "-output", "-nodes")
"""Suffixes of the children's names; the Job and the Service take the GemmaFineTune's own name."""

MAX_NAME_LENGTH = 63 - max(len(s) for s in CHILD_SUFFIXES)
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


def _cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None):
    """One ``x-kubernetes-validations`` entry."""
    entry: dict[str, str] = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def _rules(*entries: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(entries)}


def _merged(*extras: dict[str, Any]) -> dict[str, Any]:
    """Several ``x-kubernetes-validations`` lists as one."""
    return _rules(*(rule for extra in extras for rule in extra["x-kubernetes-validations"]))


def _immutable(what: str) -> dict[str, Any]:
    return _rules(_cel("self == oldSelf", f"{what} is immutable after creation"))


# Bounded scalars: every string is bounded so that CEL cost estimates stay small.
DnsLabel = Annotated[
    str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
]
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DnsSubdomain = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
ConfigKey = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
AbsolutePath = Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^/")]
RelativePath = Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[^/]")]
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
QUALIFIED_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
"""A label or annotation key, as the API server checks it: an optional DNS-subdomain prefix and
``/``, then a name of at most 63 letters, digits, ``-``, ``_`` and ``.``."""
LabelKey = Annotated[str, Field(min_length=1, max_length=317, pattern=QUALIFIED_NAME_PATTERN)]
AnnotationKey = Annotated[
    str, Field(min_length=1, max_length=317, pattern="(?i)" + QUALIFIED_NAME_PATTERN)
]
"""Annotation keys are checked like label keys, but in any case."""
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]


def _keys(what: str, annotations: bool = False) -> dict[str, Any]:
    """CEL for a map's keys (a structural schema cannot constrain them otherwise)."""
    key = "k.lowerAscii()" if annotations else "k"
    return _rules(
        _cel(
            f"self.all(k, size(k) <= 317 && {key}.matches('{QUALIFIED_NAME_PATTERN}'))",
            f"{what} keys must be qualified names (an optional DNS-subdomain prefix and '/', "
            "then at most 63 letters, digits, '-', '_' or '.', starting and ending with a "
            "letter or digit), as the API server requires of "
            + ("annotation keys" if annotations else "label keys"),
            reason="FieldValueInvalid",
        )
    )


ImageReference = Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[^\s]+$")]
"""A container image reference (``registry/repo:tag`` or ``...@sha256:...``): no whitespace."""
Timestamp = Annotated[str, Field(max_length=64, json_schema_extra={"format": "date-time"})]
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
Quantity = Annotated[
    int | Annotated[str, Field(max_length=64, pattern=QUANTITY_PATTERN)],
    Field(union_mode="left_to_right"),
]
"""A Kubernetes resource quantity (``4``, ``500m``, ``16Gi``)."""


class SecretKeyRef(ApiModel):
    """A key of a Secret in the GemmaFineTune's namespace."""

    name: DnsSubdomain
    """Name of the Secret."""

    key: ConfigKey = "token"
    """Key within the Secret."""


class SecretRef(ApiModel):
    """A Secret in the GemmaFineTune's namespace."""

    name: DnsSubdomain
    """Name of the Secret."""


class ConfigMapKeyRef(ApiModel):
    """A key of a ConfigMap in the GemmaFineTune's namespace."""

    name: DnsSubdomain
    """Name of the ConfigMap."""

    key: ConfigKey
    """Key within the ConfigMap."""


class VolumeClaim(ApiModel):
    """An existing PersistentVolumeClaim, mounted read-only into the trainer."""

    claim_name: DnsSubdomain
    """Name of the PersistentVolumeClaim in the GemmaFineTune's namespace."""

    path: RelativePath | None = None
    """Path inside the volume (a folder or a file); the volume's root when empty."""


# ---------------------------------------------------------------------------------------------
# spec.model
# ---------------------------------------------------------------------------------------------
class ModelSpec(ApiModel):
    """The base model: a hub id, or a folder on a volume."""

    name: Annotated[
        str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-/]*$")
    ]
    """Hub id of the base model (``google/gemma-3-1b-it``). With ``volume`` or ``path`` set,
    the weights are read from there and this is only the model's name (shown by ``kubectl get``)."""

    revision: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """Hub revision: a branch, tag or commit."""

    volume: VolumeClaim | None = None
    """Read the model from this folder on an existing PersistentVolumeClaim instead of the hub."""

    path: AbsolutePath | None = None
    """Read the model from this folder inside the trainer's image (or its node) instead of the
    hub."""

    hf_token_secret_ref: SecretKeyRef | None = None
    """Secret holding the hub token (gated models such as Gemma need one). It reaches the
    trainer only as an environment variable from this Secret: never in a ConfigMap, the status,
    events or logs."""

    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """Attention kernel. ``auto`` picks per Gemma generation."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "!(has(self.volume) && has(self.path))",
                "give at most one of model.volume and model.path",
                reason="FieldValueForbidden",
            )
        )
    )

    @model_validator(mode="after")
    def _one_place(self) -> ModelSpec:
        if self.volume is not None and self.path is not None:
            raise ValueError("give at most one of model.volume and model.path")
        return self


# ---------------------------------------------------------------------------------------------
# spec.dataset
# ---------------------------------------------------------------------------------------------
class DatasetVolume(ApiModel):
    """Training records on an existing PersistentVolumeClaim."""

    claim_name: DnsSubdomain
    """Name of the PersistentVolumeClaim in the GemmaFineTune's namespace."""

    path: RelativePath
    """File or folder (JSONL, JSON or Parquet) inside the volume holding the training records."""

    eval_path: RelativePath | None = None
    """File or folder inside the volume holding separate evaluation records."""


class DatasetConfigMap(ApiModel):
    """Training records in a ConfigMap (small datasets, up to about 1 MiB)."""

    name: DnsSubdomain
    """Name of the ConfigMap in the GemmaFineTune's namespace."""

    key: ConfigKey
    """Key holding the training records (JSONL)."""

    eval_key: ConfigKey | None = None
    """Key holding separate evaluation records (JSONL)."""


class DatasetHub(ApiModel):
    """A dataset on the hub (needs the ``datasets`` library in the trainer image)."""

    id: Annotated[
        str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-/]*$")
    ]
    """Hub dataset id (``HuggingFaceH4/no_robots``)."""

    config: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """Dataset configuration name."""

    split: Annotated[str, Field(min_length=1, max_length=64)] = "train"
    """Split holding the training records."""

    eval_split: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    """Split holding separate evaluation records."""


_ONE_DATASET_SOURCE = (
    "give exactly one dataset source: dataset.volume, dataset.configMap, dataset.hub, "
    "dataset.s3 or dataset.path"
)


class DatasetS3(S3Dataset):
    """Training records in an S3-compatible bucket (any size), streamed by the trainer and
    checked as files are: a bad record fails the run naming its object and line."""

    credentials_secret_ref: SecretRef | None = None
    """A Secret with the keys ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` that may read
    the objects; anonymous requests (a public bucket) when empty."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "has(self.key) != has(self.prefix)", DATASET_S3_ONE_OF, reason="FieldValueRequired"
            )
        )
    )


class DatasetSpec(DataShaping):
    """Where the examples come from (exactly one of ``volume``, ``configMap``, ``hub``, ``s3``,
    ``path``) and how they are shaped. A separate eval source (``evalPath``, ``evalKey``,
    ``evalSplit``, ``s3.evalKey``) takes precedence over ``evalFraction``."""

    volume: DatasetVolume | None = None
    """Records on an existing PersistentVolumeClaim."""

    config_map: DatasetConfigMap | None = None
    """Records in a ConfigMap."""

    hub: DatasetHub | None = None
    """Records from a hub dataset."""

    s3: DatasetS3 | None = None
    """Records in an S3-compatible bucket, of any size (``kubectl gft upload FILE --to
    s3://BUCKET/PREFIX`` puts a local file there)."""

    path: AbsolutePath | None = None
    """Records at this path inside the trainer's image (or its node)."""

    eval_path: AbsolutePath | None = None
    """With ``path``: separate evaluation records at this path."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "(has(self.volume) ? 1 : 0) + (has(self.configMap) ? 1 : 0)"
                " + (has(self.hub) ? 1 : 0) + (has(self.s3) ? 1 : 0) + (has(self.path) ? 1 : 0)"
                " == 1",
                _ONE_DATASET_SOURCE,
                reason="FieldValueRequired",
            ),
            _cel(
                "!has(self.evalPath) || has(self.path)",
                "dataset.evalPath needs dataset.path",
                field_path=".evalPath",
            ),
        )
    )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        sources = (self.volume, self.config_map, self.hub, self.s3, self.path)
        if len([x for x in sources if x is not None]) != 1:
            raise ValueError(_ONE_DATASET_SOURCE)
        if self.eval_path is not None and self.path is None:
            raise ValueError("dataset.evalPath needs dataset.path")
        return self


# ---------------------------------------------------------------------------------------------
# spec.resources
# ---------------------------------------------------------------------------------------------
class Toleration(ApiModel):
    """A toleration for the training pod, as in a Pod's spec (and checked as the API server
    checks a Pod's, so that a fine-tune the Job would refuse is refused at ``kubectl apply``)."""

    key: Annotated[str, Field(max_length=317, pattern=QUALIFIED_NAME_PATTERN)] | None = None
    """Taint key; empty with operator Exists matches every taint."""

    operator: Literal["Exists", "Equal"] = "Equal"
    """``Equal`` matches key and value; ``Exists`` matches the key alone."""

    value: LabelValue | None = None
    """Taint value, for operator Equal."""

    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; all effects when empty."""

    toleration_seconds: Annotated[int, Field(ge=0, le=31_536_000)] | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.operator != 'Exists' || !has(self.value) || size(self.value) == 0",
                "a toleration with operator Exists has no value",
                reason="FieldValueInvalid",
            ),
            _cel(
                "self.operator == 'Exists' || (has(self.key) && size(self.key) > 0)",
                "a toleration without a key must have operator Exists",
                reason="FieldValueInvalid",
            ),
            _cel(
                "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                "tolerationSeconds needs effect NoExecute",
                reason="FieldValueInvalid",
            ),
        )
    )

    @model_validator(mode="after")
    def _as_a_pod_would_have_it(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists has no value")
        if self.operator != "Exists" and not self.key:
            raise ValueError("a toleration without a key must have operator Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


class Resources(ApiModel):
    """What the training pod asks for and where it may run."""

    gpus: Annotated[int, Field(ge=0, le=16)] = 1
    """GPUs for the trainer (requests and limits of ``gpuResourceName``). 0 trains on CPU."""

    nodes: Annotated[int, Field(ge=1, le=64)] = 1
    """Pods the run spans, each with ``gpus`` GPUs on a node of its own: an Indexed Job of
    ``nodes`` pods and a headless Service, the rendezvous on pod 0. DDP for LoRA and QLoRA,
    FSDP for full fine-tuning, across every pod's GPUs. A pod lost restarts the whole group
    from the last checkpoint. More than 1 needs an output volume every pod can write
    (``output.pvc.accessMode: ReadWriteMany``, or such an ``existingClaim``)."""

    gpu_resource_name: Annotated[
        str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9.\-]+/[a-z0-9.\-_]+$")
    ] = "nvidia.com/gpu"
    """Extended resource name of the GPUs."""

    cpu: Quantity | None = None
    """CPU request and limit of the trainer (``8``, ``7500m``)."""

    memory: Quantity | None = None
    """Memory request and limit of the trainer (``64Gi``)."""

    shm_size: Quantity = "8Gi"
    """Size limit of the memory-backed ``/dev/shm`` (data loader workers share tensors there);
    it counts against the pod's memory."""

    node_selector: Annotated[
        dict[LabelKey, LabelValue],
        Field(max_length=32, json_schema_extra=_keys("resources.nodeSelector")),
    ] = Field(default_factory=dict)
    """Node labels the training pod must match."""

    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(default_factory=list)
    """Tolerations of the training pod (GPU nodes are often tainted)."""

    priority_class_name: DnsSubdomain | None = None
    """PriorityClass of the training pod; a higher-priority pod may preempt it (a preemption is
    not counted as a failed attempt)."""


# ---------------------------------------------------------------------------------------------
# spec.output
# ---------------------------------------------------------------------------------------------
class ReclaimPolicy(StrEnum):
    RETAIN = "Retain"
    DELETE = "Delete"


class OutputClaim(ApiModel):
    """A PersistentVolumeClaim the operator creates for the output (``<name>-output``)."""

    size: Quantity = "50Gi"
    """Requested storage: checkpoints, the adapter or merged model, TensorBoard events."""

    storage_class_name: DnsSubdomain | None = None
    """StorageClass; the cluster's default when empty."""

    access_mode: Literal["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"] = "ReadWriteOnce"
    """Access mode of the claim."""

    reclaim_policy: ReclaimPolicy = ReclaimPolicy.RETAIN
    """``Retain`` keeps the claim (and the trained weights) when the GemmaFineTune is deleted;
    ``Delete`` lets garbage collection remove it with the GemmaFineTune."""


class S3Export(S3Target):
    """Copy the artifacts to an S3-compatible bucket when training succeeds."""

    credentials_secret_ref: SecretRef
    """A Secret with the keys ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``."""


class HubExport(HubTarget):
    """Push the adapter (or the merged or full model) to a hub repository when training
    succeeds."""

    token_secret_ref: SecretKeyRef
    """A token with write access to the repository (apart from ``model.hfTokenSecretRef``,
    which only needs to read)."""


class OutputSpec(ApiModel):
    """Where results go: an existing claim (``existingClaim``) or one the operator creates
    (``pvc``, the default), and how checkpoints are kept."""

    existing_claim: DnsSubdomain | None = None
    """An existing PersistentVolumeClaim to write to. The operator never modifies or deletes it."""

    pvc: OutputClaim | None = None
    """Settings of the claim the operator creates when ``existingClaim`` is empty."""

    checkpoint_every_steps: Annotated[int, Field(ge=0, le=10_000_000)] = 200
    """Save a checkpoint every N optimizer steps (0: only on stop and at the end). A new attempt
    resumes from the newest checkpoint."""

    keep_checkpoints: Annotated[int, Field(ge=1, le=100)] = 2
    """How many of the newest checkpoints to keep (the best one is kept besides)."""

    s3: S3Export | None = None
    """Also copy the artifacts to an S3-compatible bucket, under
    ``<prefix>/<namespace>/<name>/``."""

    hub: HubExport | None = None
    """Also push the artifact to a Hugging Face Hub repository."""

    export: ExportChoice = ExportChoice.BEST
    """Which weights become the adapter (or model) and the merged model: ``best`` (the
    checkpoint with the best ``training.metricForBest``; the last weights when nothing was
    evaluated) or ``last``."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "!(has(self.existingClaim) && has(self.pvc))",
                "give at most one of output.existingClaim and output.pvc",
                reason="FieldValueForbidden",
            )
        )
    )

    @model_validator(mode="after")
    def _one_claim(self) -> OutputSpec:
        if self.existing_claim is not None and self.pvc is not None:
            raise ValueError("give at most one of output.existingClaim and output.pvc")
        return self

    @property
    def claim(self) -> OutputClaim:
        """Settings of the claim to create (defaults when ``pvc`` is not given)."""
        return self.pvc or OutputClaim()


# ---------------------------------------------------------------------------------------------
# spec.tensorboard
# ---------------------------------------------------------------------------------------------
class TensorBoardIngress(ApiModel):
    """An Ingress in front of the TensorBoard port of the fine-tune's Service."""

    host: DnsSubdomain
    """Host name the Ingress answers for."""

    ingress_class_name: DnsSubdomain | None = None
    """IngressClass; the cluster's default when empty."""

    tls_secret_name: DnsSubdomain | None = None
    """Secret with the TLS certificate for ``host``; plain HTTP when empty."""

    annotations: Annotated[
        dict[AnnotationKey, Annotated[str, Field(max_length=4096)]],
        Field(max_length=32, json_schema_extra=_keys("tensorboard.ingress.annotations", True)),
    ] = Field(default_factory=dict)
    """Annotations for the Ingress (ingress controller settings, authentication). The
    cluster's policy may bound their keys."""


class TensorBoardSpec(ApiModel):
    """TensorBoard, run as a native sidecar of the trainer over the output volume."""

    enabled: bool = True
    """Run the TensorBoard sidecar (immutable: it is part of the training pod)."""

    image: (
        Annotated[ImageReference, Field(json_schema_extra=_immutable("tensorboard.image"))] | None
    ) = None
    """Image of the sidecar; the trainer's image when empty (it ships TensorBoard). Fixed at
    creation: the sidecar is part of the training pod, whose template cannot change."""

    path_prefix: Annotated[
        str,
        Field(
            min_length=1,
            max_length=256,
            pattern=r"^/([-._~A-Za-z0-9]+/?)*$",
            json_schema_extra=_immutable("tensorboard.pathPrefix"),
        ),
    ] = "/"
    """The path TensorBoard serves under (its ``--path_prefix``), and the path of its Ingress.
    Fixed at creation: the sidecar is started with it."""

    ingress: TensorBoardIngress | None = None
    """Expose TensorBoard through an Ingress (at ``pathPrefix``); may be added, changed or
    removed at any time."""

    keep_after_finish_seconds: Annotated[int, Field(ge=0, le=2_592_000)] = 3600
    """After the run ends (the sidecar stops with the trainer), keep TensorBoard answering at
    the same address this long, from a small Deployment over the output volume; 0: not at all."""


# ---------------------------------------------------------------------------------------------
# spec.env
# ---------------------------------------------------------------------------------------------
class EnvVarSource(ApiModel):
    """Where an environment variable's value comes from."""

    secret_key_ref: SecretKeyRef | None = None
    """A key of a Secret."""

    config_map_key_ref: ConfigMapKeyRef | None = None
    """A key of a ConfigMap."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "has(self.secretKeyRef) != has(self.configMapKeyRef)",
                "give exactly one of secretKeyRef and configMapKeyRef",
            )
        )
    )


HUB_TOKEN_ENV_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
OPERATOR_ENV_NAMES = ("HF_HOME", "HOME", "PYTHONUNBUFFERED")
_HUB_TOKEN_IN_ENV = (
    "the hub token does not go in env (a value there sits in plain sight in the spec): put it "
    "in a Secret and name it in model.hfTokenSecretRef"
)
_OPERATOR_ENV = (
    f"{', '.join(OPERATOR_ENV_NAMES)} are set by the operator (the hub cache lives on the "
    "output volume, HOME on the pod's scratch volume) and cannot be overridden"
)


class EnvVar(ApiModel):
    """An extra environment variable for the trainer."""

    name: Annotated[
        str, Field(min_length=1, max_length=128, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    ]
    """Variable name."""

    value: Annotated[str, Field(max_length=4096)] | None = None
    """Literal value."""

    value_from: EnvVarSource | None = None
    """Value read from a Secret or ConfigMap."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "!(has(self.value) && has(self.valueFrom))",
                "give at most one of value and valueFrom",
            ),
            _cel(
                f"!(self.name in {list(HUB_TOKEN_ENV_NAMES)})",
                _HUB_TOKEN_IN_ENV,
                field_path=".name",
                reason="FieldValueForbidden",
            ),
            _cel(
                f"!(self.name in {list(OPERATOR_ENV_NAMES)})",
                _OPERATOR_ENV,
                field_path=".name",
                reason="FieldValueForbidden",
            ),
        )
    )

    @model_validator(mode="after")
    def _not_reserved(self) -> EnvVar:
        if self.name in HUB_TOKEN_ENV_NAMES:
            raise ValueError(_HUB_TOKEN_IN_ENV)
        if self.name in OPERATOR_ENV_NAMES:
            raise ValueError(_OPERATOR_ENV)
        return self


# ---------------------------------------------------------------------------------------------
# spec
# ---------------------------------------------------------------------------------------------
_IMMUTABLE_OPTIONAL = (
    "activeDeadlineSeconds",
    "queueName",
    "queuePriorityClass",
    "image",
    "resumeFrom",
)

NODES_NEED_SHARED_OUTPUT = (
    "resources.nodes above 1 needs an output volume every pod can write: set "
    "output.pvc.accessMode to ReadWriteMany, or output.existingClaim to such a claim"
)
PRIORITY_NEEDS_QUEUE = (
    "queuePriorityClass is Kueue's WorkloadPriorityClass and needs queueName: name the "
    "LocalQueue too, or use resources.priorityClassName for the pod's own priority"
)
STOP_IS_FINAL = (
    "stop cannot be undone: a stopped run has ended; create a new GemmaFineTune with "
    "resumeFrom naming its last checkpoint to train on"
)
_QLORA_NEEDS_GPU = "method.type qlora needs a GPU: set resources.gpus to 1 or more, or use lora"


class ResumeFrom(ApiModel):
    """Start from another run's work, on purpose: a checkpoint or an adapter on the output
    volume. A run never picks up another run's files on its own."""

    path: Annotated[
        str, Field(min_length=1, max_length=1024, pattern=r"^[-._A-Za-z0-9]+(/[-._A-Za-z0-9]+)*/?$")
    ]
    """Folder on the output volume, relative to its root (``runs/<uid>/checkpoints/checkpoint-400``
    or ``runs/<uid>/adapter``; ``kubectl get gft OLD -o jsonpath='{.status.outputPath}'`` names
    a run's folder). A checkpoint continues from its step with its optimizer and scheduler state;
    an adapter (LoRA and QLoRA) starts training at step 0 from its weights."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "!self.path.matches('(^|/)[.][.]?(/|$)')",
                "resumeFrom.path must stay inside the output volume: no '.' or '..' segments",
                field_path=".path",
            )
        )
    )

    @model_validator(mode="after")
    def _inside(self) -> ResumeFrom:
        if any(part in (".", "..") for part in self.path.split("/")):
            raise ValueError(
                "resumeFrom.path must stay inside the output volume: no '.' or '..' segments"
            )
        return self


class GemmaFineTuneSpec(ApiModel):
    """What to fine-tune, on what data, how, and with which resources. Everything but
    ``suspend``, ``ttlSecondsAfterFinished``, ``tensorboard.ingress`` and
    ``tensorboard.keepAfterFinishSeconds`` is fixed at creation: the training pod is built from
    it, and a running pod cannot change (delete and re-create the fine-tune instead, with
    ``resumeFrom`` naming the old run's checkpoint to carry on from it)."""

    model: Annotated[ModelSpec, Field(json_schema_extra=_immutable("model"))]
    """The base model."""

    dataset: Annotated[DatasetSpec, Field(json_schema_extra=_immutable("dataset"))]
    """The training (and evaluation) records."""

    method: Annotated[Method, Field(json_schema_extra=_immutable("method"))] = Field(
        default_factory=Method
    )
    """Which weights are trained: a LoRA adapter (default), a QLoRA adapter, or all of them."""

    training: Annotated[
        Hyperparameters,
        Field(
            json_schema_extra=_rules(
                _cel("self == oldSelf", "training is immutable after creation"),
                _cel(
                    "has(self.epochs) != has(self.maxSteps)",
                    "give exactly one of training.epochs and training.maxSteps",
                    reason="FieldValueInvalid",
                ),
                _cel(
                    "!has(self.metricForBest) || self.metricForBest != 'eval_exact_match' || "
                    "(has(self.samples) && has(self.samples.exactMatchExamples) && "
                    "self.samples.exactMatchExamples > 0)",
                    "metricForBest eval_exact_match needs samples.exactMatchExamples > 0",
                    field_path=".metricForBest",
                    reason="FieldValueInvalid",
                ),
                _cel(
                    "!has(self.divergenceFactor) || self.divergenceFactor == 0.0 || "
                    "self.divergenceFactor > 1.0",
                    "divergenceFactor must be above 1 (a loss above its start), or 0 to turn "
                    "it off",
                    field_path=".divergenceFactor",
                    reason="FieldValueInvalid",
                ),
            )
        ),
    ]
    """Optimisation settings. Give exactly one of ``epochs`` and ``maxSteps``."""

    resources: Annotated[Resources, Field(json_schema_extra=_immutable("resources"))] = Field(
        default_factory=Resources
    )
    """GPUs, CPU, memory and placement of the training pod."""

    output: Annotated[OutputSpec, Field(json_schema_extra=_immutable("output"))] = Field(
        default_factory=OutputSpec
    )
    """Where checkpoints and results are written."""

    tensorboard: TensorBoardSpec = Field(default_factory=TensorBoardSpec)
    """TensorBoard sidecar and its Ingress."""

    termination_grace_period_seconds: Annotated[
        int, Field(ge=30, le=86_400, json_schema_extra=_immutable("terminationGracePeriodSeconds"))
    ] = 600
    """How long the trainer gets after SIGTERM (suspend, delete, eviction) to save a checkpoint
    before it is killed. Size it to the time one checkpoint of your model takes to write."""

    suspend: bool = False
    """Pause the fine-tune: the trainer saves a checkpoint and stops; ``false`` resumes from it.
    With ``queueName`` set, Kueue owns the Job's suspension and this field is not passed on."""

    stop: bool = False
    """End the run now and keep what it has: the trainer saves a checkpoint and stops, and the
    fine-tune ends as ``Succeeded`` with reason ``Stopped`` (its record, status.result and the
    output volume kept; the checkpoint's adapter loads as a trained one does, and
    ``resumeFrom`` it trains on). Unlike ``suspend`` it cannot be undone; unlike deleting the
    GemmaFineTune it keeps the run. Set before the run starts, nothing is trained."""

    backoff_limit: Annotated[
        int, Field(ge=0, le=100, json_schema_extra=_immutable("backoffLimit"))
    ] = 3
    """Retryable failures allowed before the fine-tune fails. Evictions and preemptions are not
    counted; a non-retryable trainer error (bad config, dataset or model) fails at once."""

    active_deadline_seconds: (
        Annotated[
            int, Field(ge=60, le=31_536_000, json_schema_extra=_immutable("activeDeadlineSeconds"))
        ]
        | None
    ) = None
    """Fail the fine-tune (DeadlineExceeded) when it has run this long. Resuming from suspend
    restarts the clock."""

    ttl_seconds_after_finished: Annotated[int, Field(ge=0, le=31_536_000)] | None = None
    """Delete the finished Job and its pods this long after the end (the GemmaFineTune, its
    status and the output volume stay). The operator deletes the Job itself, and only once the
    run's outcome is in the status."""

    queue_name: (
        Annotated[
            str,
            Field(
                min_length=1,
                max_length=63,
                pattern=LABEL_VALUE_PATTERN,
                json_schema_extra=_immutable("queueName"),
            ),
        ]
        | None
    ) = None
    """Kueue LocalQueue (a label value: letters, digits, '-', '_', '.'): the Job is created
    suspended with the ``kueue.x-k8s.io/queue-name`` label and Kueue starts it once the queue
    has quota for it. The phase is ``Queued`` while it waits (the reason says why, in Kueue's
    words) and again when a higher-priority workload preempts it; the trainer saves a
    checkpoint and the next admission resumes from it. ``suspend`` then deactivates the Kueue
    Workload (``spec.active``) and never writes the Job."""

    queue_priority_class: (
        Annotated[
            str,
            Field(
                min_length=1,
                max_length=63,  # a label value
                pattern=DNS_SUBDOMAIN_PATTERN,
                json_schema_extra=_immutable("queuePriorityClass"),
            ),
        ]
        | None
    ) = None
    """Kueue WorkloadPriorityClass of the run (label ``kueue.x-k8s.io/priority-class``): the
    order of admission in its queue, and which workloads it may preempt or be preempted by.
    Needs ``queueName``."""

    image: Annotated[ImageReference, Field(json_schema_extra=_immutable("image"))] | None = None
    """Trainer image; the operator's default when empty."""

    image_pull_policy: Annotated[
        Literal["Always", "IfNotPresent", "Never"],
        Field(json_schema_extra=_immutable("imagePullPolicy")),
    ] = "IfNotPresent"
    """Pull policy of the trainer and TensorBoard images. Fixed at creation: it is part of the
    training pod."""

    env: Annotated[
        list[EnvVar],
        Field(
            max_length=64,
            json_schema_extra={
                **_immutable("env"),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
            },
        ),
    ] = Field(default_factory=list)
    """Extra environment variables for the trainer (each name once; not the hub token, which
    comes from ``model.hfTokenSecretRef``, nor the variables the operator sets)."""

    resume_from: ResumeFrom | None = None
    """Start from another run's checkpoint or adapter on the output volume. Without it a run
    starts fresh: each run writes under its own folder (``runs/<uid>``) and resumes only its own
    checkpoints, so re-creating a fine-tune of the same name never continues the old run."""

    pod_annotations: Annotated[
        dict[AnnotationKey, Annotated[str, Field(max_length=4096)]],
        Field(
            max_length=32,
            json_schema_extra=_merged(_immutable("podAnnotations"), _keys("podAnnotations", True)),
        ),
    ] = Field(default_factory=dict)
    """Extra annotations for the training pod (monitoring, service mesh, test harnesses)."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.method.type != 'qlora' || self.resources.gpus > 0",
                _QLORA_NEEDS_GPU,
                field_path=".method.type",
                reason="FieldValueInvalid",
            ),
            _cel(
                "!has(self.resources) || !has(self.resources.nodes) || self.resources.nodes <= 1 "
                "|| (has(self.output) && (has(self.output.existingClaim) || (has(self.output.pvc) "
                "&& has(self.output.pvc.accessMode) && "
                "self.output.pvc.accessMode == 'ReadWriteMany')))",
                NODES_NEED_SHARED_OUTPUT,
                field_path=".resources.nodes",
                reason="FieldValueInvalid",
            ),
            _cel(
                "!has(oldSelf.stop) || !oldSelf.stop || (has(self.stop) && self.stop)",
                STOP_IS_FINAL,
                field_path=".stop",
                reason="FieldValueForbidden",
            ),
            _cel(
                "!has(self.queuePriorityClass) || has(self.queueName)",
                PRIORITY_NEEDS_QUEUE,
                field_path=".queuePriorityClass",
                reason="FieldValueInvalid",
            ),
            _cel(
                "!has(self.output.hub) || !has(self.output.hub.merged) || "
                "!self.output.hub.merged || (has(self.method.mergeAdapter) && "
                "self.method.mergeAdapter)",
                HUB_MERGED_NEEDS_MERGE,
                field_path=".output.hub.merged",
                reason="FieldValueInvalid",
            ),
            *(
                _cel(
                    f"has(self.{f}) == has(oldSelf.{f})",
                    f"{f} is immutable after creation",
                    field_path=f".{f}",
                    reason="FieldValueForbidden",
                )
                for f in _IMMUTABLE_OPTIONAL
            ),
            _cel(
                "has(self.tensorboard.image) == has(oldSelf.tensorboard.image)",
                "tensorboard.image is immutable after creation",
                field_path=".tensorboard.image",
                reason="FieldValueForbidden",
            ),
            _cel(
                "self.tensorboard.enabled == oldSelf.tensorboard.enabled",
                "tensorboard.enabled is immutable after creation",
                field_path=".tensorboard.enabled",
                reason="FieldValueForbidden",
            ),
        )
    )

    @model_validator(mode="after")
    def _qlora_needs_gpu(self) -> GemmaFineTuneSpec:
        if self.method.type == MethodType.QLORA and self.resources.gpus < 1:
            raise ValueError(_QLORA_NEEDS_GPU)
        out = self.output
        shared = out.existing_claim is not None or (
            out.pvc is not None and out.pvc.access_mode == "ReadWriteMany"
        )
        if self.resources.nodes > 1 and not shared:
            raise ValueError(NODES_NEED_SHARED_OUTPUT)
        if self.queue_priority_class is not None and self.queue_name is None:
            raise ValueError(PRIORITY_NEEDS_QUEUE)
        if self.output.hub is not None and self.output.hub.merged and not self.method.merge_adapter:
            raise ValueError(HUB_MERGED_NEEDS_MERGE)
        names = [e.name for e in self.env]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"env: {', '.join(duplicated)} given more than once")
        return self


# ---------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------
class Phase(StrEnum):
    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED})


class Condition(ApiModel):
    """A condition, per the Kubernetes API conventions."""

    type: Annotated[str, Field(min_length=1, max_length=316)]
    """``Ready`` (the trainer runs), ``Suspended``, ``Complete`` or ``Failed``."""

    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""

    reason: Annotated[
        str,
        Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"),
    ]
    """CamelCase reason, for programs (``Unschedulable``, ``OOMKilled``, ``InvalidConfig``)."""

    message: Annotated[str, Field(max_length=32768)] = ""
    """For humans: what happened and what to do."""

    last_transition_time: Timestamp
    """When ``status`` last changed."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The ``metadata.generation`` this condition was computed for."""


class Progress(ApiModel):
    """How far training has got (from the trainer's metrics)."""

    step: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps done."""

    total_steps: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps planned."""

    percent: Annotated[float, Field(ge=0, le=100)] | None = None
    """step / totalSteps, in percent."""

    epoch: Annotated[float, Field(ge=0)] | None = None
    """Epochs done (fractional)."""

    eta_seconds: Annotated[int, Field(ge=0)] | None = None
    """Estimated seconds to the end."""

    updated_at: Timestamp | None = None
    """When these numbers were read."""


class Metrics(ApiModel):
    """The latest training metrics (from the trainer's /metrics endpoint)."""

    loss: float | None = None
    """Training loss."""

    eval_loss: float | None = None
    """Evaluation loss."""

    token_accuracy: float | None = None
    """Share of next tokens predicted right on training batches."""

    eval_token_accuracy: float | None = None
    """Share of next tokens predicted right on evaluation records."""

    eval_exact_match: float | None = None
    """Share of sampled evaluation answers equal to the reference
    (``training.samples.exactMatchExamples``)."""

    learning_rate: float | None = None
    """Current learning rate."""

    tokens_per_second: float | None = None
    """Training throughput in tokens per second."""

    samples_per_second: float | None = None
    """Training throughput in sequences per second."""

    gpu_utilization: float | None = None
    """GPU utilisation, 0 to 1."""

    gpu_memory_bytes: int | None = None
    """GPU memory in use, in bytes."""


class CheckpointInfo(ApiModel):
    """The newest checkpoint saved."""

    step: Annotated[int, Field(ge=0)]
    """Optimizer step of the checkpoint."""

    path: Annotated[str, Field(max_length=1024)] | None = None
    """Path of the checkpoint on the output volume."""

    time: Timestamp | None = None
    """When it was saved."""


class GemmaFineTuneStatus(ApiModel):
    """What the operator observed. Written only by the operator."""

    phase: Phase | None = None
    """One word: Pending, Queued, Running, Suspended, Succeeded or Failed."""

    reason: Annotated[str, Field(max_length=1024)] | None = None
    """CamelCase reason for the phase (the reason of the condition that decided it)."""

    message: Annotated[str, Field(max_length=32768)] | None = None
    """For humans: why the fine-tune is in this phase and what to do."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The ``metadata.generation`` the operator last acted on."""

    conditions: Annotated[list[Condition], Field(max_length=16)] = Field(default_factory=list)
    """Ready, Suspended, Complete and Failed, per the API conventions."""

    attempts: Annotated[int, Field(ge=0)] | None = None
    """Training pods started so far (evicted and preempted ones included)."""

    failed_attempts: Annotated[int, Field(ge=0)] | None = None
    """Attempts that failed and counted against ``backoffLimit``."""

    job_name: DnsLabel | None = None
    """The Job that runs the trainer."""

    pod_name: DnsSubdomain | None = None
    """The newest training pod (``kubectl logs`` it, or ``job/<jobName>``)."""

    output_claim: DnsSubdomain | None = None
    """The PersistentVolumeClaim holding checkpoints and results."""

    output_path: Annotated[str, Field(max_length=1024)] | None = None
    """This run's folder on the output claim (``runs/<uid>``): checkpoints, the adapter or
    model, TensorBoard events and summary.json."""

    start_time: Timestamp | None = None
    """When the first attempt started."""

    completion_time: Timestamp | None = None
    """When the fine-tune succeeded or failed."""

    tensorboard_url: Annotated[str, Field(max_length=2048)] | None = Field(
        default=None, alias="tensorboardURL"
    )
    """Where TensorBoard answers (the Ingress, or the in-cluster Service)."""

    progress: Progress | None = None
    """Steps done and to go."""

    metrics: Metrics | None = None
    """The latest training metrics."""

    last_checkpoint: CheckpointInfo | None = None
    """The newest checkpoint saved."""

    result: TrainerSummary | None = None
    """The trainer's final summary (its termination message), kept after the pod is gone."""


def child_names(name: str) -> dict[str, str]:
    """The names of a GemmaFineTune's children (all within 63 characters by the name's bound)."""
    return {
        "job": name,
        "service": name,
        "ingress": name,
        "configmap": f"{name}-config",
        "pvc": f"{name}-output",
        "tensorboard": f"{name}-tb",
        "networkpolicy": name,
        "nodes": f"{name}-nodes",  # the headless Service of a multi-node run's pods
    }
