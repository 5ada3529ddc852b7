"""Reading a spec written against a newer CRD than this code knows.

The API server has already checked every object against the CRD it serves, so a field that
the models here do not know is not a typo: it comes from a newer version of the API (the CRD
was upgraded before the operator). ``known_fields`` drops such fields and says which they
were, so that the operator can carry on with what it understands and say what it ignored,
instead of failing a healthy run. Config files (``TrainerConfig``) stay strict.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Union

from pydantic import BaseModel


def _models_in(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model class inside an annotation and how it is held: ``one``, ``list`` or ``map``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            model, how = _models_in(arg)
            if model is not None:
                return model, how
        return None, "one"
    if origin is list:
        model, _ = _models_in(typing.get_args(annotation)[0])
        return model, "list"
    if origin is dict:
        model, _ = _models_in(typing.get_args(annotation)[1])
        return model, "map"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, "one"
    return None, "one"


def known_fields(model: type[BaseModel], raw: Any, path: str = "spec") -> tuple[Any, list[str]]:
    """``raw`` without the keys ``model`` does not know (at any depth), and their paths."""
    if not isinstance(raw, dict):
        return raw, []
    by_alias = {(field.alias or name): field for name, field in model.model_fields.items()} | {
        name: field for name, field in model.model_fields.items()
    }
    kept: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in raw.items():
        field = by_alias.get(key)
        if field is None:
            ignored.append(f"{path}.{key}")
            continue
        inner, how = _models_in(field.annotation)
        if inner is None:
            kept[key] = value
        elif how == "list" and isinstance(value, list):
            items = [known_fields(inner, v, f"{path}.{key}[{i}]") for i, v in enumerate(value)]
            kept[key] = [v for v, _ in items]
            ignored += [p for _, paths in items for p in paths]
        elif how == "map" and isinstance(value, dict):
            entries = {k: known_fields(inner, v, f"{path}.{key}.{k}") for k, v in value.items()}
            kept[key] = {k: v for k, (v, _) in entries.items()}
            ignored += [p for _, paths in entries.values() for p in paths]
        else:
            kept[key], more = known_fields(inner, value, f"{path}.{key}")
            ignored += more
    return kept, ignored
