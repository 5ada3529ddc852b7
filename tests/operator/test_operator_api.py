"""The GemmaFineTune API: the pydantic models, and the CRD generated from them."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from gft_api import crd
from gft_api.contract import OutputSettings
from gft_api.v1alpha1 import (
    CHILD_SUFFIXES,
    MAX_NAME_LENGTH,
    GemmaFineTuneSpec,
    GemmaFineTuneStatus,
    OutputSpec,
    child_names,
)
from operator_samples import finetune
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_crd_matches_the_models():
    """One source: the chart's CRD template is generated from the models (and manifests/crd.yaml
    rendered from the chart: tests/chart checks that)."""
    template = REPO / "charts" / "gemma-finetune-operator" / "templates" / "crd.yaml"
    assert template.read_text() == crd.render_chart_template(), (
        f"{template.relative_to(REPO)} is stale: run `make manifests`"
    )
    rendered = yaml.safe_load((REPO / "manifests" / "crd.yaml").read_text())
    assert rendered["spec"] == crd.crd()["spec"], "manifests/crd.yaml is stale: `make manifests`"


def test_crd_module_runs_as_a_command():
    out = subprocess.run(
        [sys.executable, "-m", "gft_api.crd"], capture_output=True, text=True, check=True
    )
    assert yaml.safe_load(out.stdout)["kind"] == "CustomResourceDefinition"


def _walk(node, path="$"):
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[*]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}.*")


def _schema():
    return crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_schema_is_structural_and_bounded():
    for path, node in _walk(_schema()):
        assert "$ref" not in node, path
        assert "nullable" not in node, path
        assert "allOf" not in node and "oneOf" not in node, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), path
        else:
            assert "type" in node, path
        if node.get("type") == "array":
            assert "maxItems" in node, path
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, path
        if isinstance(node.get("additionalProperties"), dict):
            assert "maxProperties" in node, path


def test_every_field_has_a_description():
    for path, node in _walk(_schema()):
        if path.startswith("$.metadata") or path.endswith(("[*]", ".*")):
            continue  # list items and map values are described by their field
        assert node.get("description"), f"{path} has no description"


def test_descriptions_come_from_docstrings():
    lora = _schema()["properties"]["spec"]["properties"]["method"]["properties"]["lora"]
    assert lora["properties"]["r"]["description"] == "Rank of the adapter matrices."
    # nested defaults apply because objects default to {}
    assert lora["default"] == {}
    assert lora["properties"]["targetModules"]["default"] == ["all-linear"]


def test_exclusive_bounds_use_openapi_3_0_form():
    epochs = _schema()["properties"]["spec"]["properties"]["training"]["properties"]["epochs"]
    assert epochs["minimum"] == 0 and epochs["exclusiveMinimum"] is True


def test_printer_columns_read_fields_not_conditions():
    columns = crd.crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    names = [c["name"].upper() for c in columns if c.get("priority", 0) == 0]
    assert names == ["PHASE", "MODEL", "METHOD", "PROGRESS", "LOSS", "GPU", "ETA", "AGE"]
    assert all("conditions" not in c["jsonPath"] for c in columns)


def test_status_subresource_and_short_name():
    spec = crd.crd()["spec"]
    assert spec["versions"][0]["subresources"] == {"status": {}}
    assert spec["names"]["shortNames"] == ["gft"]


def test_cel_rules_are_present_where_needed():
    rules = [
        v["rule"] for _, node in _walk(_schema()) for v in node.get("x-kubernetes-validations", [])
    ]
    assert "has(self.epochs) != has(self.maxSteps)" in rules
    assert any("qlora" in r and "gpus" in r for r in rules)
    assert f"size(self.metadata.name) <= {MAX_NAME_LENGTH}" in rules
    assert sum(r == "self == oldSelf" for r in rules) >= 8


def test_name_bound_keeps_children_within_63():
    name = "a" * MAX_NAME_LENGTH
    assert all(len(n) <= 63 for n in child_names(name).values())
    assert MAX_NAME_LENGTH + max(map(len, CHILD_SUFFIXES)) == 63


def test_output_defaults_match_the_trainer_contract():
    for field in ("checkpoint_every_steps", "keep_checkpoints"):
        assert OutputSpec.model_fields[field].default == OutputSettings.model_fields[field].default


# --- the models refuse what the CRD refuses ---------------------------------------------------


def _spec(**overrides):
    return finetune(**overrides)["spec"]


def test_sample_spec_validates_with_defaults():
    spec = GemmaFineTuneSpec.model_validate(_spec())
    assert spec.termination_grace_period_seconds >= 120
    assert spec.output.claim.reclaim_policy == "Retain"
    assert spec.tensorboard.enabled


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"training": {"epochs": 1, "maxSteps": 10}}, "exactly one of epochs and maxSteps"),
        ({"training": {"learningRate": 1e-4}}, "exactly one of epochs and maxSteps"),
        (
            {"method": {"type": "qlora"}, "resources": {"gpus": 0}},
            "qlora needs a GPU",
        ),
        ({"method": {"type": "dora"}}, "method.type"),
        ({"dataset": {"format": "chat"}}, "exactly one dataset source"),
        (
            {"dataset": {"hub": {"id": "a/b"}, "path": "/data/x.jsonl"}},
            "exactly one dataset source",
        ),
        (
            {"output": {"existingClaim": "mine", "pvc": {"size": "1Gi"}}},
            "at most one of output.existingClaim",
        ),
        ({"terminationGracePeriodSeconds": 5}, "terminationGracePeriodSeconds"),
        ({"resources": {"gpus": 99}}, "resources.gpus"),
        ({"resources": {"memory": "lots"}}, "resources.memory"),
        ({"suspend": "maybe"}, "suspend"),
        ({"nonsense": 1}, "nonsense"),
        (
            {"training": {"maxSteps": 5, "metricForBest": "eval_exact_match"}},
            "needs samples.exactMatchExamples",
        ),
        ({"training": {"maxSteps": 5, "divergenceFactor": 0.5}}, "divergenceFactor must be above"),
    ],
)
def test_model_refuses_bad_specs(overrides, needle):
    with pytest.raises(ValidationError) as err:
        GemmaFineTuneSpec.model_validate(_spec(**overrides))
    text = str(err.value)
    assert re.search(re.escape(needle), text, re.IGNORECASE) or needle.split(".")[-1] in text, text


def test_status_round_trips_with_camel_case():
    status = GemmaFineTuneStatus.model_validate(
        {
            "phase": "Running",
            "tensorboardURL": "http://x",
            "progress": {"step": 1, "totalSteps": 10, "percent": 10.0},
        }
    )
    wire = status.to_wire()
    assert wire["tensorboardURL"] == "http://x"
    assert wire["progress"]["totalSteps"] == 10


def test_spec_round_trip_is_stable():
    spec = GemmaFineTuneSpec.model_validate(_spec())
    again = GemmaFineTuneSpec.model_validate(copy.deepcopy(spec.to_wire()))
    assert again == spec


def test_fields_of_a_newer_api_are_dropped_and_named():
    from gft_api.compat import known_fields

    raw = finetune("x")["spec"]
    raw["training"]["newKnob"] = 3
    raw["futureSection"] = {"mode": "fast"}
    raw["env"] = [{"name": "A", "value": "1", "valueFromVault": {"path": "p"}}]
    raw["resources"]["tolerations"] = [{"key": "k", "operator": "Exists", "newField": 1}]
    raw["tensorboard"] = {"ingress": {"host": "tb.example.com", "middleware": "x"}}
    kept, ignored = known_fields(GemmaFineTuneSpec, raw)
    assert sorted(ignored) == [
        "spec.env[0].valueFromVault",
        "spec.futureSection",
        "spec.resources.tolerations[0].newField",
        "spec.tensorboard.ingress.middleware",
        "spec.training.newKnob",
    ]
    spec = GemmaFineTuneSpec.model_validate(kept)  # what is left is a valid spec
    assert spec.training.max_steps == 20 and spec.env[0].value == "1"
    assert known_fields(GemmaFineTuneSpec, finetune("x")["spec"])[1] == []
