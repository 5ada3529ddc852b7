"""What can go wrong for a client user, said the way kubectl says it, with what to do next.

The API server's own words are passed on verbatim (its message and, for a refused spec, each
field it names); the advice after them is ours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


class GftError(Exception):
    """An error a user can act on; its message says what happened and what to do next."""


class RunFailed(GftError):
    """The fine-tune ended Failed; ``finetune`` holds its last status."""

    def __init__(self, message: str, finetune: Any) -> None:
        super().__init__(message)
        self.finetune = finetune


@dataclass(frozen=True)
class Cause:
    field: str
    message: str


@dataclass
class ApiRefusal(GftError):
    """The API server refused a request: its status code, reason, message and field causes."""

    code: int
    reason: str
    message: str
    causes: list[Cause] = field(default_factory=list)
    advice: str = ""

    def __str__(self) -> str:
        lines = [self.message or f"{self.code} {self.reason}"]
        lines += [f"  {c.field}: {c.message}" if c.field else f"  {c.message}" for c in self.causes]
        if self.advice:
            lines.append(self.advice)
        return "\n".join(lines)


def refusal(error: Exception, what: str = "", namespace: str = "") -> ApiRefusal:
    """An ``ApiException`` as the user should read it: the server's message and field causes,
    verbatim, and what to do next. ``what`` names the object (``gemmafinetunes/pip``)."""
    code = int(getattr(error, "status", 0) or 0)
    body: dict[str, Any] = {}
    raw = getattr(error, "body", None)
    if raw:
        try:
            parsed = json.loads(raw)
            body = parsed if isinstance(parsed, dict) else {}
        except (TypeError, ValueError):
            body = {}
    reason = str(body.get("reason") or getattr(error, "reason", "") or "")
    message = str(body.get("message") or raw or getattr(error, "reason", "") or error)
    details = body.get("details") if isinstance(body.get("details"), dict) else {}
    causes = [
        Cause(str(c.get("field", "")), str(c.get("message", "")))
        for c in (details or {}).get("causes", [])
        if isinstance(c, dict)
    ]
    advice = _advice(code, reason, what, namespace, causes)
    # The message already lists each cause; show them apart only when it does not.
    shown = [c for c in causes if c.message not in message]
    return ApiRefusal(code, reason, message, shown, advice)


def _advice(code: int, reason: str, what: str, namespace: str, causes: list[Cause]) -> str:
    ns = f" -n {namespace}" if namespace else ""
    if code == 422 or reason == "Invalid":
        fields = sorted({c.field for c in causes if c.field.startswith("spec")})
        if not fields:
            return "Fix what the API server names and try again."
        return (
            "Fix the field(s) the API server names and try again; "
            f"`kubectl explain gft.{fields[0].split('[')[0]}` describes them."
        )
    if code == 409 and reason == "AlreadyExists":
        return (
            f"Pick another name, or remove the old one first (`kubectl gft stop {what}{ns}`; its "
            "output claim stays)."
        )
    if code == 409:
        return "Someone changed it at the same time: read it again and retry."
    if code == 404:
        return f"List what there is with `kubectl get gft{ns}` (or pass -n NAMESPACE)."
    if code == 403:
        return (
            "Ask your cluster administrator for access (`kubectl auth can-i --list"
            f"{ns}` shows what you may do)."
        )
    if code == 401:
        return "Your credentials were not accepted: check your kubeconfig (`kubectl auth whoami`)."
    if code in (429, 500, 502, 503, 504) or code == 0:
        return "The API server could not answer now: try again in a moment."
    return ""
