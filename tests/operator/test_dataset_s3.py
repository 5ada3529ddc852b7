"""``spec.dataset.s3``: the API takes a bucket and a key or a prefix, the operator renders it for
the trainer and passes the keys of its own Secret (apart from ``output.s3``'s) by reference only."""

from __future__ import annotations

import json

import pytest
import yaml
from gft_api.contract import DATASET_S3_CREDENTIAL_ENV, S3_CREDENTIAL_ENV, TrainerConfig
from gft_api.v1alpha1 import GemmaFineTuneSpec
from gft_operator import children
from operator_samples import finetune
from pydantic import ValidationError

OWNER = children.Owner(name="demo", namespace="ml", uid="1234-uid")
DATASET = {
    "s3": {
        "bucket": "datasets",
        "key": "team/train.jsonl",
        "evalKey": "team/eval.jsonl",
        "endpoint": "http://s3.example:8333",
        "credentialsSecretRef": {"name": "data-keys"},
    },
    "format": "chat",
}


def _spec(**overrides) -> GemmaFineTuneSpec:
    return GemmaFineTuneSpec.model_validate(finetune(**overrides)["spec"])


def test_the_trainer_reads_the_objects_with_the_datasets_own_keys() -> None:
    spec = _spec(
        dataset=DATASET,
        output={
            "s3": {
                "bucket": "models",
                "endpoint": "http://s3.example:8333",
                "credentialsSecretRef": {"name": "model-keys"},
            }
        },
    )
    text = children.config_map(OWNER, spec)["data"]["config.yaml"]
    config = TrainerConfig.model_validate(yaml.safe_load(text))
    s3 = config.dataset.s3
    assert s3 is not None and (s3.bucket, s3.key, s3.eval_key) == (
        "datasets",
        "team/train.jsonl",
        "team/eval.jsonl",
    )
    assert s3.endpoint == "http://s3.example:8333" and not config.dataset.train_files
    assert "data-keys" not in text  # the Secret's name stays in the spec; its keys in env
    env = {e["name"]: e for e in children.job(OWNER, spec)["spec"]["template"]["spec"]
           ["containers"][0]["env"]}  # fmt: skip
    for name, key in zip(DATASET_S3_CREDENTIAL_ENV, S3_CREDENTIAL_ENV, strict=True):
        assert env[name]["valueFrom"] == {"secretKeyRef": {"name": "data-keys", "key": key}}
    # The export keeps its own credentials: two stores, two Secrets, no variable shared.
    for name in S3_CREDENTIAL_ENV:
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "model-keys"


def test_a_public_bucket_needs_no_secret() -> None:
    dataset = {"s3": {"bucket": "public-data", "prefix": "chats/"}}
    job = children.job(OWNER, _spec(dataset=dataset))
    names = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not names & set(DATASET_S3_CREDENTIAL_ENV)


@pytest.mark.parametrize(
    ("s3", "message"),
    [
        ({"bucket": "datasets"}, "give exactly one of dataset.s3.key and dataset.s3.prefix"),
        (
            {"bucket": "datasets", "key": "a.jsonl", "prefix": "b/"},
            "give exactly one of dataset.s3.key and dataset.s3.prefix",
        ),
        ({"bucket": "Not_A_Bucket", "key": "a.jsonl"}, "bucket"),
        ({"bucket": "datasets", "key": "/a.jsonl"}, "key"),
    ],
)
def test_a_bad_location_is_refused_naming_the_field(s3: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _spec(dataset={"s3": s3})


def test_s3_is_one_source_among_the_others() -> None:
    with pytest.raises(ValidationError, match=r"dataset\.s3 or dataset\.path"):
        _spec(dataset={"s3": {"bucket": "datasets", "key": "a.jsonl"}, "path": "/data/a.jsonl"})


def _fresh(code: str) -> str:
    """``code`` run by a fresh interpreter: pydantic builds a model whose field types come later
    in the module on first use, and what the operator's process touches first decides that."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_operator_understands_every_field_of_dataset_s3() -> None:
    """An operator reading a spec drops the fields its models do not know (a newer CRD): each
    dataset.s3 field must be known by its wire name, or its Secret never reaches the pod."""
    spec = finetune(dataset=DATASET)["spec"]
    out = _fresh(
        "import json, sys\n"
        "from gft_api.compat import known_fields\n"
        "from gft_api.v1alpha1 import GemmaFineTuneSpec\n"
        f"print(json.dumps(known_fields(GemmaFineTuneSpec, {spec!r})))"
    )
    kept, ignored = json.loads(out)
    assert ignored == []
    assert kept["dataset"] == spec["dataset"]


def test_every_field_of_the_api_has_its_camel_case_name() -> None:
    """A field whose type is defined further down the module is built late by pydantic; it
    must still get its wire name (camelCase) as soon as the module is imported."""
    out = _fresh(
        "from gft_api import v1alpha1\n"
        "from pydantic import BaseModel\n"
        "from pydantic.alias_generators import to_camel\n"
        "for m in list(vars(v1alpha1).values()):\n"
        "    if isinstance(m, type) and issubclass(m, BaseModel):\n"
        "        for name, field in m.model_fields.items():\n"
        "            if (field.alias or name) not in (to_camel(name), 'tensorboardURL'):\n"
        "                print(f'{m.__name__}.{name}: {field.alias}')\n"
    )
    assert out == ""
