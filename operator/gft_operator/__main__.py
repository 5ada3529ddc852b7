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

from gft_operator import children, handlers
from gft_operator.kube import Kube, load_config


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
    handlers.RUNTIME.kube = Kube(load_config(kubeconfig))
    handlers.RUNTIME.defaults = children.Defaults(
        image=args.trainer_image, run_as_user=args.run_as_user
    )
    handlers.RUNTIME.namespaces = list(args.namespace)
    handlers.RUNTIME.resync_seconds = args.resync_seconds
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig  # kopf's own login reads it
    liveness = f"http://{args.health_address}/healthz" if args.health_address else None
    logging.getLogger("gft_operator").info(
        "starting: namespaces=%s, health=%s, peering=%s",
        ",".join(args.namespace) or "all",
        liveness or "off",
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


if __name__ == "__main__":
    sys.exit(main())
