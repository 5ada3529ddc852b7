"""Who is asking, per ``--auth`` mode, before anything else is done for them.

- ``token``: the user signs in with a Kubernetes bearer token, which the API server checks
  (a SelfSubjectReview made with it) and the dashboard keeps server-side; the browser holds an
  opaque session id in an HttpOnly, SameSite=Strict cookie scoped to the dashboard's path.
- ``proxy``: oauth2-proxy, the sidecar in front, signed the user in with the organisation's
  OpenID Connect provider and names them in ``X-Forwarded-User``/``X-Forwarded-Groups`` (it
  strips those headers from what it is sent). The dashboard listens on loopback in that mode,
  so only the sidecar reaches it; it impersonates that user and those of their groups that
  ``--allowed-groups`` names (the API server refuses a whole request if one impersonated group
  is not allowed to the dashboard, so the others are dropped, not sent), never a ``system:``
  name.
- ``kubeconfig``: a laptop; the dashboard acts with the kubeconfig's credentials for whoever
  connects, so it listens on loopback only and answers only requests whose Host is its own
  address (a DNS-rebound name is refused).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie

from gft_dashboard.apiserver import Identity

SESSION_COOKIE = "gft_session"
CSRF_COOKIE, CSRF_HEADER = "gft_csrf", "X-CSRF-Token"
PROXY_USER, PROXY_GROUPS = "X-Forwarded-User", "X-Forwarded-Groups"
PROXY_COOKIE = "_oauth2_proxy"  # oauth2-proxy's session cookie (split into _0, _1... if large)


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
    # proxy mode: the groups (as impersonated, prefix included) the dashboard may act with;
    # empty: any group but system: ones.
    allowed_groups: frozenset[str] = frozenset()
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
    if settings.allowed_groups:
        groups = tuple(g for g in groups if g in settings.allowed_groups)
    return Identity(user=user, groups=groups)


def duplicated_cookie(header: str | None) -> str | None:
    """The name of a cookie of ours that the request carries more than once, if any.

    A site on a sibling domain can set a cookie for the whole parent domain with a longer path
    than ours; the browser then sends both, and a server that takes either lets that site choose
    the session (or the CSRF token) the user works in. Such a request is refused instead."""
    seen: set[str] = set()
    for part in (header or "").split(";"):
        name = part.split("=", 1)[0].strip()
        if name in (SESSION_COOKIE, CSRF_COOKIE):
            if name in seen:
                return name
            seen.add(name)
    return None


def proxy_session(header: str | None, cookie: str = PROXY_COOKIE) -> str | None:
    """A digest of oauth2-proxy's session cookie (all its parts): it names one browser's
    sign-in, so that what is issued for it (TensorBoard tickets) ends with it. None without."""
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header or "")
    except CookieError:
        return None
    parts = sorted(
        (name, morsel.value)
        for name, morsel in jar.items()
        if name == cookie or name.startswith(f"{cookie}_")
    )
    if not parts:
        return None
    return "p:" + hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def loopback_hosts(host: str, port: int) -> frozenset[str]:
    """The Host headers a dashboard bound to loopback ``host:port`` answers."""
    names = {host, "127.0.0.1", "localhost", "[::1]"}
    return frozenset(f"{name}:{port}" for name in names)


def host_allowed(host_header: str | None, settings: Settings) -> bool:
    return not settings.allowed_hosts or (host_header or "").lower() in settings.allowed_hosts
