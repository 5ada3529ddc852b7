"""Who is asking, per ``--auth`` mode, before anything else is done for them.

- ``token``: the user signs in with a Kubernetes bearer token, which the API server checks
  (a SelfSubjectReview made with it) and the dashboard keeps server-side; the browser holds an
  opaque session id in an HttpOnly, SameSite=Strict cookie scoped to the dashboard's path.
- ``proxy``: oauth2-proxy, the sidecar in front, signed the user in with the organisation's
  OpenID Connect provider and names them in ``X-Forwarded-User``/``X-Forwarded-Groups`` (it
  strips those headers from what it is sent). The dashboard listens on loopback in that mode,
  so only the sidecar reaches it; it impersonates that user and those groups, never a
  ``system:`` name.
- ``kubeconfig``: a laptop; the dashboard acts with the kubeconfig's credentials for whoever
  connects, so it listens on loopback only and answers only requests whose Host is its own
  address (a DNS-rebound name is refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gft_dashboard.apiserver import Identity

SESSION_COOKIE = "gft_session"
CSRF_COOKIE, CSRF_HEADER = "gft_csrf", "X-CSRF-Token"
PROXY_USER, PROXY_GROUPS = "X-Forwarded-User", "X-Forwarded-Groups"


@dataclass(frozen=True)
class Settings:
    auth: str  # token | proxy | kubeconfig
    prefix: str = ""  # the Ingress path prefix, without a trailing slash
    secure_cookies: bool = False
    # kubeconfig mode: the Host headers it answers (its own address, by each loopback name).
    allowed_hosts: frozenset[str] = frozenset()
    recheck_seconds: float = 60.0  # how often a live stream asks again whether the user may
    streams_per_user: int = 12
    # proxy mode: what the API server's OIDC authenticator prefixes names with, if anything
    # (its --oidc-username-prefix / --oidc-groups-prefix), so that RBAC bindings match.
    user_prefix: str = ""
    group_prefix: str = ""
    grafana_url: str = ""  # where the chart's Grafana dashboard is, to link each run to it
    try_idle_seconds: int = 600  # a Try-it pod ends after this long without a question
    try_deadline_seconds: int = 7200  # and after this long in any case

    @property
    def cookie_path(self) -> str:
        return f"{self.prefix}/"


class NotSignedIn(Exception):
    """401: nobody is named (the message says how to sign in)."""


class Refused(Exception):
    """403: someone is named whom the dashboard will not act as."""


def proxied_identity(headers: Mapping[str, str], settings: Settings) -> Identity:
    """The user and groups oauth2-proxy vouched for, as the API server knows them."""
    user = headers.get(PROXY_USER, "").strip()
    if not user:
        raise NotSignedIn(f"no {PROXY_USER} header: sign in through the proxy in front")
    groups = tuple(g.strip() for g in headers.get(PROXY_GROUPS, "").split(",") if g.strip())
    user, groups = settings.user_prefix + user, tuple(settings.group_prefix + g for g in groups)
    if user.startswith("system:"):
        raise Refused(f"the user {user!r} is a system: name, which the dashboard never acts as")
    system = [g for g in groups if g.startswith("system:")]
    if system:
        raise Refused(
            f"the identity provider puts {user} in {system[0]}: the dashboard never acts with a "
            "system: group; remove it from the provider's groups for this user"
        )
    return Identity(user=user, groups=groups)


def loopback_hosts(host: str, port: int) -> frozenset[str]:
    """The Host headers a dashboard bound to loopback ``host:port`` answers."""
    names = {host, "127.0.0.1", "localhost", "[::1]"}
    return frozenset(f"{name}:{port}" for name in names)


def host_allowed(host_header: str | None, settings: Settings) -> bool:
    return not settings.allowed_hosts or (host_header or "").lower() in settings.allowed_hosts
