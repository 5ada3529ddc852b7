"""``gft-operator``: run the GemmaFineTune operator, in a cluster or from a laptop.

In a pod it uses its service account; elsewhere ``--kubeconfig`` or ``$KUBECONFIG``. It watches
all namespaces unless ``--namespace`` names some. ``/healthz`` on ``--health-address`` answers
once the operator is up (use it for both liveness and readiness).

Peering: by default the operator runs standalone, which is right for one replica (the
Deployment in manifests/ uses one, with the Recreate strategy). Two operators on the same
objects would both act; kopf's peering (``--peering NAME``, needs kopf's peering CRDs) makes
the one with the lower ``--priority`` pause, and equal priorities freeze both with a warning,
so give replicas distinct priorities.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import kopf

from gft_operator import children, handlers, monitoring
from gft_operator.kube import Kube, load_config
from gft_operator.scraper import Access, Scraper


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gft-operator", description=__doc__.splitlines()[0])
    p.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig file (default: in-cluster service account, else $KUBECONFIG)",
    )
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeat for several); all namespaces when absent",
    )
    p.add_argument(
        "--health-address",
        default=os.environ.get("GFT_HEALTH_ADDRESS", "0.0.0.0:8080"),
        help="host:port of the liveness/readiness endpoint (/healthz); empty turns it off",
    )
    p.add_argument(
        "--trainer-image",
        default=os.environ.get("GFT_TRAINER_IMAGE", children.Defaults.image),
        help="trainer image for GemmaFineTunes that do not name one",
    )
    p.add_argument(
        "--run-as-user",
        type=int,
        default=children.Defaults.run_as_user,
        help="numeric user of the training pods",
    )
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=10.0,
        help="how often unfinished GemmaFineTunes are reconciled without an event",
    )
    p.add_argument(
        "--metrics-address",
        default=os.environ.get("GFT_METRICS_ADDRESS", "0.0.0.0:8081"),
        help="host:port of the operator's own Prometheus endpoint (/metrics); empty turns it off",
    )
    p.add_argument(
        "--metrics-interval",
        type=float,
        default=10.0,
        help="seconds between reads of each trainer's /metrics; also the shortest time between "
        "two live-status writes of one GemmaFineTune (0 turns live status off)",
    )
    p.add_argument(
        "--metrics-timeout",
        type=float,
        default=5.0,
        help="seconds one read of a trainer's /metrics may take",
    )
    p.add_argument(
        "--metrics-access",
        choices=["auto", *(a.value for a in Access)],
        default="auto",
        help="how trainers' /metrics are reached: pod-ip (in the cluster), proxy (through the "
        "API server's pod proxy, from outside it); auto: pod-ip in a pod, proxy elsewhere",
    )
    p.add_argument(
        "--metrics-startup-grace",
        type=float,
        default=600.0,
        help="seconds a new trainer may take to open its /metrics before that is reported",
    )
    p.add_argument(
        "--peering",
        default=None,
        help="kopf peering name (several replicas); standalone when absent",
    )
    p.add_argument("--priority", type=int, default=0, help="kopf peering priority")
    p.add_argument("-v", "--verbose", action="store_true", help="log kopf's own decisions too")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stdout,
    )
    if not args.verbose:
        logging.getLogger("kopf").setLevel(logging.WARNING)
    kubeconfig = args.kubeconfig  # None: in cluster (service account), else ~/.kube/config
    kube = Kube(load_config(kubeconfig))
    handlers.RUNTIME.kube = kube
    handlers.RUNTIME.defaults = children.Defaults(
        image=args.trainer_image, run_as_user=args.run_as_user
    )
    handlers.RUNTIME.namespaces = list(args.namespace)
    handlers.RUNTIME.resync_seconds = args.resync_seconds
    access = _access(args.metrics_access, kubeconfig)
    if args.metrics_interval > 0:
        handlers.RUNTIME.metrics_startup_grace = args.metrics_startup_grace
        handlers.RUNTIME.scraper = Scraper(
            kube,
            access,
            interval=args.metrics_interval,
            timeout=min(args.metrics_timeout, args.metrics_interval),
            sink=handlers.write_live_status,
        )
    if args.metrics_address:
        monitoring.serve(args.metrics_address)
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig  # kopf's own login reads it
    liveness = f"http://{args.health_address}/healthz" if args.health_address else None
    logging.getLogger("gft_operator").info(
        "starting: namespaces=%s, health=%s, metrics=%s, trainer metrics every %gs via %s, "
        "peering=%s",
        ",".join(args.namespace) or "all",
        liveness or "off",
        f"http://{args.metrics_address}/metrics" if args.metrics_address else "off",
        args.metrics_interval,
        access.value if args.metrics_interval > 0 else "off",
        args.peering or "standalone",
    )
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=liveness,
    )
    return 0


def _access(choice: str, kubeconfig: str | None) -> Access:
    """In a pod the trainers' pod IPs are reachable; from elsewhere only the API server is."""
    if choice != "auto":
        return Access(choice)
    in_cluster = not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST")
    return Access.POD_IP if in_cluster else Access.PROXY


if __name__ == "__main__":
    sys.exit(main())
