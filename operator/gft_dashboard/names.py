"""Kubernetes names, checked before any of them becomes part of an API server URL.

A route's ``{namespace}`` and ``{name}`` arrive percent-decoded: ``kube-system%2Fpods`` or
``..`` would otherwise walk the URL the dashboard builds to somewhere else. Pure functions; a
bad name raises ``BadName``, whose message names the parameter and says what a name may be.
"""

from __future__ import annotations

import re

# RFC 1123 label: namespaces (and the Services and label values the dashboard looks up).
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# RFC 1123 subdomain: names of most objects (GemmaFineTunes, pods, Jobs).
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# What TensorBoard's --path_prefix may be (the CRD's own pattern for spec.tensorboard.pathPrefix).
_PATH_PREFIX = re.compile(r"/([-._~A-Za-z0-9]+/?)*")


class BadName(ValueError):
    """Not a Kubernetes name; the message says which parameter and why."""


def namespace(value: str, what: str = "namespace") -> str:
    if len(value) > 63 or not _LABEL.fullmatch(value):
        raise BadName(
            f"{what} {value[:80]!r} is not a Kubernetes namespace name: at most 63 lower-case "
            "letters, digits and '-', starting and ending with a letter or digit"
        )
    return value


def name(value: str, what: str = "name") -> str:
    if len(value) > 253 or not _SUBDOMAIN.fullmatch(value):
        raise BadName(
            f"{what} {value[:80]!r} is not a Kubernetes object name: at most 253 lower-case "
            "letters, digits, '-' and '.', each dot-separated part starting and ending with a "
            "letter or digit"
        )
    return value


def path_prefix(value: str, what: str = "spec.tensorboard.pathPrefix") -> str:
    if len(value) > 256 or not _PATH_PREFIX.fullmatch(value) or "/../" in f"{value}/":
        raise BadName(f"{what} {value[:80]!r} is not a URL path TensorBoard can serve under")
    return value


def tail(value: str) -> str:
    """The rest of a TensorBoard URL after the fine-tune's part: a relative path that stays
    below TensorBoard's prefix (no '..' or empty segments, no backslashes)."""
    segments = value.split("/")
    if any(s in ("..", ".") for s in segments) or "\\" in value or "//" in value:
        raise BadName(f"the TensorBoard path {value[:80]!r} leaves TensorBoard's own folder")
    return value
