"""``gft-dashboard``: the web dashboard, in the cluster (the chart) or on a laptop."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from aiohttp import web

from gft_dashboard.apiserver import ApiServer
from gft_dashboard.auth import Settings, loopback_hosts
from gft_dashboard.server import make_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gft-dashboard", description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:8090", help="host:port to listen on")
    parser.add_argument(
        "--auth",
        choices=["token", "proxy", "kubeconfig"],
        default="token",
        help="token: each user signs in with a bearer token (the default); proxy: the "
        "X-Forwarded-User/-Groups of oauth2-proxy, the sidecar in front (loopback only); "
        "kubeconfig: act as the kubeconfig's user (a laptop; loopback only)",
    )
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--path-prefix", default="", help="the Ingress path, e.g. /gft")
    parser.add_argument("--secure-cookies", action="store_true", help="served over HTTPS")
    parser.add_argument(
        "--recheck-seconds", type=float, default=60.0,
        help="how often a live stream (the list, a followed log) asks again whether its user "
        "may still see it",
    )  # fmt: skip
    parser.add_argument(
        "--streams-per-user", type=int, default=12,
        help="live streams one user may hold open at once (the rest get 429)",
    )  # fmt: skip
    parser.add_argument(
        "--user-prefix", default="",
        help="proxy mode: prepended to the proxy's user name (the API server's "
        "--oidc-username-prefix), so that RBAC bindings match",
    )  # fmt: skip
    parser.add_argument(
        "--group-prefix", default="",
        help="proxy mode: prepended to each group (the API server's --oidc-groups-prefix)",
    )  # fmt: skip
    parser.add_argument(
        "--allowed-groups", default="",
        help="proxy mode: the groups (comma-separated, prefix included) the dashboard may "
        "impersonate (its RBAC resourceNames); a user's other groups are not sent. Empty: any "
        "group but system: ones",
    )  # fmt: skip
    parser.add_argument(
        "--grafana-url", default="",
        help="Grafana's address (with the chart's dashboard): each run page links to it",
    )  # fmt: skip
    parser.add_argument(
        "--try-idle-seconds", type=int, default=600,
        help="a Try-it pod ends after this long without a question (its GPU is freed)",
    )  # fmt: skip
    parser.add_argument(
        "--try-deadline-seconds", type=int, default=7200,
        help="a Try-it pod ends after this long in any case (its activeDeadlineSeconds)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    host, _, port = args.address.rpartition(":")
    loopback = _is_loopback(host)
    if args.auth in ("kubeconfig", "proxy") and not loopback:
        why = {
            "kubeconfig": "acts with your own credentials for anyone who connects",
            "proxy": "believes the identity headers of whoever connects: only the "
            "authenticating proxy beside it (the pod's sidecar) may reach it",
        }[args.auth]
        print(
            f"error: --auth {args.auth} {why}: listen on loopback "
            f"(--address 127.0.0.1:{port}), not {host or '*'}",
            file=sys.stderr,
        )
        return 2
    prefix = "/" + args.path_prefix.strip("/") if args.path_prefix.strip("/") else ""
    settings = Settings(
        auth=args.auth,
        prefix=prefix,
        secure_cookies=args.secure_cookies,
        # A laptop's dashboard answers only to its own address: a DNS-rebound name is refused.
        allowed_hosts=loopback_hosts(host, int(port)) if args.auth == "kubeconfig" else frozenset(),
        recheck_seconds=args.recheck_seconds,
        streams_per_user=args.streams_per_user,
        user_prefix=args.user_prefix,
        group_prefix=args.group_prefix,
        allowed_groups=frozenset(g.strip() for g in args.allowed_groups.split(",") if g.strip()),
        grafana_url=args.grafana_url,
        try_idle_seconds=args.try_idle_seconds,
        try_deadline_seconds=args.try_deadline_seconds,
    )
    app = make_app(ApiServer.from_config(args.kubeconfig), settings)
    print(
        f"gft-dashboard on http://{host or '0.0.0.0'}:{port}{prefix}/ (auth: {args.auth})",
        flush=True,
    )
    web.run_app(
        app, host=host or "0.0.0.0", port=int(port), print=None, access_log=None,
        shutdown_timeout=5,  # open log streams end then; SSE streams end at once
    )  # fmt: skip
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]") or "0.0.0.0").is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
