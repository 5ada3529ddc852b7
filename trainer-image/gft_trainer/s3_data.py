"""Training records streamed from an S3-compatible bucket (``dataset.s3``).

A JSONL object is read line by line from the response body, never held whole; JSON and Parquet
objects (which need the whole file to parse) go through a temporary file. Every record keeps
where it came from as ``s3://bucket/key:line``, so the data checks (``gft_trainer.data``) name
the object and line of a bad record and fail the run with exit 65, exactly as for files.

The objects are listed once per run, with their ETags: every later pass (the check, then the
tokenization) reads those same versions (``If-Match``), so an object replaced while the run
reads it fails the attempt loudly instead of mixing two datasets. The ETags also key the
tokenization cache.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gft_api.contract import DATASET_S3_CREDENTIAL_ENV, S3Dataset

from gft_trainer import data
from gft_trainer.errors import DataError, NotPermittedError, TrainerError

log = logging.getLogger("gft")

CHUNK = 1 << 20
DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403"}
NO_OBJECT = {"NoSuchKey", "404", "NotFound"}
CHANGED = {"PreconditionFailed", "412"}


class DatasetUnreachable(TrainerError):
    """A fault on the way (network, a 5xx, an object replaced mid-run): retryable."""

    reason = "DatasetUnreachable"


@dataclass(frozen=True)
class S3Object:
    key: str
    etag: str
    size: int


def _client(source: S3Dataset) -> Any:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    key_id, secret = (os.environ.get(name) for name in DATASET_S3_CREDENTIAL_ENV)
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10)
    if not (key_id and secret):
        config = config.merge(Config(signature_version=UNSIGNED))
    # A session of its own: never the export's keys (AWS_*), nor the default chain's.
    return boto3.session.Session().client(
        "s3",
        endpoint_url=source.endpoint,
        region_name=source.region,
        aws_access_key_id=key_id or None,
        aws_secret_access_key=secret or None,
        config=config,
    )


def _fail(error: Exception, what: str, field: str) -> TrainerError:
    """The trainer's error for a refused or failed request about ``what`` (an object's URI)."""
    from botocore.exceptions import ClientError

    if not isinstance(error, ClientError):
        return DatasetUnreachable(f"{what}: {error}")
    code = str(error.response.get("Error", {}).get("Code", ""))
    message = error.response.get("Error", {}).get("Message", "") or str(error)
    if code in DENIED:
        return NotPermittedError(
            f"{what}: refused ({code}: {message}); name a Secret with AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY that may read it in dataset.s3.credentialsSecretRef"
        )
    if code == "NoSuchBucket":
        return DataError(f"{what}: no such bucket; check dataset.s3.bucket")
    if code in NO_OBJECT:
        return DataError(f"{what}: no such object; check {field}")
    if code in CHANGED:
        return DatasetUnreachable(
            f"{what}: the object changed while the run was reading it; the next attempt reads "
            "the new version from the start"
        )
    return DatasetUnreachable(f"{what}: {code}: {message}")


_LISTED: dict[tuple[int, str], tuple[S3Dataset, tuple[S3Object, ...]]] = {}
"""Listings by (source object, split): one run's config holds one ``S3Dataset`` from its check
to its tokenization (the entry keeps it alive, so its id is never another's)."""


def objects(source: S3Dataset, split: str) -> tuple[S3Object, ...]:
    """The objects of the ``train`` or ``eval`` split, listed once per run (sorted by key)."""
    entry = _LISTED.get((id(source), split))
    if entry is None:
        entry = _LISTED[(id(source), split)] = (source, _list(source, split))
    return entry[1]


def _list(source: S3Dataset, split: str) -> tuple[S3Object, ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    client = _client(source)
    if split == "eval":
        keys, field = ([source.eval_key] if source.eval_key else []), "dataset.s3.evalKey"
    elif source.key is not None:
        keys, field = [source.key], "dataset.s3.key"
    else:
        keys, field = [], "dataset.s3.prefix"
    found: list[S3Object] = []
    try:
        for key in keys:
            head = client.head_object(Bucket=source.bucket, Key=key)
            found.append(S3Object(key, head["ETag"], int(head["ContentLength"])))
        if split == "train" and source.prefix is not None:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=source.bucket, Prefix=source.prefix
            )
            for page in pages:
                for o in page.get("Contents", []):
                    if Path(o["Key"]).suffix.lower() in data.DATA_SUFFIXES:
                        found.append(S3Object(o["Key"], o["ETag"], int(o["Size"])))
    except (ClientError, BotoCoreError) as e:
        what = source.uri(keys[0] if keys else None)
        raise _fail(_bucket_missing(client, source) or e, what, field) from None
    if split == "train" and not found:
        raise DataError(
            f"{source.uri()}: no {', '.join(data.DATA_SUFFIXES)} objects under this prefix; "
            "check dataset.s3.prefix"
        )
    return tuple(sorted(found, key=lambda o: o.key))


def _bucket_missing(client: Any, source: S3Dataset) -> Exception | None:
    """The bucket's own 404, when it is missing: an object's HEAD answers a bare 404 (no body
    to say which), the same for a missing object and a missing bucket."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_bucket(Bucket=source.bucket)
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code", "")) in NO_OBJECT:
            e.response["Error"]["Code"] = "NoSuchBucket"
            return e
    except BotoCoreError:
        pass
    return None


def fingerprint(source: S3Dataset) -> list[tuple[str, str, int]]:
    """What the tokenized arrays depend on: every object's key, ETag and size."""
    return [(o.key, o.etag, o.size) for split in ("train", "eval") for o in objects(source, split)]


def stream(source: S3Dataset, split: str) -> Iterator[data.Record]:
    """The records of the ``train`` or ``eval`` objects, read afresh from the bucket."""
    client = _client(source)
    for obj in objects(source, split):
        yield from iter_object(client, source, obj)


def iter_object(client: Any, source: S3Dataset, obj: S3Object) -> Iterator[data.Record]:
    """The records of one object; a bad one raises ``DataError`` naming ``s3://...:line``."""
    uri = source.uri(obj.key)
    suffix = Path(obj.key).suffix.lower()
    if suffix not in data.DATA_SUFFIXES:
        raise DataError(f"{uri}: unknown file type; use one of {', '.join(data.DATA_SUFFIXES)}")
    if suffix == ".jsonl":
        count = 0
        for n, raw_line in enumerate(_lines(client, source, obj), start=1):
            line = data._utf8(raw_line, f"{uri}:{n}")
            if not line.strip():
                continue
            count += 1
            yield data.Record(f"{uri}:{n}", data._parse_object(line, f"{uri}:{n}"))
        if not count:
            raise DataError(f"{uri}: the object holds no records")
        return
    # JSON and Parquet parse from a whole file: a local copy, named after the object in errors.
    with tempfile.TemporaryDirectory(prefix="gft-s3-") as tmp:
        local = Path(tmp) / f"object{suffix}"
        with local.open("wb") as f:
            for chunk in _chunks(client, source, obj):
                f.write(chunk)
        try:
            for record in data.iter_file(local):
                yield data.Record(record.where.replace(str(local), uri), record.data)
        except DataError as e:
            raise DataError(str(e).replace(str(local), uri)) from None


def _chunks(client: Any, source: S3Dataset, obj: S3Object) -> Iterator[bytes]:
    from botocore.exceptions import BotoCoreError, ClientError

    uri = source.uri(obj.key)
    try:
        body = client.get_object(Bucket=source.bucket, Key=obj.key, IfMatch=obj.etag)["Body"]
        yield from body.iter_chunks(CHUNK)
    except (ClientError, BotoCoreError) as e:
        raise _fail(e, uri, "dataset.s3") from None


def _lines(client: Any, source: S3Dataset, obj: S3Object) -> Iterator[bytes]:
    """The object's lines split at ``\\n`` only, as a file opened in binary mode splits them
    (so line numbers agree with the user's editor and with ``gft_trainer.data``)."""
    rest = b""
    for chunk in _chunks(client, source, obj):
        rest += chunk
        *whole, rest = rest.split(b"\n")
        for line in whole:
            yield line + b"\n"
    if rest:
        yield rest
