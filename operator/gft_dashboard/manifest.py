"""A GemmaFineTune from the YAML a user typed (the editor, or the form that writes YAML).

Read only after the caller is known, and read with bounds: at most ``MAX_BYTES``, no aliases
(a few hundred bytes of nested aliases expand into gigabytes), and numbers read the way
Kubernetes reads them: ``2e-4`` and ``5e-7`` are numbers (YAML 1.2), not the strings YAML 1.1
(PyYAML's default) makes of them.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_BYTES = 256 * 1024  # a GemmaFineTune is a few kB; the API server's own limit is 3 MiB

_FLOAT = "tag:yaml.org,2002:float"
# YAML 1.2's core schema: a dot is not needed (2e-4, 1E5); PyYAML (1.1) insists on one.
_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class BadManifest(ValueError):
    """The YAML cannot be a manifest; the message names the line."""


class _Loader(yaml.SafeLoader):
    """SafeLoader without aliases, with YAML 1.2 floats."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise BadManifest(
                f"aliases (*name) are not accepted, at line {mark.line + 1}, column "
                f"{mark.column + 1}: write the value out"
            )
        return super().compose_node(parent, index)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _FLOAT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_FLOAT, _FLOAT_12, list("-+0123456789."))


def load(text: str) -> Any:
    """One YAML document; ``BadManifest`` names the line of what is wrong."""
    if len(text.encode()) > MAX_BYTES:
        raise BadManifest(f"the YAML is larger than {MAX_BYTES // 1024} KiB")
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BadManifest(f"the YAML does not parse{where}: {e}") from e
