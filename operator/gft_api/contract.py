"""The contract between the operator and the trainer: one config file in, exit code and summary out.

The operator renders a ``TrainerConfig`` into a ConfigMap; the trainer reads it with
``TrainerConfig.load``. When the trainer exits, its exit code says what happened (``ExitCode``) and
its termination message (``TrainerSummary``, JSON under 4 KiB) says the rest. The Job's
podFailurePolicy is built from ``NON_RETRYABLE_EXIT_CODES`` and ``ExitCode.STOPPED``.
"""

from __future__ import annotations

import json
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from gft_api.base import ApiModel
from gft_api.training import (
    Attention,
    DatasetFormat,
    DataShaping,
    ExportChoice,
    Hyperparameters,
    Method,
)

CONFIG_FILE_NAME = "config.yaml"
SUMMARY_FILE_NAME = "summary.json"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4096  # bytes; the kubelet truncates longer messages
HF_TOKEN_ENV = "HF_TOKEN"
HUB_EXPORT_TOKEN_ENV = "GFT_HUB_EXPORT_TOKEN"
"""The token the trainer pushes to the hub with (write access; apart from the read token)."""
S3_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
"""The S3 credentials, as environment variables (and keys of the Secret that holds them)."""
DATASET_S3_CREDENTIAL_ENV = ("GFT_DATASET_AWS_ACCESS_KEY_ID", "GFT_DATASET_AWS_SECRET_ACCESS_KEY")
"""The dataset bucket's credentials (``S3_CREDENTIAL_ENV``'s keys of its own Secret), apart from
the export's: the two may be different stores with different keys."""
CONFIG_DIR = "/etc/gft"  # where the operator mounts the rendered config
TRAINER_COMMAND: tuple[str, ...] = ("gft-train", "--config", f"{CONFIG_DIR}/{CONFIG_FILE_NAME}")
"""How the operator starts the trainer in the training pod."""


class ExitCode(IntEnum):
    """What the trainer's exit code means. Values follow sysexits.h where one fits.

    0 is success. STOPPED is a clean stop on a signal after a checkpoint was saved: the Job must
    not read it as complete, and a new attempt resumes from that checkpoint. The non-retryable
    codes fail the Job at once: trying again cannot help until the user changes something.
    Any other non-zero code (1 included) is a retryable failure.
    """

    SUCCESS = 0
    RETRYABLE = 1
    DATA_ERROR = 65  # EX_DATAERR: the dataset is malformed (file and line in the message)
    MODEL_NOT_FOUND = 66  # EX_NOINPUT: no such model id or folder
    UNSUPPORTED = 69  # EX_UNAVAILABLE: asked for what this hardware cannot do (QLoRA without CUDA)
    STOPPED = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving a checkpoint
    NOT_PERMITTED = 77  # EX_NOPERM: gated model: licence not accepted or token wrong
    CONFIG_ERROR = 78  # EX_CONFIG: the config file is invalid (field named in the message)
    DIVERGED = 79  # the loss went NaN, infinite or far past its start: retrying repeats it


NON_RETRYABLE_EXIT_CODES: tuple[int, ...] = tuple(
    sorted(
        int(c)
        for c in (
            ExitCode.DATA_ERROR,
            ExitCode.MODEL_NOT_FOUND,
            ExitCode.UNSUPPORTED,
            ExitCode.NOT_PERMITTED,
            ExitCode.CONFIG_ERROR,
            ExitCode.DIVERGED,
        )
    )
)


def describe_exit_code(code: int) -> str:
    """A CamelCase reason for a trainer exit code, for conditions and events."""
    reasons = {
        ExitCode.SUCCESS: "Completed",
        ExitCode.DATA_ERROR: "InvalidDataset",
        ExitCode.MODEL_NOT_FOUND: "ModelNotFound",
        ExitCode.UNSUPPORTED: "UnsupportedHardware",
        ExitCode.STOPPED: "StoppedAfterCheckpoint",
        ExitCode.NOT_PERMITTED: "ModelAccessDenied",
        ExitCode.CONFIG_ERROR: "InvalidConfig",
        ExitCode.DIVERGED: "Diverged",
    }
    try:
        return reasons.get(ExitCode(code), "TrainerFailed")
    except ValueError:
        return "TrainerFailed"


class ModelSource(ApiModel):
    """The base model, as the trainer sees it: a hub id or a local folder."""

    name_or_path: Annotated[str, Field(min_length=1, max_length=1024)]
    """A hub id (``google/gemma-3-1b-it``) or a folder holding config.json and weights."""

    revision: Annotated[str, Field(max_length=256)] | None = None
    """Hub revision (branch, tag or commit)."""

    cache_dir: Annotated[str, Field(max_length=1024)] | None = None
    """Where hub downloads are cached; on the output volume so a retry does not fetch again."""

    attn_implementation: Attention = "auto"
    """Attention kernel. ``auto`` picks per family: Gemma 2 needs eager or FlashAttention >= 2.6
    for its logit soft-capping."""


S3_BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.\-]*[a-z0-9]$"
S3_KEY_PATTERN = r"^[^/].*$"
DATASET_S3_ONE_OF = "give exactly one of dataset.s3.key and dataset.s3.prefix"


class S3Dataset(ApiModel):
    """Training records in an S3-compatible bucket, streamed by the trainer."""

    bucket: Annotated[str, Field(min_length=3, max_length=63, pattern=S3_BUCKET_PATTERN)]
    """Bucket name."""

    key: Annotated[str, Field(min_length=1, max_length=1024, pattern=S3_KEY_PATTERN)] | None = None
    """One object (JSONL, JSON or Parquet) holding the training records."""

    prefix: Annotated[str, Field(min_length=1, max_length=1024, pattern=S3_KEY_PATTERN)] | None = (
        None
    )
    """Every ``.jsonl``, ``.json`` and ``.parquet`` object under this key prefix, in key order."""

    eval_key: (
        Annotated[str, Field(min_length=1, max_length=1024, pattern=S3_KEY_PATTERN)] | None
    ) = None
    """One object holding separate evaluation records (else ``evalFraction`` of the training
    records)."""

    endpoint: Annotated[str, Field(max_length=1024, pattern=r"^https?://[^\s]+$")] | None = None
    """URL of an S3-compatible service (MinIO, SeaweedFS, Ceph, GCS interoperability); AWS
    when empty."""

    region: Annotated[str, Field(min_length=1, max_length=64)] = "us-east-1"
    """The bucket's region."""

    @model_validator(mode="after")
    def _key_or_prefix(self) -> S3Dataset:
        if (self.key is None) == (self.prefix is None):
            raise ValueError(DATASET_S3_ONE_OF)
        return self

    def uri(self, key: str | None = None) -> str:
        """``s3://bucket/key`` of an object (of the key or prefix given when ``key`` is None)."""
        return f"s3://{self.bucket}/{key if key is not None else (self.key or self.prefix)}"


class DataSource(ApiModel):
    """Where the trainer reads examples: local files, a hub dataset or an S3 bucket."""

    train_files: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=256)] = (
        Field(default_factory=list)
    )
    """JSONL, JSON or Parquet files (or folders of them) with the training records."""

    eval_files: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=256)] = (
        Field(default_factory=list)
    )
    """Separate evaluation records; when empty, ``evalFraction`` of the training records."""

    hub_id: Annotated[str, Field(max_length=256)] | None = None
    """A hub dataset id, instead of files."""

    hub_config: Annotated[str, Field(max_length=256)] | None = None
    hub_train_split: Annotated[str, Field(max_length=64)] = "train"
    hub_eval_split: Annotated[str, Field(max_length=64)] | None = None

    s3: S3Dataset | None = None
    """Objects of an S3-compatible bucket, instead of files; credentials from
    ``GFT_DATASET_AWS_ACCESS_KEY_ID`` and ``GFT_DATASET_AWS_SECRET_ACCESS_KEY`` (anonymous
    requests without them)."""


class S3Target(ApiModel):
    """An S3-compatible bucket the artifacts are copied to after training."""

    bucket: Annotated[str, Field(min_length=3, max_length=63, pattern=S3_BUCKET_PATTERN)]
    """Bucket name (it must exist)."""

    prefix: Annotated[str, Field(max_length=512, pattern=r"^([^/].*)?$")] = ""
    """Key prefix. The operator appends ``<namespace>/<name>/``; each artifact folder goes
    under it by name (``adapter/``, ``merged/``)."""

    endpoint: Annotated[str, Field(max_length=1024, pattern=r"^https?://[^\s]+$")] | None = None
    """URL of an S3-compatible service (MinIO, SeaweedFS, Ceph, GCS interoperability); AWS
    when empty."""

    region: Annotated[str, Field(min_length=1, max_length=64)] = "us-east-1"
    """The bucket's region."""


class HubTarget(ApiModel):
    """A model repository on the Hugging Face Hub the artifact is pushed to after training."""

    repo: Annotated[
        str, Field(min_length=3, max_length=96, pattern=r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
    ]
    """``owner/name``; created (private unless ``private: false``) when missing."""

    revision: Annotated[str, Field(min_length=1, max_length=256)] = "main"
    """Branch to commit to."""

    private: bool = True
    """Create the repository private."""

    merged: bool = False
    """Push the merged model instead of the adapter (needs ``method.mergeAdapter``)."""


class OutputSettings(ApiModel):
    """Where results go and how checkpoints are kept."""

    dir: Annotated[str, Field(min_length=1, max_length=1024)]
    """Output folder: checkpoints, the adapter or model, TensorBoard events, summary.json."""

    checkpoint_every_steps: Annotated[int, Field(ge=0, le=10_000_000)] = 200
    """Save a checkpoint every N optimizer steps (0: only on stop and at the end)."""

    keep_checkpoints: Annotated[int, Field(ge=1, le=100)] = 2
    """How many of the newest checkpoints to keep."""

    export: ExportChoice = ExportChoice.BEST
    """Which weights are saved as the adapter or model: the best checkpoint's or the last."""

    s3: S3Target | None = None
    """Copy the artifacts to this bucket; credentials from ``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY``."""

    hub: HubTarget | None = None
    """Push the artifact to this hub repository; the token from ``GFT_HUB_EXPORT_TOKEN``."""

    resume_from: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    """Another run's checkpoint or adapter folder to start from, used only while this run has
    no checkpoint of its own (a checkpoint continues its step count and optimizer state; an
    adapter gives the starting weights of the LoRA/QLoRA adapter)."""


class Observability(ApiModel):
    """Where the trainer reports while it runs."""

    tensorboard_dir: Annotated[str, Field(max_length=1024)] | None = None
    """TensorBoard event files (default: ``<output>/tensorboard``)."""

    metrics_bind_address: Annotated[str, Field(max_length=64)] = "0.0.0.0"
    """Address of the Prometheus endpoint."""

    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9090
    """Port of the Prometheus endpoint; 0 turns it off."""

    termination_message_path: Annotated[str, Field(max_length=1024)] = TERMINATION_MESSAGE_PATH
    """Where the final summary is written on exit (the container's terminationMessagePath)."""


class TrainerResources(ApiModel):
    """What the training pod was given."""

    gpus: Annotated[int, Field(ge=0, le=16)] = 0
    """GPUs per pod (the GemmaFineTune's ``resources.gpus``). Above 0, a trainer that finds no
    usable CUDA GPU stops (exit 69, naming the driver it found and the one its torch needs)
    rather than train on the CPU."""


HUB_MERGED_NEEDS_MERGE = (
    "output.hub.merged needs method.mergeAdapter: true (there is no merged model)"
)


class TrainerConfig(ApiModel):
    """The trainer's whole configuration: the one file the operator renders."""

    run_name: Annotated[str, Field(min_length=1, max_length=253)] = "gemma-finetune"
    """Labels metrics and logs; the operator sets ``<namespace>/<name>``."""

    model: ModelSource
    dataset: DataSource
    data: DataShaping = Field(default_factory=DataShaping)
    method: Method = Field(default_factory=Method)
    training: Hyperparameters
    output: OutputSettings
    observability: Observability = Field(default_factory=Observability)
    resources: TrainerResources = Field(default_factory=TrainerResources)

    @model_validator(mode="after")
    def _merged_for_the_hub(self) -> TrainerConfig:
        if self.output.hub is not None and self.output.hub.merged and not self.method.merge_adapter:
            raise ValueError(HUB_MERGED_NEEDS_MERGE)
        return self

    @classmethod
    def load(cls, path: str | Path) -> TrainerConfig:
        """Read a YAML or JSON config file; errors name the file and the field."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: no such config file") from e
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(f"{path}: {format_validation_error(e)}") from e

    def dump(self) -> str:
        """The config file's text (YAML, camelCase keys)."""
        return yaml.safe_dump(self.to_wire(), sort_keys=False)


class ConfigError(ValueError):
    """The config file is unusable; the message names the file and the field."""


def format_validation_error(error: ValidationError) -> str:
    """``field.path: what is wrong`` for each problem, on one line each."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        lines.append(f"{where}: {problem['msg']}")
    return "; ".join(lines)


class Outcome(StrEnum):
    SUCCEEDED = "Succeeded"
    STOPPED = "Stopped"
    FAILED = "Failed"


class Sample(ApiModel):
    """One answer generated at an evaluation, trimmed for the status."""

    prompt: Annotated[str, Field(max_length=1024)]
    """The prompt (the last user turn of a chat)."""

    answer: Annotated[str, Field(max_length=2048)]
    """What the model answered, greedily."""

    reference: Annotated[str, Field(max_length=1024)] | None = None
    """The evaluation record's own answer, when the prompt came from one."""

    truncated: Literal["maxNewTokens", "timeBudget"] | None = None
    """Why the answer ends before the model ended it, when it does: it reached
    ``training.samples.maxNewTokens`` (raise it for longer answers), or the evaluation's time
    budget ran out (``maxSeconds``, ``maxShare``; the run's final answers are never cut by
    time). Absent: the model ended its answer itself."""


SAMPLE_TEXT_LIMIT = 240
"""Characters of a sample's prompt, answer and reference kept in the summary."""


def trim(text: str, limit: int = SAMPLE_TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RunCost(ApiModel):
    """What the run used, over every attempt so far (each pod's trainer measures its own
    GPUs from its start to its end, model loading included: the GPUs are held all along)."""

    gpu_seconds: Annotated[float, Field(ge=0)]
    """GPUs held times wall seconds, summed over the run's pods and attempts."""

    gpu_hours: Annotated[float, Field(ge=0)]
    """``gpuSeconds`` / 3600."""

    energy_wh: Annotated[float, Field(ge=0)] | None = None
    """Energy the GPUs drew, in watt-hours: NVML's energy counter where the GPU has one, else
    its power readings integrated over the run. Absent where a GPU reports no power (and on
    CPU runs)."""


class TrainerSummary(ApiModel):
    """The final summary: written to ``summary.json`` and, trimmed, to the termination message."""

    outcome: Outcome
    """Succeeded, Stopped (after a checkpoint, on a signal) or Failed."""

    exit_code: int
    """The trainer's exit code (see ``ExitCode``)."""

    reason: Annotated[str, Field(max_length=64)]
    """CamelCase, as in a Kubernetes condition."""

    message: Annotated[str, Field(max_length=2048)] = ""
    """For a human: what happened and, on failure, what to do next."""

    global_step: int = 0
    """Optimizer steps done when the trainer exited."""

    total_steps: int | None = None
    """Optimizer steps planned."""

    epoch: float | None = None
    """Epochs done (fractional)."""

    train_loss: float | None = None
    """Mean training loss of the run."""

    eval_loss: float | None = None
    """Final evaluation loss."""

    eval_token_accuracy: float | None = None
    """Final share of next tokens predicted right on evaluation records."""

    train_tokens: int | None = None
    """Tokens trained on."""

    tokens_per_second: float | None = None
    """Mean training throughput."""

    runtime_seconds: float | None = None
    """Wall time of the run (this attempt)."""

    eval_exact_match: float | None = None
    """Final share of sampled evaluation answers equal to the reference."""

    best_step: int | None = None
    """The step whose evaluation was best by ``training.metricForBest``."""

    best_eval_loss: float | None = None
    """The evaluation loss at ``bestStep``."""

    best_metric: float | None = None
    """The value of ``training.metricForBest`` at ``bestStep``."""

    exported_step: int | None = None
    """The step whose weights were saved as the artifacts (``bestStep`` with ``output.export:
    best``, else the last)."""

    samples: Annotated[list[Sample], Field(max_length=8)] = Field(default_factory=list)
    """The last evaluation's sample answers (trimmed)."""

    last_checkpoint: Annotated[str, Field(max_length=1024)] | None = None
    """Path of the newest checkpoint."""

    last_checkpoint_step: int | None = None
    """Optimizer step of the newest checkpoint."""

    artifacts: Annotated[
        dict[str, Annotated[str, Field(max_length=1024)]], Field(max_length=32)
    ] = Field(default_factory=dict)
    """What was saved, e.g. ``{"adapter": "/output/adapter"}``."""

    cost: RunCost | None = None
    """GPU-seconds, GPU-hours and energy of the run so far."""

    def to_termination_message(self) -> str:
        """JSON that fits the kubelet's 4 KiB limit: samples go first, from the last, then the
        message is cut."""
        data = self.to_wire()
        text = json.dumps(data, separators=(",", ":"))
        while len(text.encode()) > TERMINATION_MESSAGE_LIMIT and data.get("samples"):
            data["samples"].pop()
            if not data["samples"]:
                del data["samples"]
            text = json.dumps(data, separators=(",", ":"))
        overflow = len(text.encode()) - TERMINATION_MESSAGE_LIMIT
        if overflow > 0:
            msg = data.get("message", "")
            data["message"] = msg[: max(0, len(msg) - overflow - 16)] + "..."
            text = json.dumps(data, separators=(",", ":"))
        return text

    @classmethod
    def from_termination_message(cls, text: str) -> TrainerSummary | None:
        """Parse what the trainer wrote; ``None`` for anything else (a crash's stack trace)."""
        try:
            raw: Any = json.loads(text)
            return cls.model_validate(raw)
        except (ValueError, ValidationError):
            return None


__all__ = [
    "CONFIG_FILE_NAME",
    "DATASET_S3_CREDENTIAL_ENV",
    "HF_TOKEN_ENV",
    "HUB_EXPORT_TOKEN_ENV",
    "NON_RETRYABLE_EXIT_CODES",
    "S3_CREDENTIAL_ENV",
    "SUMMARY_FILE_NAME",
    "TERMINATION_MESSAGE_LIMIT",
    "TERMINATION_MESSAGE_PATH",
    "ConfigError",
    "DataShaping",
    "DataSource",
    "DatasetFormat",
    "ExitCode",
    "HubTarget",
    "Hyperparameters",
    "Method",
    "ModelSource",
    "Observability",
    "Outcome",
    "OutputSettings",
    "RunCost",
    "S3Dataset",
    "S3Target",
    "Sample",
    "TrainerConfig",
    "TrainerSummary",
    "describe_exit_code",
]
