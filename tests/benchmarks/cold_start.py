"""A cold start with slow lists: many fine-tunes, some of whose Jobs ended while the operator
was down, and an operator started behind a proxy that holds the Job, pod and event lists back
(as a loaded API server or a slow link does). Nothing may be misjudged meanwhile.

On KWOK nodes (every pod answering as a trainer at its pod IP) ``--finetunes`` fine-tunes run;
the operator is SIGKILLed, ``--ended`` of them end with a non-retryable exit (78: their Jobs
fail while no operator runs), then the operator is started again through
``devcluster.faultproxy`` with the Job list held ``--job-delay`` seconds and the pod and event
lists ``--pod-delay`` seconds.

Measured: seconds until ``/readyz`` answers 200 (the caches synced), until every fine-tune shows
its right phase (the live ones ``Running``, the ended ones ``Failed`` with the trainer's reason
``InvalidConfig``), conflict events (``JobConflict``/``ChildConflict``, must be 0), outcomes
decided without the trainer's pod (``Failed/PodFailurePolicy``, must be 0), Jobs created
(audit log: duplicates) and tracebacks.

    PYTHONPATH=tests .venv/bin/python -m benchmarks.cold_start [--finetunes 500] [--ended 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import yaml

from benchmarks.operator_restart import job_creates
from benchmarks.status_writes import add_kwok_nodes, manifests
from devcluster import cluster as pg
from devcluster.fake_trainers import kwok_pods_served
from devcluster.faultproxy import Fault, FaultProxy

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "operator"))
from operator_process import OperatorProcess, install, service_account_kubeconfig  # noqa: E402

NAMESPACE = "bench"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def ready(op: OperatorProcess) -> bool:
    try:
        with _DIRECT.open(f"http://127.0.0.1:{op.metrics_port}/readyz", timeout=5) as r:
            return r.status == 200
    except (urllib.error.HTTPError, OSError):
        return False


def phases(c: pg.Cluster) -> dict[str, tuple[str | None, str | None]]:
    out = {}
    for item in c.kubectl_json("get", "gft", "-n", NAMESPACE)["items"]:
        status = item.get("status") or {}
        out[item["metadata"]["name"]] = (status.get("phase"), status.get("reason"))
    return out


def job_failed(job: dict) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(x["type"] == "Failed" and x["status"] == "True" for x in conditions)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--finetunes", type=int, default=500)
    p.add_argument("--ended", type=int, default=100)
    p.add_argument("--job-delay", type=float, default=10.0)
    p.add_argument("--pod-delay", type=float, default=20.0)
    args = p.parse_args()
    n = args.finetunes
    ended = {f"ft-{i:03d}" for i in range(0, n, max(1, n // args.ended))}
    state = Path(tempfile.gettempdir()) / "gft-bench-cold"
    work = Path(tempfile.mkdtemp(prefix="gft-bench-"))
    c = pg.start(state, say=lambda m: print(f"[proving ground] {m}", flush=True), runner=False)
    op = proxy = None
    with kwok_pods_served(time.time()), contextlib.ExitStack() as stop:
        stop.callback(pg.stop, state, say=lambda m: None)
        stop.callback(lambda: op is not None and op.kill(signal.SIGTERM))
        stop.callback(lambda: proxy is not None and proxy.stop())
        install(c)
        add_kwok_nodes(c, n)
        c.kubectl("create", "namespace", NAMESPACE)
        claim = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "shared-output"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        c.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(claim))
        kubeconfig = service_account_kubeconfig(c, work / "operator.kubeconfig")
        op = OperatorProcess(c, kubeconfig, work / "first.log", "--metrics-access", "pod-ip")
        op.start()
        c.kubectl("create", "-n", NAMESPACE, "-f", "-", input=manifests(n), timeout=600)
        deadline = time.monotonic() + 900
        while sum(ph == "Running" for ph, _ in phases(c).values()) < n:
            if time.monotonic() > deadline:
                raise SystemExit("not every fine-tune Running after 15 min")
            time.sleep(3)
        op.kill(signal.SIGKILL)
        op = None
        for name in sorted(ended):
            c.kubectl(
                "annotate", "pods", "-n", NAMESPACE, "-l", f"finetune.gemma.dev/name={name}",
                "gft.dev/kwok-exit-code=78", "gft.dev/kwok-keep-running-", "--overwrite",
            )  # fmt: skip
        while True:
            jobs = c.kubectl_json("get", "jobs", "-n", NAMESPACE)["items"]
            if sum(job_failed(j) for j in jobs) >= len(ended):
                break
            time.sleep(2)
        print(f"{len(ended)} Jobs failed while the operator was down; starting it behind the proxy")
        proxy = FaultProxy(c).start()
        lists = r"^(?!.*watch=)"
        for path, seconds in (
            ("/jobs$", args.job_delay),
            ("/pods$", args.pod_delay),
            ("/events$", args.pod_delay),
        ):
            proxy.inject(Fault(delay=seconds, forward=True, method="GET", path=path, query=lists))
        token = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
        proxied = proxy.kubeconfig_for(token, work / "proxied.kubeconfig")
        op = OperatorProcess(c, proxied, work / "cold.log", "--metrics-access", "pod-ip")
        started = time.monotonic()
        op.start()
        while not ready(op):
            time.sleep(0.2)
        ready_s = time.monotonic() - started
        while True:
            seen = phases(c)
            want = {name: ("Running", "TrainerRunning") for name in seen}
            want.update({name: ("Failed", "InvalidConfig") for name in ended})
            right = sum(seen[name] == want[name] for name in seen)
            if right == n:
                break
            if time.monotonic() - started > 600:
                raise SystemExit(f"only {right}/{n} right after 10 min")
            time.sleep(1)
        all_right_s = time.monotonic() - started
        time.sleep(5)
        events = c.kubectl_json("get", "events", "-n", NAMESPACE)["items"]
        reasons = Counter(
            e["reason"] for e in events if e["involvedObject"]["kind"] == "GemmaFineTune"
        )
        seen = phases(c)
        creates = job_creates(c.state_dir / "logs" / "audit.log")
        log = op.log()
    result = {
        "finetunes": n,
        "ended_while_down": len(ended),
        "job_list_delay_s": args.job_delay,
        "pod_and_event_list_delay_s": args.pod_delay,
        "ready_after_s": round(ready_s, 1),
        "all_right_after_s": round(all_right_s, 1),
        "conflict_events": reasons.get("JobConflict", 0) + reasons.get("ChildConflict", 0),
        "decided_without_pod": sum(r == "PodFailurePolicy" for _, r in seen.values()),
        "jobs_created": sum(creates.values()),
        "duplicate_jobs": sum(v - 1 for v in creates.values() if v > 1),
        "tracebacks_in_log": log.count("Traceback"),
    }
    print("RESULT " + json.dumps(result))
    ok = not (
        result["conflict_events"] or result["decided_without_pod"] or result["duplicate_jobs"]
    )
    return 0 if ok and not result["tracebacks_in_log"] else 1


if __name__ == "__main__":
    sys.exit(main())
