"""Putting a local dataset in an S3-compatible bucket, with a progress bar, under a key named by
its content (``<prefix>/<sha256[:16]>/<file name>``): uploading the same file again costs a
HEAD, and a run's objects never change under it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gft.errors import GftError
from gft.specs import S3Bucket


def object_key(store: S3Bucket, digest: str, path: Path) -> str:
    return "/".join(p for p in (store.prefix.strip("/"), digest[:16], path.name) if p)


def upload(
    path: Path, store: S3Bucket, digest: str, report: Callable[[int], Any]
) -> tuple[str, bool]:
    """``(key, sent)``: the object's key, and whether it was sent (False: it was there)."""
    import boto3
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    key = object_key(store, digest, path)
    where = f"s3://{store.bucket}/{key}"
    client = boto3.session.Session().client(
        "s3", endpoint_url=store.upload_endpoint or store.endpoint, region_name=store.region
    )
    try:
        try:
            head = client.head_object(Bucket=store.bucket, Key=key)
            if int(head["ContentLength"]) == path.stat().st_size:
                report(path.stat().st_size)
                return key, False
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) not in ("404", "NoSuchKey", "NotFound"):
                raise
        client.upload_file(str(path), store.bucket, key, Callback=report)
    except (ClientError, S3UploadFailedError) as failed:
        e = failed if isinstance(failed, ClientError) else failed.__context__
        code = (
            str(e.response.get("Error", {}).get("Code", "")) if isinstance(e, ClientError) else ""
        )
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            advice = (
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to keys that "
                "may write there"
            )
        elif code in ("NoSuchBucket", "404"):
            advice = f"create the bucket {store.bucket} first, or name another"
        else:
            advice = "check the endpoint and try again"
        raise GftError(f"{where}: upload refused ({code or failed}); {advice}") from None
    except BotoCoreError as e:
        raise GftError(
            f"{where}: {e}; check the endpoint ({store.upload_endpoint or store.endpoint or 'AWS'})"
        ) from None
    return key, True
