"""The artifacts copied to a real S3-compatible server (SeaweedFS on loopback): every file
arrives under the fine-tune's prefix; wrong keys, a missing bucket and missing credentials are
refused without a retry, naming the field to fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from gft_api.contract import ExitCode, S3Target
from gft_trainer import export

from trainer.conftest import write_config
from trainer.hub_server import hub_server
from trainer.s3_server import S3, seaweedfs
from trainer.test_cli import run_cli
from trainer.test_export import artifact

pytestmark = pytest.mark.slow  # a SeaweedFS server starts (about 20 s)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> S3:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        server.client().create_bucket(Bucket="models")
        yield server


@pytest.fixture
def keys(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)


def test_every_file_arrives_under_the_prefix(tmp_path: Path, s3: S3, keys: None) -> None:
    folder = artifact(tmp_path)
    target = S3Target(bucket="models", prefix="team/ns/pip", endpoint=s3.endpoint)
    urls = export.to_s3({"adapter": folder}, target)
    assert urls == {"s3-adapter": "s3://models/team/ns/pip/adapter/"}
    client = s3.client()
    listed = client.list_objects_v2(Bucket="models", Prefix="team/ns/pip/adapter/")
    keys_found = sorted(o["Key"] for o in listed.get("Contents", []))
    expected = {
        f"team/ns/pip/adapter/{p.relative_to(folder).as_posix()}": p.read_bytes()
        for p in export.files_of(folder)
    }
    assert keys_found == sorted(expected)
    for key, data in expected.items():
        assert client.get_object(Bucket="models", Key=key)["Body"].read() == data


def test_wrong_keys_are_refused_and_not_retried(
    tmp_path: Path, s3: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    target = S3Target(bucket="models", endpoint=s3.endpoint)
    with pytest.raises(export.ExportDenied) as raised:
        export.to_s3({"adapter": artifact(tmp_path)}, target)
    assert raised.value.exit_code == ExitCode.NOT_PERMITTED
    assert "output.s3.credentialsSecretRef" in str(raised.value)


def test_a_missing_bucket_names_the_field(tmp_path: Path, s3: S3, keys: None) -> None:
    target = S3Target(bucket="no-such-bucket", endpoint=s3.endpoint)
    with pytest.raises(export.ExportTargetNotFound) as raised:
        export.to_s3({"adapter": artifact(tmp_path)}, target)
    assert raised.value.exit_code == ExitCode.CONFIG_ERROR
    assert "output.s3.bucket" in str(raised.value)


def test_no_credentials_are_refused_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    target = S3Target(bucket="models", endpoint="http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(export.ExportDenied, match=r"AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"):
        export.to_s3({"adapter": artifact(tmp_path)}, target)


def test_a_run_copies_its_artifacts_to_the_bucket_and_the_hub(
    tmp_path: Path, tiny_gemma3: Path, s3: S3, keys: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    with hub_server() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("GFT_HUB_EXPORT_TOKEN", "hf_write")
        cfg = write_config(
            tmp_path / "c.yaml",
            tiny_gemma3,
            out,
            method={"type": "lora", "mergeAdapter": True, "lora": {"r": 4}},
            training={"maxSteps": 2},
            output={
                "dir": str(out),
                "s3": {"bucket": "models", "prefix": "ns/run", "endpoint": s3.endpoint},
                "hub": {"repo": "me/run-merged", "merged": True},
            },
        )
        code, summary = run_cli(cfg)
        assert code == 0, summary.message
        # Started again (its Job re-created), it trains nothing and copies nothing again.
        sent = len(hub.tokens)
        code, again = run_cli(cfg)
        assert code == 0 and again.artifacts == summary.artifacts and len(hub.tokens) == sent
    assert summary.artifacts["s3-adapter"] == "s3://models/ns/run/adapter/"
    assert summary.artifacts["s3-merged"] == "s3://models/ns/run/merged/"
    assert summary.artifacts["hub"] == f"{hub.url}/me/run-merged"
    client = s3.client()
    keys_found = {
        o["Key"] for o in client.list_objects_v2(Bucket="models", Prefix="ns/run/")["Contents"]
    }
    assert {"ns/run/adapter/adapter_model.safetensors", "ns/run/merged/config.json"} <= keys_found
    assert {"model.safetensors", "config.json", "generation_config.json"} <= set(
        hub.files["me/run-merged"]
    )
