"""Generate the GemmaFineTune CRD from the typed models in ``gft_api.v1alpha1``.

``python -m gft_api.crd > manifests/crd.yaml``; a test fails when the checked-in file differs.

pydantic writes JSON Schema (2020-12); a CRD needs a *structural* OpenAPI v3 schema. The
conversion here inlines every ``$ref``, turns ``X | None`` into an optional ``X`` (absent means
unset), turns ``int | str`` into ``x-kubernetes-int-or-string``, rewrites numeric
``exclusiveMinimum``/``exclusiveMaximum`` into OpenAPI 3.0's boolean form, fills object
defaults so that nested defaults apply, and refuses to emit a schema that has a property without
a description, a list without ``maxItems``, a map without ``maxProperties`` or a string without
``maxLength`` (the API server's CEL cost check needs them).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema

from gft_api import GROUP, KIND, PLURAL, SHORT_NAME, VERSION
from gft_api.v1alpha1 import MAX_NAME_LENGTH, NAME_PATTERN, GemmaFineTuneSpec, GemmaFineTuneStatus

Schema = dict[str, Any]

_DROP = {"title", "$defs", "examples", "propertyNames", "patternProperties"}
# (map keys: checked by pydantic, and by a CEL rule on the map where the API server needs it)
_PASSTHROUGH = {
    "type",
    "description",
    "format",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "default",
    "required",
    "x-kubernetes-validations",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


class _WithFactoryDefaults(GenerateJsonSchema):
    """Show ``default_factory`` defaults: ``{}`` for a nested model (its own fields' defaults
    then apply on the API server), the value itself for lists and maps."""

    def default_schema(self, schema):  # type: ignore[override]
        inner = self.generate_inner(schema["schema"])
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().default_schema(schema)
        value = factory()
        if isinstance(value, BaseModel):
            value = {}
        return {**inner, "default": copy.deepcopy(value)}


class SchemaError(ValueError):
    """The models would give a schema the API server refuses or cannot cost-check."""


def _resolve(node: Schema, defs: dict[str, Schema]) -> Schema:
    ref = node["$ref"]
    target = defs[ref.rsplit("/", 1)[-1]]
    siblings = {k: v for k, v in node.items() if k != "$ref"}
    return _merge(copy.deepcopy(target), siblings)


def _merge(base: Schema, overlay: Schema) -> Schema:
    """Put ``overlay`` over ``base``; CEL rules from both are kept."""
    out = dict(base)
    for key, value in overlay.items():
        if key == "x-kubernetes-validations":
            out[key] = list(base.get(key, [])) + list(value)
        else:
            out[key] = value
    return out


def _plain(text: str) -> str:
    """A docstring as one paragraph of plain text (``code`` becomes `code`)."""
    return " ".join(text.replace("``", "`").split())


def _is_null(node: Schema) -> bool:
    return node.get("type") == "null"


def structural(node: Schema, defs: dict[str, Schema], path: str) -> Schema:
    """Convert one pydantic JSON Schema node (and its children) to a structural schema node."""
    node = dict(node)
    if "$ref" in node:
        node = _resolve(node, defs)
    if "allOf" in node and len(node["allOf"]) == 1:
        node = _merge(_resolve(node.pop("allOf")[0], defs), node)
    while "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [b for b in node.pop("anyOf") if not _is_null(b)]
        if node.get("default", ...) is None:
            del node["default"]
        branches = [_resolve(b, defs) if "$ref" in b else b for b in branches]
        types = sorted(b.get("type", "") for b in branches)
        if len(branches) == 1:
            node = _merge(branches[0], node)
        elif types == ["integer", "string"]:
            string = next(b for b in branches if b["type"] == "string")
            node = {
                **{k: v for k, v in node.items() if k in _PASSTHROUGH},
                "anyOf": [{"type": "integer"}, {"type": "string"}],
                "x-kubernetes-int-or-string": True,
            }
            if "pattern" in string:
                node["pattern"] = string["pattern"]
            if "maxLength" in string:
                node["maxLength"] = string["maxLength"]
        else:
            raise SchemaError(f"{path}: cannot express a union of {types} structurally")
    if node.get("default", ...) is None:
        del node["default"]
    patterned = node.get("patternProperties")
    if patterned and "additionalProperties" not in node and len(patterned) == 1:
        # A map whose keys have a pattern: its values' schema, for any key.
        node["additionalProperties"] = next(iter(patterned.values()))

    out: Schema = {}
    for key, value in node.items():
        if key in _DROP or key == "additionalProperties" or key == "properties" or key == "items":
            continue
        if key == "anyOf" and node.get("x-kubernetes-int-or-string"):
            out[key] = value
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "const":
            out["enum"] = [value]
        elif key == "description":
            out[key] = _plain(value)
        elif key in _PASSTHROUGH:
            out[key] = value
        else:
            raise SchemaError(f"{path}: unexpected JSON Schema keyword {key!r}")
    if "enum" in out and "type" not in out:
        out["type"] = "string"

    kind = out.get("type")
    if kind == "object":
        if "properties" in node:
            out["properties"] = {
                name: structural(child, defs, f"{path}.{name}")
                for name, child in node["properties"].items()
            }
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = structural(extra, defs, f"{path}.*")
            if "maxProperties" not in out:
                raise SchemaError(f"{path}: a map needs a bound on its size (max_length)")
    elif kind == "array":
        out["items"] = structural(node["items"], defs, f"{path}[*]")
        if "maxItems" not in out:
            raise SchemaError(f"{path}: a list needs maxItems (max_length)")
    elif kind == "string" and "enum" not in out and "maxLength" not in out:
        raise SchemaError(f"{path}: a string needs maxLength (max_length)")
    elif kind is None and not out.get("x-kubernetes-int-or-string"):
        raise SchemaError(f"{path}: no type")
    if "required" in out and not out["required"]:
        del out["required"]
    return out


def _check_descriptions(node: Schema, path: str) -> None:
    for name, child in node.get("properties", {}).items():
        if not child.get("description"):
            raise SchemaError(f"{path}.{name}: no description (write a docstring under the field)")
        _check_descriptions(child, f"{path}.{name}")
    if "items" in node:
        _check_descriptions(node["items"], f"{path}[*]")
    if isinstance(node.get("additionalProperties"), dict):
        _check_descriptions(node["additionalProperties"], f"{path}.*")


def model_schema(model: type[BaseModel], path: str) -> Schema:
    """The structural schema of one model."""
    raw = model.model_json_schema(by_alias=True, schema_generator=_WithFactoryDefaults)
    schema = structural(raw, raw.get("$defs", {}), path)
    _check_descriptions(schema, path)
    return schema


def open_api_schema() -> Schema:
    """The whole ``openAPIV3Schema`` of a GemmaFineTune."""
    return {
        "type": "object",
        "description": (
            "A fine-tune of a Gemma model. The operator runs it as a Job (trainer plus "
            "TensorBoard sidecar) and reports phase, progress and metrics in its status."
        ),
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "maxLength": 253,
                "description": "APIVersion defines the versioned schema of this representation "
                "of an object.",
            },
            "kind": {
                "type": "string",
                "maxLength": 63,
                "description": "Kind is a string value representing the REST resource this "
                "object represents.",
            },
            "metadata": {"type": "object"},
            "spec": model_schema(GemmaFineTuneSpec, "spec"),
            "status": model_schema(GemmaFineTuneStatus, "status"),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
                "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters, so that "
                "every child's name and the Job's job-name label fit in 63",
            },
            {
                "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
                "message": "metadata.name must be a DNS-1035 label (lower case letters, digits "
                "and '-', starting with a letter), since the Service takes the same name",
            },
        ],
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method.type"},
    {
        "name": "Progress",
        "type": "number",
        "format": "float",
        "jsonPath": ".status.progress.percent",
        "description": "Percent of the planned steps done",
    },
    {"name": "Loss", "type": "number", "format": "float", "jsonPath": ".status.metrics.loss"},
    {
        "name": "GPU",
        "type": "number",
        "format": "float",
        "jsonPath": ".status.metrics.gpuUtilization",
        "description": "GPU utilisation, 0 to 1",
    },
    {
        "name": "ETA",
        "type": "integer",
        "jsonPath": ".status.progress.etaSeconds",
        "description": "Estimated seconds to the end",
    },
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
    {"name": "Attempts", "type": "integer", "jsonPath": ".status.attempts", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "gemma-finetune-operator"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "categories": ["gemma"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `python -m gft_api.crd` from gft_api/v1alpha1.py. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


def render_chart_template() -> str:
    """The CRD as the Helm chart's template: behind ``crds.enabled``, and kept on uninstall
    (``helm.sh/resource-policy: keep``) unless ``crds.keep`` is false, so that removing the
    operator never deletes the users' fine-tunes."""
    body = yaml.safe_dump(crd(), sort_keys=False, width=100)
    keep = (
        "  annotations:\n"
        "    {{- if .Values.crds.keep }}\n"
        "    helm.sh/resource-policy: keep\n"
        "    {{- end }}\n"
    )
    body = body.replace("metadata:\n", "metadata:\n" + keep, 1)
    header = (
        "{{- /* Generated by `python -m gft_api.crd --chart` from gft_api/v1alpha1.py. "
        "Do not edit. */ -}}\n"
    )
    return header + "{{- if .Values.crds.enabled }}\n" + body + "{{- end }}\n"


def main() -> None:
    sys.stdout.write(render_chart_template() if "--chart" in sys.argv[1:] else render())


if __name__ == "__main__":
    main()
