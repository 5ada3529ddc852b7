"""``python -m gft_operator.release``: take the operator's outcome finalizer off every Job and
pod it made (the chart's pre-delete hook: ``helm uninstall`` leaves nothing stuck).

The finalizer holds a finished Job and its pod until the operator has recorded the outcome;
without an operator nothing would ever take it off, and deleting a fine-tune would leave its
Job and pods terminating forever. Runs that are still going keep going (their outcome is no
longer recorded); a pod that such a Job starts after this (a retry) carries the finalizer from
the Job's template: remove it by hand, or delete your fine-tunes before uninstalling.
"""

from __future__ import annotations

import argparse
import sys

from gft_operator.children import MANAGED_BY, OUTCOME_FINALIZER
from gft_operator.kube import ApiError, Kube, load_config

SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"
PATHS = {"Job": "/apis/batch/v1", "Pod": "/api/v1"}
PLURALS = {"Job": "jobs", "Pod": "pods"}


def release(kube: Kube, namespaces: list[str]) -> int:
    """Release every labelled Job and pod in ``namespaces`` (all when empty); returns how many."""
    released = 0
    for kind in ("Job", "Pod"):
        scopes = [f"/namespaces/{ns}" for ns in namespaces] or [""]
        for scope in scopes:
            path = f"{PATHS[kind]}{scope}/{PLURALS[kind]}"
            items = kube.request("GET", path, query={"labelSelector": SELECTOR}).get("items") or []
            for obj in items:
                if kube.remove_finalizer({**obj, "kind": kind}, OUTCOME_FINALIZER) is not None:
                    meta = obj["metadata"]
                    print(f"released {kind} {meta['namespace']}/{meta['name']}")
                    released += 1
    return released


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gft-operator-release", description=__doc__.splitlines()[0])
    p.add_argument("-n", "--namespace", action="append", default=[], help="(repeat); all if none")
    p.add_argument("--kubeconfig", default=None)
    args = p.parse_args(argv)
    kube = Kube(load_config(args.kubeconfig))
    try:
        count = release(kube, args.namespace)
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"released {count} object(s) from the {OUTCOME_FINALIZER} finalizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
