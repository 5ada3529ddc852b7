"""``gft-dashboard``: the web dashboard, in the cluster (the chart) or on a laptop."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from aiohttp import web

from gft_dashboard.apiserver import ApiServer
from gft_dashboard.server import Settings, make_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gft-dashboard", description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:8090", help="host:port to listen on")
    parser.add_argument(
        "--auth",
        choices=["token", "proxy", "kubeconfig"],
        default="token",
        help="token: each user signs in with a bearer token (the default); proxy: trust the "
        "X-Forwarded-User/-Groups headers of an authenticating proxy (oauth2-proxy) in front; "
        "kubeconfig: act as the kubeconfig's user (a laptop; loopback only)",
    )
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--path-prefix", default="", help="the Ingress path, e.g. /gft")
    parser.add_argument("--secure-cookies", action="store_true", help="served over HTTPS")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    host, _, port = args.address.rpartition(":")
    if args.auth == "kubeconfig" and not ipaddress.ip_address(host or "0.0.0.0").is_loopback:
        print(
            f"error: --auth kubeconfig acts with your own credentials for anyone who connects: "
            f"listen on loopback (--address 127.0.0.1:{port}), not {host or '*'}",
            file=sys.stderr,
        )
        return 2
    prefix = "/" + args.path_prefix.strip("/") if args.path_prefix.strip("/") else ""
    settings = Settings(auth=args.auth, prefix=prefix, secure_cookies=args.secure_cookies)
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


if __name__ == "__main__":
    sys.exit(main())
