"""``gft-operator``: run the GemmaFineTune operator, in a cluster or from a laptop.

In a pod it uses its service account; elsewhere ``--kubeconfig`` or ``$KUBECONFIG``. It watches
all namespaces unless ``--namespace`` names some. ``/healthz`` on ``--health-address`` is the
liveness probe (the event loop answers); ``/readyz`` on ``--metrics-address`` the readiness
probe (503 until every watch has delivered its initial list; then it says whether this
replica leads).

Several replicas: with ``--leader-elect`` (the chart's default) they elect a leader through a
coordination.k8s.io Lease; only the leader reconciles, reads the trainers' metrics and writes,
and a standby takes over when the leader's Lease lapses (at most ``--lease-duration`` seconds
after it died, at once when it shut down cleanly). Without it, run exactly one replica.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys

import kopf
from gft_api.v1alpha1 import LABEL_VALUE_PATTERN, QUALIFIED_NAME_PATTERN

from gft_operator import children, handlers, monitoring
from gft_operator.kube import Kube, load_config
from gft_operator.leader import LeaderElector
from gft_operator.live import LIVE
from gft_operator.policy import Policy
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
        "--tensorboard-node-selector",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="node label that TensorBoard after a run must match (repeatable; default: any "
        "node where the run's output volume can be mounted)",
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
        "--kueue",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("GFT_KUEUE", "") in ("1", "true"),
        help="watch Kueue's Workloads (needs list/watch/patch on workloads.kueue.x-k8s.io): "
        "the status says why a queued fine-tune waits or was preempted, and spec.suspend "
        "deactivates its Workload",
    )
    p.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="elect a leader among replicas through a Lease; only the leader acts",
    )
    p.add_argument(
        "--leader-election-namespace",
        default=os.environ.get("POD_NAMESPACE") or _own_namespace() or "gft-system",
        help="namespace of the Lease (default: the operator's own)",
    )
    p.add_argument("--leader-election-id", default="gft-operator", help="name of the Lease")
    p.add_argument(
        "--lease-duration",
        type=float,
        default=15.0,
        help="seconds a Lease not renewed stays the holder's (how long a dead leader's "
        "standby waits)",
    )
    admin = p.add_argument_group(
        "policy", "what a fine-tune's author may ask for (empty lists allow anything)"
    )
    admin.add_argument(
        "--allowed-image-prefix",
        action="append",
        default=[],
        metavar="PREFIX",
        help="trainer and TensorBoard images must start with one of these",
    )
    admin.add_argument(
        "--allowed-ingress-host-suffix",
        action="append",
        default=[],
        metavar="SUFFIX",
        help="TensorBoard Ingress hosts must end with one",
    )
    admin.add_argument(
        "--allowed-ingress-class",
        action="append",
        default=[],
        metavar="CLASS",
        help="ingress classes a fine-tune may name",
    )
    admin.add_argument(
        "--allowed-pod-annotation-prefix",
        action="append",
        default=[],
        metavar="PREFIX",
        help="spec.podAnnotations keys must start with one",
    )
    admin.add_argument(
        "--allowed-ingress-annotation",
        action="append",
        default=[],
        metavar="KEY",
        help="spec.tensorboard.ingress.annotations keys a fine-tune may set (KEY, or PREFIX*)",
    )
    admin.add_argument(
        "--require-ingress-tls",
        action="store_true",
        help="refuse TensorBoard Ingresses without tlsSecretName",
    )
    admin.add_argument(
        "--ingress-annotation",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="put this annotation on every TensorBoard Ingress (authentication)",
    )
    admin.add_argument(
        "--network-policy",
        action="store_true",
        help="give every fine-tune a NetworkPolicy: only the operator (and the "
        "namespaces below) reach its metrics port and TensorBoard",
    )
    admin.add_argument(
        "--network-policy-allow-namespace",
        action="append",
        default=[],
        metavar="NAMESPACE",
        help="a namespace whose pods may reach them too (the ingress controller's, Prometheus's)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log kopf's own decisions too")
    return p.parse_args(argv)


def policy_of(args: argparse.Namespace, operator_namespace: str) -> Policy:
    annotations = {}
    for item in args.ingress_annotation:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--ingress-annotation {item!r}: expected KEY=VALUE")
        annotations[key] = value
    return Policy(
        allowed_image_prefixes=tuple(args.allowed_image_prefix),
        allowed_ingress_host_suffixes=tuple(args.allowed_ingress_host_suffix),
        allowed_ingress_classes=tuple(args.allowed_ingress_class),
        allowed_pod_annotation_prefixes=tuple(args.allowed_pod_annotation_prefix),
        allowed_ingress_annotation_keys=tuple(args.allowed_ingress_annotation),
        require_ingress_tls=args.require_ingress_tls,
        ingress_annotations=annotations,
        network_policy=args.network_policy,
        network_policy_namespaces=tuple(args.network_policy_allow_namespace),
        operator_namespace=operator_namespace,
    )


def _labels(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE flags as a node selector; one that is not a label stops the operator, named
    (else every finished run's TensorBoard would be refused by the API server)."""
    selector = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if (
            not sep
            or len(key) > 317
            or not re.fullmatch(QUALIFIED_NAME_PATTERN, key)
            or len(value) > 63
            or not re.fullmatch(LABEL_VALUE_PATTERN, value)
        ):
            raise SystemExit(
                f"--tensorboard-node-selector {pair!r}: expected KEY=VALUE, a node label "
                "(for example cloud.google.com/gke-nodepool=cpu-pool)"
            )
        selector[key] = value
    return selector


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stdout,
    )
    if not args.verbose:
        logging.getLogger("kopf").setLevel(logging.WARNING)
    tensorboard_nodes = _labels(args.tensorboard_node_selector)  # a bad flag stops it first
    kubeconfig = args.kubeconfig  # None: in cluster (service account), else ~/.kube/config
    kube = Kube(load_config(kubeconfig))
    handlers.RUNTIME.kube = kube
    handlers.RUNTIME.defaults = children.Defaults(
        image=args.trainer_image,
        run_as_user=args.run_as_user,
        policy=policy_of(args, args.leader_election_namespace),
        tensorboard_node_selector=tensorboard_nodes,
    )
    handlers.RUNTIME.resync_seconds = args.resync_seconds
    access = _access(args.metrics_access, kubeconfig)
    if args.metrics_interval > 0:
        LIVE.startup_grace = args.metrics_startup_grace
        LIVE.scraper = Scraper(
            kube,
            access,
            interval=args.metrics_interval,
            timeout=min(args.metrics_timeout, args.metrics_interval),
            sink=LIVE.write,
        )
    if args.leader_elect:
        identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
        elector = LeaderElector(
            kube,
            args.leader_election_namespace,
            args.leader_election_id,
            identity,
            duration=args.lease_duration,
            renew_deadline=args.lease_duration * 2 / 3,
            retry=max(0.5, args.lease_duration / 7.5),
            on_started_leading=handlers.started_leading,
            on_stopped_leading=handlers.stopped_leading,
            before_release=kube.drain,
        )
        handlers.RUNTIME.leader = elector
        kube.may_write = elector.is_leader
    if args.kueue:
        handlers.watch_workloads()
    if args.metrics_address:
        monitoring.serve(args.metrics_address, ready=handlers.readiness)
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig  # kopf's own login reads it
    liveness = f"http://{args.health_address}/healthz" if args.health_address else None
    logging.getLogger("gft_operator").info(
        "starting: namespaces=%s, health=%s, metrics=%s, trainer metrics every %gs via %s, "
        "leader election=%s, Kueue Workloads=%s",
        ",".join(args.namespace) or "all",
        liveness or "off",
        f"http://{args.metrics_address}/metrics" if args.metrics_address else "off",
        args.metrics_interval,
        access.value if args.metrics_interval > 0 else "off",
        f"Lease {args.leader_election_namespace}/{args.leader_election_id}"
        if args.leader_elect
        else "off (one replica)",
        "watched" if args.kueue else "not watched",
    )
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=True,  # no kopf peering: the Lease decides who acts
        liveness_endpoint=liveness,
    )
    return 0


def _own_namespace() -> str | None:
    """The namespace of this pod's service account, when it runs in one."""
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _access(choice: str, kubeconfig: str | None) -> Access:
    """In a pod the trainers' pod IPs are reachable; from elsewhere only the API server is."""
    if choice != "auto":
        return Access(choice)
    in_cluster = not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST")
    return Access.POD_IP if in_cluster else Access.PROXY


if __name__ == "__main__":
    sys.exit(main())
