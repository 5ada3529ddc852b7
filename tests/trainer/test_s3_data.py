"""Training records read from a real S3-compatible server (SeaweedFS on loopback): streamed with
the same checks as files, a bad record failing with exit 65 naming its object and line; a
missing object, a refused read and an empty prefix are said naming the field to fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from gft_api.contract import DataSource, ExitCode, S3Dataset, TrainerConfig
from gft_trainer import data, s3_data

from trainer.conftest import CHAT, write_config
from trainer.s3_server import S3, seaweedfs
from trainer.test_cli import run_cli

pytestmark = pytest.mark.slow  # a SeaweedFS server starts (about 20 s)

BUCKET = "datasets"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> S3:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="chat/train.jsonl", Body=CHAT.read_bytes())
        yield server


@pytest.fixture
def keys(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GFT_DATASET_AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("GFT_DATASET_AWS_SECRET_ACCESS_KEY", s3.secret_key)


def source(s3: S3, **fields) -> DataSource:
    return DataSource(s3=S3Dataset(bucket=BUCKET, endpoint=s3.endpoint, **fields))


def test_records_stream_line_by_line_with_their_object_and_line(s3: S3, keys: None) -> None:
    records = list(data.stream(source(s3, key="chat/train.jsonl"), "train"))
    lines = [json.loads(line) for line in CHAT.read_text().splitlines() if line.strip()]
    assert [r.data for r in records] == lines
    assert records[0].where == f"s3://{BUCKET}/chat/train.jsonl:1"


def test_a_prefix_reads_its_data_objects_in_key_order(s3: S3, keys: None) -> None:
    client = s3.client()
    one = '{"text": "one"}\n'
    client.put_object(Bucket=BUCKET, Key="parts/b.jsonl", Body=b'{"text": "two"}\n')
    client.put_object(Bucket=BUCKET, Key="parts/a.jsonl", Body=one.encode())
    client.put_object(Bucket=BUCKET, Key="parts/README.md", Body=b"not data")
    client.put_object(
        Bucket=BUCKET, Key="parts/c.json", Body=json.dumps([{"text": "three"}]).encode()
    )
    records = list(data.stream(source(s3, prefix="parts/"), "train"))
    assert [r.data["text"] for r in records] == ["one", "two", "three"]
    assert records[2].where == f"s3://{BUCKET}/parts/c.json: record 0"


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        (b'{"text": "ok"}\n\n{"text": broken}\n', r"s3://datasets/bad/x\.jsonl:3: not valid JSON"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"s3://datasets/bad/x\.jsonl:2: byte 0xe9"),
        (b"\n\n", r"s3://datasets/bad/x\.jsonl: the object holds no records"),
    ],
)
def test_a_bad_object_fails_with_exit_65_naming_object_and_line(
    tmp_path: Path, s3: S3, keys: None, tiny_gemma3: Path, body: bytes, pattern: str
) -> None:
    s3.client().put_object(Bucket=BUCKET, Key="bad/x.jsonl", Body=body)
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_gemma3,
        tmp_path / "out",
        dataset={"s3": {"bucket": BUCKET, "key": "bad/x.jsonl", "endpoint": s3.endpoint}},
        data={"format": "text"},
    )
    code, summary = run_cli(cfg)
    assert code == ExitCode.DATA_ERROR, summary.message
    assert summary.reason == "InvalidDataset"
    assert re.search(pattern, summary.message), summary.message


def test_a_bad_json_object_is_named_not_its_local_copy(s3: S3, keys: None) -> None:
    s3.client().put_object(Bucket=BUCKET, Key="bad/list.json", Body=b'[{"text": "a"},\n oops]')
    with pytest.raises(data.DataError) as raised:
        list(data.stream(source(s3, key="bad/list.json"), "train"))
    assert str(raised.value).startswith(f"s3://{BUCKET}/bad/list.json:2: not valid JSON")


def test_missing_object_refused_read_and_empty_prefix_name_the_field(
    s3: S3, keys: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(data.DataError, match=r"s3://datasets/nope\.jsonl: no such object; check "
                       r"dataset\.s3\.key"):  # fmt: skip
        list(data.stream(source(s3, key="nope.jsonl"), "train"))
    with pytest.raises(data.DataError, match=r"no \.jsonl, \.json, \.parquet objects under"):
        list(data.stream(source(s3, prefix="empty/"), "train"))
    with pytest.raises(data.DataError, match=r"no such bucket; check dataset\.s3\.bucket"):
        list(data.stream(DataSource(s3=S3Dataset(bucket="no-such", key="k.jsonl",
                                                 endpoint=s3.endpoint)), "train"))  # fmt: skip
    monkeypatch.setenv("GFT_DATASET_AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(s3_data.NotPermittedError) as refused:
        list(data.stream(source(s3, key="chat/train.jsonl"), "train"))
    assert refused.value.exit_code == ExitCode.NOT_PERMITTED
    assert "dataset.s3.credentialsSecretRef" in str(refused.value)
    # No keys at all: anonymous requests, which this bucket refuses too.
    monkeypatch.delenv("GFT_DATASET_AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("GFT_DATASET_AWS_SECRET_ACCESS_KEY")
    with pytest.raises(s3_data.NotPermittedError):
        list(data.stream(source(s3, key="chat/train.jsonl"), "train"))


def test_an_object_replaced_mid_run_fails_the_attempt(s3: S3, keys: None) -> None:
    """Every pass reads the version listed first: a dataset is never half old, half new."""
    client = s3.client()
    client.put_object(Bucket=BUCKET, Key="moving.jsonl", Body=b'{"text": "v1"}\n')
    src = source(s3, key="moving.jsonl")
    assert [r.data["text"] for r in data.stream(src, "train")] == ["v1"]
    client.put_object(Bucket=BUCKET, Key="moving.jsonl", Body=b'{"text": "v2"}\n')
    with pytest.raises(s3_data.DatasetUnreachable, match="changed while the run"):
        list(data.stream(src, "train"))
    assert s3_data.DatasetUnreachable.exit_code == ExitCode.RETRYABLE


def test_a_run_trains_from_the_bucket_and_keys_its_cache_by_version(
    tmp_path: Path, s3: S3, keys: None, tiny_gemma3: Path
) -> None:
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_gemma3,
        out,
        dataset={"s3": {"bucket": BUCKET, "key": "chat/train.jsonl", "endpoint": s3.endpoint}},
        training={"maxSteps": 2},
    )
    code, summary = run_cli(cfg)
    assert code == 0, summary.message
    assert summary.global_step == 2 and (out / "adapter" / "adapter_config.json").exists()
    (cached,) = (p.name for p in (out / "data-cache").iterdir())
    config = TrainerConfig.load(cfg)

    def key_now() -> str:
        from transformers import AutoTokenizer

        fresh = config.model_copy(deep=True)  # a new run: the objects listed afresh
        records = data.read_and_check(fresh.dataset, fresh.data, fresh.training.seed)
        tok = data.Tokenizer(AutoTokenizer.from_pretrained(tiny_gemma3))
        return data.cache_key(tok, records, fresh.data)

    assert key_now() == cached  # the same objects: the run's cache is found again
    # The same key with other content is another dataset: tokenized again, not read back.
    lines = CHAT.read_text().splitlines()
    s3.client().put_object(
        Bucket=BUCKET, Key="chat/train.jsonl", Body="\n".join(reversed(lines)).encode()
    )
    assert key_now() != cached
