"""A GemmaFineTune from the YAML a user typed (the editor, or the form that writes YAML).

Read only after the caller is known, and read with bounds: at most ``MAX_BYTES``, at most
``MAX_DEPTH`` collections deep, no aliases (a few hundred bytes of nested aliases expand into
gigabytes), and numbers read the way Kubernetes reads them: ``2e-4`` and ``5e-7`` are numbers
(YAML 1.2), not the strings YAML 1.1 (PyYAML's default) makes of them.

It is read with LibYAML where PyYAML has it (pure Python takes seconds for 64 KiB of the worst
kind on a busy machine), and in any case off the event loop: ``Reader`` reads in a thread, one
manifest at a time per user and ``AT_ONCE`` in all, so that one user's dry runs do not hold up
everyone else's pages.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import yaml

from gft_dashboard.limits import InFlight

MAX_BYTES = 64 * 1024  # a GemmaFineTune is a few kB; the API server's own limit is 3 MiB
MAX_DEPTH = 32  # a GemmaFineTune nests about 6 deep
AT_ONCE = 2  # manifests read at once, all users together (threads beside the event loop)

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


# LibYAML (C) where PyYAML was built with it: the same YAML, tens of times faster.
_BASE = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BASE):  # type: ignore[misc, valid-type]
    """SafeLoader with YAML 1.2 floats (aliases and depth are checked before it composes)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _FLOAT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_FLOAT, _FLOAT_12, list("-+0123456789."))


def _check_events(text: str) -> None:
    """No alias, nothing nested deeper than MAX_DEPTH: looked at in the parser's events, before
    anything is built (a composer recurses once per level)."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            mark = event.start_mark
            raise BadManifest(
                f"aliases (*name) are not accepted, at line {mark.line + 1}, column "
                f"{mark.column + 1}: write the value out"
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                raise BadManifest(
                    f"the YAML nests more than {MAX_DEPTH} deep, at line {mark.line + 1}, "
                    f"column {mark.column + 1}: a GemmaFineTune is not that deep"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def load(text: str) -> Any:
    """One YAML document; ``BadManifest`` names the line of what is wrong."""
    if len(text.encode()) > MAX_BYTES:
        raise BadManifest(f"the YAML is larger than {MAX_BYTES // 1024} KiB")
    try:
        _check_events(text)
        return yaml.load(text, Loader=_Loader)  # a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if "nesting depth" in str(e):  # LibYAML's own limit, met while reading ahead
            raise BadManifest(f"the YAML nests more than {MAX_DEPTH} deep{where}") from None
        raise BadManifest(f"the YAML does not parse{where}: {e}") from e
    except RecursionError:  # never past the depth check; a bad manifest all the same
        raise BadManifest(f"the YAML nests more than {MAX_DEPTH} deep") from None


class Reader:
    """``load`` off the event loop: one manifest at a time per user (a few more wait, the
    rest get TooManyStreams), ``AT_ONCE`` in all."""

    def __init__(self, waiting: int = 4, total: int = 64) -> None:
        self._turns = InFlight(per_user=1, waiting=waiting, total=total, what="manifests read")
        self._threads = asyncio.Semaphore(AT_ONCE)

    async def load(self, text: str, owner: str) -> Any:
        if len(text.encode()) > MAX_BYTES:  # refused at once, without a turn or a thread
            return load(text)
        async with self._turns.turn(owner), self._threads:
            return await asyncio.to_thread(load, text)
