"""Copies of the artifacts beyond the output volume: an S3-compatible bucket, a hub repository.

Each runs after the artifacts are saved on the volume, so a failed copy never loses them. A
refusal (wrong credentials, no access, no such bucket or repository) is not retried: the error
names the field to fix. A network fault is retryable; the retry finds the training done
(its last checkpoint is at the final step) and only saves and copies again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gft_api.contract import HUB_EXPORT_TOKEN_ENV, S3_CREDENTIAL_ENV, ExitCode, HubTarget, S3Target

from gft_trainer.errors import TrainerError

log = logging.getLogger("gft")


class ExportDenied(TrainerError):
    exit_code = ExitCode.NOT_PERMITTED
    reason = "ExportDenied"


class ExportTargetNotFound(TrainerError):
    exit_code = ExitCode.CONFIG_ERROR
    reason = "ExportTargetNotFound"


class ExportFailed(TrainerError):
    """A fault on the way (network, a 5xx): retryable."""

    reason = "ExportFailed"


def check_credentials(s3: S3Target | None, hub: HubTarget | None) -> None:
    """Before training: a copy asked for without its credentials fails now, not hours later."""
    if s3 is not None:
        _s3_credentials(s3)
    if hub is not None:
        _hub_token(hub)


def _s3_credentials(target: S3Target) -> None:
    missing = [name for name in S3_CREDENTIAL_ENV if not os.environ.get(name)]
    if missing:
        raise ExportDenied(
            f"output.s3 (bucket {target.bucket}): no credentials ({', '.join(missing)} unset): "
            "name a Secret with these keys in output.s3.credentialsSecretRef"
        )


def _hub_token(target: HubTarget) -> str:
    token = os.environ.get(HUB_EXPORT_TOKEN_ENV)
    if not token:
        raise ExportDenied(
            f"output.hub (repo {target.repo}): no token: name a Secret in output.hub.tokenSecretRef"
        )
    return token


# ------------------------------------------------------------------------------------------ S3

S3_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403"}
S3_MISSING = {"NoSuchBucket", "404", "NotFound"}


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def to_s3(folders: dict[str, Path], target: S3Target) -> dict[str, str]:
    """Upload each folder under ``s3://bucket/prefix/<name>/``; returns their URLs."""
    import boto3
    from boto3.exceptions import S3UploadFailedError
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    where = f"output.s3 (bucket {target.bucket}" + (
        f" at {target.endpoint})" if target.endpoint else ")"
    )
    _s3_credentials(target)
    # A session of its own: the default one keeps the first credentials it ever resolved.
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=target.endpoint,
        region_name=target.region,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10),
    )
    urls: dict[str, str] = {}
    try:
        # Asked first, so that a missing bucket or a refusal is said as such (some services
        # answer an upload into a missing bucket with a bare InternalError).
        client.head_bucket(Bucket=target.bucket)
        for name, folder in folders.items():
            prefix = "/".join(p for p in (target.prefix.strip("/"), name) if p)
            for path in files_of(folder):
                key = f"{prefix}/{path.relative_to(folder).as_posix()}"
                client.upload_file(str(path), target.bucket, key)
            urls[f"s3-{name}"] = f"s3://{target.bucket}/{prefix}/"
            log.info("copied %s to s3://%s/%s/", folder, target.bucket, prefix)
    except (ClientError, S3UploadFailedError) as failed:
        # upload_file wraps the service's answer; the ClientError is what it was raised from.
        e = failed if isinstance(failed, ClientError) else failed.__context__
        if not isinstance(e, ClientError):
            raise ExportFailed(f"{where}: {failed}") from None
        code = str(e.response.get("Error", {}).get("Code", ""))
        message = e.response.get("Error", {}).get("Message", "") or str(e)
        if code in S3_DENIED:
            raise ExportDenied(
                f"{where}: refused ({code}: {message}); check the keys in "
                "output.s3.credentialsSecretRef and that they may write to the bucket"
            ) from None
        if code in S3_MISSING:
            raise ExportTargetNotFound(
                f"{where}: no such bucket ({code}); create it, or fix output.s3.bucket"
            ) from None
        raise ExportFailed(f"{where}: {code}: {message}") from None
    except BotoCoreError as e:
        raise ExportFailed(f"{where}: {e}") from None
    return urls


# ----------------------------------------------------------------------------------------- hub


def to_hub(folder: Path, target: HubTarget) -> str:
    """Create the repository when missing, and commit the folder to it; returns its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    where = f"output.hub (repo {target.repo})"
    token = _hub_token(target)
    # HF_ENDPOINT: a hub mirror or a self-hosted one (read here, not at import, so it can be set
    # per run)
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token)
    try:
        url = api.create_repo(target.repo, private=target.private, exist_ok=True)
        if target.revision != "main":
            api.create_branch(target.repo, branch=target.revision, exist_ok=True)
        api.upload_folder(
            repo_id=target.repo,
            folder_path=str(folder),
            revision=target.revision,
            commit_message=f"gft: {folder.name} from a fine-tune",
        )
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise ExportDenied(
                f"{where}: refused (HTTP {status}); the token in output.hub.tokenSecretRef needs "
                "write access to the repository or its owner"
            ) from None
        if status == 404:
            raise ExportTargetNotFound(
                f"{where}: not found (HTTP 404); check the owner in output.hub.repo"
            ) from None
        raise ExportFailed(f"{where}: HTTP {status}: {e}") from None
    log.info("pushed %s to %s@%s", folder, target.repo, target.revision)
    return str(url)
