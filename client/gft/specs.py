"""From what a user types to a typed ``GemmaFineTune``, and back (pure functions, no cluster).

The spec is ``gft_api``'s own model, so the client checks a fine-tune exactly as the operator and
the CRD do, and cannot drift from them: a field the API does not have is refused here by name.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gft_api import API_VERSION, KIND
from gft_api.contract import format_validation_error
from gft_api.training import Hyperparameters, Method
from gft_api.v1alpha1 import (
    DatasetHub,
    DatasetS3,
    DatasetVolume,
    GemmaFineTuneSpec,
    GemmaFineTuneStatus,
    ModelSpec,
    SecretRef,
)
from pydantic import BaseModel, ValidationError

from gft.errors import GftError


@dataclass(frozen=True)
class LocalFile:
    """A dataset on this machine, to be uploaded where the run can read it."""

    path: Path


@dataclass(frozen=True)
class S3Bucket:
    """An S3-compatible bucket: where local datasets are uploaded, and how pods read them.

    ``endpoint`` is the address the training pod uses; ``upload_endpoint`` the one this machine
    uses, when they differ (a bucket reached here through a port-forward). Uploads use boto3's
    usual credentials (``AWS_ACCESS_KEY_ID``..., a profile); the pod reads with the keys of
    ``credentials_secret`` (a Secret in the run's namespace with ``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY``), anonymously without one."""

    bucket: str
    prefix: str = "gft-datasets"
    endpoint: str | None = None
    region: str = "us-east-1"
    credentials_secret: str | None = None
    upload_endpoint: str | None = None


@dataclass(frozen=True)
class Claim:
    """A PersistentVolumeClaim in the run's namespace: where local datasets are uploaded (the
    claim is created, ``size`` large, when missing)."""

    name: str
    folder: str = "gft-datasets"
    size: str = "10Gi"
    storage_class: str | None = None


DataStore = S3Bucket | Claim


def data_source(
    data: str | os.PathLike | dict | BaseModel, store: DataStore | None = None
) -> dict[str, Any] | LocalFile:
    """The ``spec.dataset`` source fields for ``data``:

    - ``s3://BUCKET/KEY`` (a prefix when it ends with ``/``), read with ``store``'s endpoint,
      region and Secret when ``store`` is an ``S3Bucket``;
    - ``hf://ORG/NAME`` (or ``hf://datasets/ORG/NAME``), a hub dataset;
    - ``pvc://CLAIM/PATH``, a file or folder on a claim of the run's namespace;
    - a mapping or a model of the source fields (``{"configMap": {...}}``), as it is;
    - otherwise a local file, which must exist (``LocalFile``: the caller uploads it)."""
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(data, dict):
        return dict(data)
    text = os.fspath(data)
    if text.startswith("s3://"):
        bucket, _, key = text[5:].partition("/")
        if not bucket or not key:
            raise GftError(f"{text}: write s3://BUCKET/KEY, or s3://BUCKET/PREFIX/ for a prefix")
        where = {"prefix": key} if key.endswith("/") else {"key": key}
        s3 = store if isinstance(store, S3Bucket) else S3Bucket(bucket)
        return {"s3": _dataset_s3(bucket, where, s3)}
    if text.startswith("hf://"):
        dataset_id = text[5:].removeprefix("datasets/")
        return {"hub": DatasetHub(id=dataset_id).to_wire()}
    if text.startswith("pvc://"):
        claim, _, path = text[6:].partition("/")
        if not claim or not path:
            raise GftError(f"{text}: write pvc://CLAIM/PATH (a file or folder on the claim)")
        return {"volume": DatasetVolume(claim_name=claim, path=path).to_wire()}
    path = Path(text).expanduser()
    if not path.is_file():
        raise GftError(
            f"{text}: no such file here; a bucket is s3://BUCKET/KEY, a hub dataset "
            "hf://ORG/NAME, a file on a claim pvc://CLAIM/PATH"
        )
    return LocalFile(path)


def _dataset_s3(bucket: str, where: dict[str, str], s3: S3Bucket) -> dict[str, Any]:
    secret = SecretRef(name=s3.credentials_secret) if s3.credentials_secret else None
    try:
        return DatasetS3(
            bucket=bucket,
            endpoint=s3.endpoint,
            region=s3.region,
            credentials_secret_ref=secret,
            **where,
        ).to_wire()
    except ValidationError as e:
        raise GftError(f"s3://{bucket}: {format_validation_error(e)}") from None


def model_source(model: str | os.PathLike | dict | BaseModel) -> dict[str, Any]:
    """``spec.model`` for a hub id (``google/gemma-3-1b-it``), ``pvc://CLAIM/PATH``, an absolute
    path inside the trainer's image or node, or the fields themselves."""
    if isinstance(model, BaseModel):
        return model.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(model, dict):
        return dict(model)
    text = os.fspath(model)
    if text.startswith("pvc://"):
        claim, _, path = text[6:].partition("/")
        name = Path(path).name or claim
        return {"name": _model_name(name), "volume": {"claimName": claim, "path": path or None}}
    if text.startswith("/"):
        return {"name": _model_name(Path(text).name), "path": text}
    return ModelSpec(name=text).to_wire()


def _model_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._\-/]", "-", text).lstrip("-._/") or "model"


def finetune_spec(
    model: str | os.PathLike | dict | BaseModel,
    source: dict[str, Any],
    method: str | dict | Method = "lora",
    training: dict | Hyperparameters | None = None,
    dataset: dict | None = None,
    **spec: Any,
) -> GemmaFineTuneSpec:
    """The typed spec: ``source`` (``data_source``'s fields) with the ``dataset`` shaping
    (``format``, ``maxSeqLength``...), and any other spec field by its API name."""
    if isinstance(method, str):
        method = {"type": method}
    body: dict[str, Any] = {
        "model": model_source(model),
        "dataset": {**(dataset or {}), **source},
        "method": _wire(method),
        "training": _wire(training) if training is not None else {"epochs": 1},
        **{_camel(k): _wire(v) for k, v in spec.items()},
    }
    try:
        return GemmaFineTuneSpec.model_validate(body)
    except ValidationError as e:
        raise GftError(
            f"the fine-tune's spec is not valid: {format_validation_error(e)}\n"
            "Fix these fields (`kubectl explain gft.spec` describes each) and try again."
        ) from None


def manifest(name: str, spec: GemmaFineTuneSpec, labels: dict[str, str] | None = None) -> dict:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": spec.to_wire()}


def _wire(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    return value


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


# ------------------------------------------------------------------------------- reading back


def lenient(model: type[BaseModel], data: Any, what: str) -> Any:
    """``data`` as ``model``, dropping (with one warning) the fields a newer API added that
    this client does not know: a newer operator must not break an older client's reads."""
    data = _copy(data or {})
    dropped: list[str] = []
    for _ in range(64):
        try:
            parsed = model.model_validate(data)
            break
        except ValidationError as e:
            extra = [err["loc"] for err in e.errors() if err["type"] == "extra_forbidden"]
            if not extra:
                raise GftError(f"{what}: the server sent what this client cannot read: "
                               f"{format_validation_error(e)}") from None  # fmt: skip
            for loc in extra:
                _drop(data, loc)
                dropped.append(".".join(str(p) for p in loc))
    else:  # pragma: no cover - 64 rounds of unknown fields
        raise GftError(f"{what}: too many fields this client does not know; upgrade it")
    if dropped:
        warnings.warn(
            f"{what}: fields this client does not know were left out ({', '.join(dropped)}); "
            "upgrade the client (pip install -U 'gemma-finetune-operator[client]')",
            stacklevel=3,
        )
    return parsed


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _drop(data: Any, loc: tuple) -> None:
    for part in loc[:-1]:
        data = data[part]
    if isinstance(data, dict):
        data.pop(loc[-1], None)


def parse_spec(body: dict) -> GemmaFineTuneSpec:
    name = (body.get("metadata") or {}).get("name", "?")
    return lenient(GemmaFineTuneSpec, body.get("spec"), f"gemmafinetunes/{name} spec")


def parse_status(body: dict) -> GemmaFineTuneStatus:
    name = (body.get("metadata") or {}).get("name", "?")
    return lenient(GemmaFineTuneStatus, body.get("status"), f"gemmafinetunes/{name} status")


def checked_spec(manifest: dict) -> GemmaFineTuneSpec:
    """A manifest's spec, checked as the API server will check it (unknown fields refused)."""
    try:
        return GemmaFineTuneSpec.model_validate(manifest.get("spec") or {})
    except ValidationError as e:
        raise GftError(
            f"the fine-tune's spec is not valid: {format_validation_error(e)}\n"
            "Fix these fields (`kubectl explain gft.spec` describes each) and try again."
        ) from None
