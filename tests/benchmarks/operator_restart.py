"""Many fine-tunes across namespaces, the operator SIGKILLed halfway and started again: every
fine-tune ends up reconciled (Running on a KWOK node, kept running), no Job is created twice,
and the operator logs no traceback.

    PYTHONPATH=tests .venv/bin/python -m benchmarks.operator_restart [--finetunes 1000] \\
        [--namespaces 10]

Prints one ``RESULT`` line: how long until every Job existed and every fine-tune was Running,
Jobs created (201s in the API server's audit log; more than one per fine-tune would be a
duplicate), and the tracebacks in the operator's log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

from benchmarks.status_writes import add_kwok_nodes, manifests
from devcluster import cluster as pg
from devcluster.fake_trainers import kwok_pods_served

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "operator"))
from operator_process import OperatorProcess, install, service_account_kubeconfig  # noqa: E402


def job_creates(audit: Path) -> Counter[str]:
    """Jobs created (HTTP 201), counted per namespace/name."""
    created: Counter[str] = Counter()
    for line in audit.read_text().splitlines():
        e = json.loads(line)
        ref = e.get("objectRef") or {}
        if (
            e.get("verb") == "create"
            and e.get("stage") == "ResponseComplete"
            and ref.get("resource") == "jobs"
            and (e.get("responseStatus") or {}).get("code") == 201
        ):
            created[f"{ref.get('namespace')}/{ref.get('name')}"] += 1
    return created


def count_phases(c: pg.Cluster) -> Counter[str]:
    items = c.kubectl_json("get", "gft", "-A")["items"]
    return Counter((i.get("status") or {}).get("phase") or "-" for i in items)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--finetunes", type=int, default=1000)
    p.add_argument("--namespaces", type=int, default=10)
    args = p.parse_args()
    n, spaces = args.finetunes, [f"bench-{i}" for i in range(args.namespaces)]
    per_space = n // len(spaces)

    state = Path(tempfile.gettempdir()) / "gft-bench-restart"
    work = Path(tempfile.mkdtemp(prefix="gft-bench-"))
    c = pg.start(state, say=lambda m: print(f"[proving ground] {m}", flush=True), runner=False)
    op = None
    # Every pod answers as a trainer (at its pod IP), as in a cluster.
    with kwok_pods_served(time.time()), contextlib.ExitStack() as stop:
        stop.callback(pg.stop, state, say=lambda m: None)
        stop.callback(lambda: op is not None and op.kill(signal.SIGTERM))
        install(c)
        add_kwok_nodes(c, n)
        claim = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "shared-output"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        for ns in spaces:
            c.kubectl("create", "namespace", ns)
            c.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(claim))
        kubeconfig = service_account_kubeconfig(c, work / "operator.kubeconfig")
        op = OperatorProcess(c, kubeconfig, work / "operator.log", "--metrics-access", "pod-ip")
        op.start()
        t0 = time.monotonic()
        for ns in spaces:
            c.kubectl("create", "-n", ns, "-f", "-", input=manifests(per_space), timeout=600)
        total = per_space * len(spaces)
        print(f"applied {total} fine-tunes in {len(spaces)} namespaces", flush=True)
        while len(c.kubectl_json("get", "jobs", "-A")["items"]) < total // 2:
            if time.monotonic() - t0 > 900:
                raise SystemExit(f"not half the Jobs exist after 15 min: {op.log()[-3000:]}")
            time.sleep(0.5)
        op.kill(signal.SIGKILL)
        killed_at = time.monotonic() - t0
        print(f"operator SIGKILLed {killed_at:.1f}s after the apply; starting it again", flush=True)
        op.start()
        while len(c.kubectl_json("get", "jobs", "-A")["items"]) < total:
            if time.monotonic() - t0 > 900:
                raise SystemExit("not every Job exists after 15 min")
            time.sleep(1)
        all_jobs = time.monotonic() - t0
        while (phases := count_phases(c)).get("Running", 0) < total:
            if time.monotonic() - t0 > 1200:
                raise SystemExit(f"not every fine-tune is Running after 20 min: {phases}")
            time.sleep(2)
        all_running = time.monotonic() - t0
        time.sleep(5)  # let the audit log catch up
        creates = job_creates(c.state_dir / "logs" / "audit.log")
        log = op.log()
    result = {
        "finetunes": total,
        "namespaces": len(spaces),
        "operator_killed_after_s": round(killed_at, 1),
        "all_jobs_after_apply_s": round(all_jobs, 1),
        "all_running_after_apply_s": round(all_running, 1),
        "jobs_created": sum(creates.values()),
        "duplicate_jobs": sum(v - 1 for v in creates.values() if v > 1),
        "tracebacks_in_log": log.count("Traceback"),
    }
    print("RESULT " + json.dumps(result))
    ok = result["duplicate_jobs"] == 0 and result["tracebacks_in_log"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
