"""Status-update cost and freshness at scale: N running fine-tunes whose metrics change every
second, the real operator reading them all, and the API server's audit log counting its writes.

The fine-tunes run on the proving ground's KWOK nodes (their pods are Running with addresses
from 198.18.0.0/16). That range is routed into a network namespace this script makes, whose
loopback owns the whole range; one process there (``devcluster.fake_trainers``) answers as every
pod's trainer, each pod's step advancing once a second. So the operator does exactly what it
does in a cluster (reads each pod IP, patches each status) and no traffic leaves this machine.

Measured from the apply: how long until all N Jobs exist. Then over a window once every
fine-tune shows live numbers:
- the operator's API requests, from the audit log (user
  ``system:serviceaccount:gft-system:gft-operator``): writes per second (all write verbs, and
  status patches alone) against the bound ``N / interval``, and reads (GET and LIST; the
  leader-election Lease and the long-lived watches apart) per minute, whose goal is 0;
- freshness: for every step of every fine-tune in the window, the time from the step to the
  first status (seen by a watch) that shows it or a later one; median and p90;
- the operator's CPU use (cores) over the window, and its resident memory at the end.

    PYTHONPATH=tests .venv/bin/python -m benchmarks.status_writes [--finetunes 200] \\
        [--interval 10] [--window 60]

Needs root (network namespaces), like the proving ground's runner.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from devcluster import cluster as pg
from devcluster.fake_trainers import kwok_pods_served, step_time

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "operator"))
from operator_process import OperatorProcess, install, service_account_kubeconfig  # noqa: E402
from operator_samples import finetune  # noqa: E402

OPERATOR_USER = "system:serviceaccount:gft-system:gft-operator"
READS = ("get", "list")
NAMESPACE = "bench"


def manifests(n: int) -> str:
    items = []
    for i in range(n):
        m = finetune(
            f"ft-{i:03d}",
            model={"name": "google/gemma-3-1b-it"},
            resources={"gpus": 0},
            output={"existingClaim": "shared-output"},
            tensorboard={"enabled": False},
            podAnnotations={"gft.dev/kwok-keep-running": "true"},
            training={"maxSteps": 100_000},
        )
        items.append(m)
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def add_kwok_nodes(c: pg.Cluster, pods: int) -> None:
    """KWOK CPU nodes enough for ``pods`` more pods (110 a node, as a kubelet allows)."""
    template = c.kubectl_json("get", "node", pg.KWOK_CPU_NODES[0])
    for i in range(pods // 110 + 1):
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": f"kwok-bench-{i}",
                "labels": {
                    **template["metadata"]["labels"],
                    "kubernetes.io/hostname": f"kwok-bench-{i}",
                },
                "annotations": template["metadata"]["annotations"],
            },
            "spec": {},
            "status": {
                "capacity": template["status"]["capacity"],
                "allocatable": template["status"]["allocatable"],
            },
        }
        c.kubectl("create", "-f", "-", input=json.dumps(node))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def watch_status(c: pg.Cluster, seen: dict[str, list[tuple[float, int]]], stop: threading.Event):
    """Every status change of the fine-tunes as it arrives: (arrival time, step) per name."""
    proc = subprocess.Popen(
        [
            str(c.bin_dir / "kubectl"),
            "--kubeconfig",
            str(c.kubeconfig),
            "get",
            "gft",
            "-n",
            NAMESPACE,
            "--watch",
            "--output-watch-events",
            "-o",
            "json",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=c.env,
    )
    decoder = json.JSONDecoder()
    buffer = ""
    assert proc.stdout is not None
    while not stop.is_set():
        line = proc.stdout.readline()
        if not line:
            break
        buffer += line
        try:
            event, _ = decoder.raw_decode(buffer.lstrip())
        except json.JSONDecodeError:
            continue
        buffer = ""
        obj = event.get("object") or {}
        step = ((obj.get("status") or {}).get("progress") or {}).get("step")
        if step is not None:
            seen.setdefault(obj["metadata"]["name"], []).append((time.time(), int(step)))
    proc.kill()


def audit_requests(log: Path, start: int, t_from: float, t_to: float) -> dict[str, int]:
    """The operator's requests in the window, counted by ``verb resource[/subresource]``."""
    counts: dict[str, int] = {}
    with log.open() as f:
        f.seek(start)
        for line in f:
            e = json.loads(line)
            if e.get("user", {}).get("username") != OPERATOR_USER or e.get("stage") != (
                "ResponseComplete"
            ):
                continue
            at = time.mktime(time.strptime(e["requestReceivedTimestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
            at -= time.timezone  # the audit log is in UTC
            if not t_from <= at < t_to:
                continue
            ref = e.get("objectRef", {})
            resource = ref.get("resource", "")
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            what = f"{e['verb']} {resource}"
            counts[what] = counts.get(what, 0) + 1
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--finetunes", type=int, default=200)
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--window", type=float, default=60.0)
    args = p.parse_args()
    n, interval = args.finetunes, args.interval

    state = Path(tempfile.gettempdir()) / "gft-bench-status"
    work = Path(tempfile.mkdtemp(prefix="gft-bench-"))
    c = pg.start(state, say=lambda m: print(f"[proving ground] {m}", flush=True), runner=False)
    op = None
    t0 = time.time()
    try:
        with kwok_pods_served(t0):
            install(c)
            add_kwok_nodes(c, n)
            c.kubectl("create", "namespace", NAMESPACE)
            c.kubectl(
                "apply",
                "-n",
                NAMESPACE,
                "-f",
                "-",
                input=yaml.safe_dump(
                    {
                        "apiVersion": "v1",
                        "kind": "PersistentVolumeClaim",
                        "metadata": {"name": "shared-output"},
                        "spec": {
                            "accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": "1Gi"}},
                        },
                    }
                ),
            )
            kubeconfig = service_account_kubeconfig(c, work / "operator.kubeconfig")
            op = OperatorProcess(
                c,
                kubeconfig,
                work / "operator.log",
                "--resync-seconds",
                "10",
                "--metrics-interval",
                str(interval),
                "--metrics-access",
                "pod-ip",
            )
            op.start()
            applied = time.monotonic()
            # create, not apply: one POST each, where apply reads each object first.
            c.kubectl("create", "-n", NAMESPACE, "-f", "-", input=manifests(n), timeout=600)
            created_s = time.monotonic() - applied
            print(f"created {n} fine-tunes in {created_s:.1f}s; waiting for their Jobs", flush=True)
            while len(c.kubectl_json("get", "jobs", "-n", NAMESPACE)["items"]) < n:
                if time.monotonic() - applied > 600:
                    raise SystemExit(f"not all {n} Jobs exist after 10 min: {op.log()[-3000:]}")
                time.sleep(0.5)
            all_jobs_s = time.monotonic() - applied
            print(f"all {n} Jobs exist {all_jobs_s:.1f}s after the apply", flush=True)
            deadline = time.monotonic() + 900
            while True:
                items = c.kubectl_json("get", "gft", "-n", NAMESPACE)["items"]
                live = [
                    i
                    for i in items
                    if ((i.get("status") or {}).get("progress") or {}).get("step") is not None
                ]
                if len(live) == n:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"only {len(live)}/{n} show live numbers after 15 min; "
                        f"operator log: {op.log()[-3000:]}"
                    )
                time.sleep(5)
            pods = c.kubectl_json("get", "pods", "-n", NAMESPACE)["items"]
            pod_ip = {
                p["metadata"]["labels"]["finetune.gemma.dev/name"]: p["status"]["podIP"]
                for p in pods
                if p.get("status", {}).get("podIP")
            }
            print(
                f"all {n} live after {time.time() - t0:.0f}s; measuring {args.window:.0f}s",
                flush=True,
            )

            seen: dict[str, list[tuple[float, int]]] = {}
            stop = threading.Event()
            watcher = threading.Thread(target=watch_status, args=(c, seen, stop), daemon=True)
            watcher.start()
            time.sleep(interval + 2)  # the watch's initial list is not a change
            audit = c.state_dir / "logs" / "audit.log"
            offset = audit.stat().st_size
            cpu0, w0 = cpu_seconds(op.proc.pid), time.time()
            time.sleep(args.window)
            cpu1, w1 = cpu_seconds(op.proc.pid), time.time()
            rss = rss_mb(op.proc.pid)
            time.sleep(3)  # let the audit log catch up
            stop.set()
            requests = audit_requests(audit, offset, w0, w1)
    finally:
        if op is not None:
            op.kill(signal.SIGTERM)
        pg.stop(state, say=lambda m: None)

    seconds = w1 - w0
    writes = {k: v for k, v in requests.items() if k.split()[0] not in (*READS, "watch")}
    reads = {
        k: v for k, v in requests.items() if k.split()[0] in READS and not k.endswith(" leases")
    }
    total_writes = sum(writes.values())
    status_patches = writes.get("patch gemmafinetunes/status", 0)
    delays = []
    for name, events in seen.items():
        if name not in pod_ip:
            continue
        events = [(t, s) for t, s in events if w0 <= t <= w1]
        if len(events) < 2:
            continue
        for s in range(events[0][1] + 1, events[-1][1] + 1):
            first = next(t for t, step in events if step >= s)
            delays.append(first - step_time(t0, pod_ip[name], s))
    delays.sort()
    result = {
        "finetunes": n,
        "interval_s": interval,
        "kubectl_create_s": round(created_s, 1),
        "all_jobs_after_apply_s": round(all_jobs_s, 1),
        "window_s": round(seconds, 1),
        "operator_reads_per_min": round(sum(reads.values()) * 60 / seconds, 1),
        "reads_by_kind": reads,
        "operator_writes_per_s": round(total_writes / seconds, 2),
        "status_patches_per_s": round(status_patches / seconds, 2),
        "bound_per_s": round(n / interval, 2),
        "writes_by_kind": writes,
        "freshness_median_s": round(statistics.median(delays), 2) if delays else None,
        "freshness_p90_s": round(delays[int(0.9 * (len(delays) - 1))], 2) if delays else None,
        "freshness_samples": len(delays),
        "operator_cpu_cores": round((cpu1 - cpu0) / seconds, 3),
        "operator_rss_mb": round(rss, 1),
    }
    print("RESULT " + json.dumps(result))
    ok = total_writes / seconds <= n / interval
    print("writes within the bound" if ok else "WRITES OVER THE BOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
