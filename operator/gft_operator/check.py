"""``python -m gft_operator.check``: is the installed operator working? (The chart's
``helm test``.)

It checks, with the pod's service account, that the GemmaFineTune CRD is Established and that
the operator's pods answer their readiness probe, with exactly one of them leading (when leader
election is on). Exit 0 when all holds; otherwise 1, with what is wrong.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request

from gft_api import GROUP, PLURAL

from gft_operator.kube import ApiError, Kube, load_config

SELECTOR = "app.kubernetes.io/name=gemma-finetune-operator,app.kubernetes.io/component=operator"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def readiness(pod_ip: str, port: int) -> tuple[bool, str]:
    try:
        with _DIRECT.open(f"http://{pod_ip}:{port}/readyz", timeout=5) as r:
            return r.status == 200, r.read().decode().strip()
    except OSError as e:
        return False, str(e)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gft-operator-check", description=__doc__.splitlines()[0])
    p.add_argument("--namespace", required=True, help="the operator's namespace")
    p.add_argument("--port", type=int, default=8081, help="the operator's metrics port")
    p.add_argument("--kubeconfig", default=None)
    args = p.parse_args(argv)
    kube = Kube(load_config(args.kubeconfig))
    problems: list[str] = []
    try:
        crd = kube.request(
            "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{PLURAL}.{GROUP}"
        )
        established = any(
            c.get("type") == "Established" and c.get("status") == "True"
            for c in crd.get("status", {}).get("conditions") or []
        )
        print(f"CRD {PLURAL}.{GROUP}: {'Established' if established else 'not Established'}")
        if not established:
            problems.append("the CRD is not Established")
        pods = kube.list("Pod", args.namespace, labelSelector=SELECTOR)
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    running = [x for x in pods if x.get("status", {}).get("phase") == "Running"]
    leaders = 0
    for pod in running:
        ok, text = readiness(pod["status"].get("podIP", ""), args.port)
        leaders += text.endswith("leader")
        print(f"pod {pod['metadata']['name']}: {'ready' if ok else 'NOT READY'} ({text})")
        if not ok:
            problems.append(f"pod {pod['metadata']['name']} is not ready: {text}")
    if not running:
        problems.append(f"no operator pod runs in {args.namespace}")
    if (
        running
        and any(
            readiness(x["status"].get("podIP", ""), args.port)[1].startswith("ready:")
            for x in running
        )
        and leaders != 1
    ):
        problems.append(f"{leaders} replicas lead; exactly one should")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
