"""Months of uptime, compressed: thousands of fine-tunes created, run, finished and deleted
while one operator runs, and what it holds and does over that time.

On the proving ground's KWOK nodes, every pod answering as a trainer at its pod IP (the fake
trainers of ``devcluster.fake_trainers``), ``--finetunes`` fine-tunes are created at an even
rate over ``--minutes``. Each runs for a while and ends: most succeed (the script lets its pod
complete), some fail at once with a non-retryable exit, some are deleted while they run. A
third carry ``ttlSecondsAfterFinished`` (the operator deletes their Jobs); finished fine-tunes
are deleted ``--retention`` seconds after they end, but one in ten (``--keep``) is kept to the
end (finished runs without a TTL, which must cost nothing per resync). All fine-tunes write to
one claim per namespace (``existingClaim``), so the claims the operator would retain do not pile
up.

Measured: the operator's resident memory (RSS) when the first 300 have been created and at
the end, its reconciles per second over a window once every fine-tune has finished, what it
keeps in memory (its own metrics ``gft_operator_cached_objects``, ``remembered_writes``), Jobs
created (audit log: duplicates) and the tracebacks in its log.

    PYTHONPATH=tests .venv/bin/python -m benchmarks.soak [--finetunes 3000] [--minutes 20]

Needs root (network namespaces), like the proving ground's runner.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from benchmarks.operator_restart import job_creates
from benchmarks.status_writes import add_kwok_nodes, rss_mb
from devcluster import cluster as pg
from devcluster.fake_trainers import kwok_pods_served

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "operator"))
from operator_process import OperatorProcess, install, service_account_kubeconfig  # noqa: E402
from operator_samples import finetune  # noqa: E402

TERMINAL = ("Succeeded", "Failed")
END_POD = {"metadata": {"annotations": {"gft.dev/kwok-keep-running": None}}}
"""KWOK completes a pod (exit 0) once it no longer asks to be kept running."""
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Run:
    namespace: str
    name: str
    fate: str  # succeed | fail | delete-running
    runs_for: float
    keep: bool
    created: float = 0.0
    ended: float | None = None  # when the script ended (or deleted) it
    finished: float | None = None  # when its status was seen terminal
    deleted: bool = False


def operator_metrics(op: OperatorProcess) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with _DIRECT.open(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            label = ",".join(f"{v}" for v in s.labels.values())
            out[f"{s.name}{{{label}}}" if label else s.name] = s.value
    return out


def finetunes(api, namespace: str) -> list[dict]:
    return api.request("GET", api.custom_path(namespace))["items"]


def delete_finetune(api, namespace: str, name: str) -> None:
    from gft_operator.kube import NotFound

    with contextlib.suppress(NotFound):
        api.request("DELETE", api.custom_path(namespace, name))


def manifest(run: Run, rng: random.Random) -> dict:
    annotations = {"gft.dev/kwok-keep-running": "1"}
    if run.fate == "fail":
        annotations = {"gft.dev/kwok-exit-code": "78"}  # a bad config: fails at once
    spec = {
        "model": {"name": "google/gemma-3-1b-it"},
        "resources": {"gpus": 0, "nodeSelector": {"type": "kwok"}},
        "output": {"existingClaim": "shared-output"},
        "tensorboard": {"enabled": False},
        "podAnnotations": annotations,
        "training": {"maxSteps": 100_000},
    }
    if rng.random() < 1 / 3:
        spec["ttlSecondsAfterFinished"] = rng.randint(0, 30)
    m = finetune(run.name, **spec)
    m["metadata"]["namespace"] = run.namespace
    return m


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--finetunes", type=int, default=3000)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--namespaces", type=int, default=5)
    p.add_argument("--run-seconds", type=float, default=60.0, help="longest a run lasts")
    p.add_argument("--retention", type=float, default=60.0)
    p.add_argument(
        "--keep",
        type=float,
        default=0.1,
        help="the share of fine-tunes kept to the end (finished runs without a TTL)",
    )
    p.add_argument("--window", type=float, default=60.0)
    p.add_argument("--first", type=int, default=300, help="RSS is compared with after these")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "gft-bench-soak",
        help="the proving ground's folder (the suite's smoke run keeps apart from a real soak)",
    )
    args = p.parse_args()
    from gft_operator.kube import Kube, NotFound, load_config

    rng = random.Random(25)
    spaces = [f"soak-{i}" for i in range(args.namespaces)]
    runs: list[Run] = []
    for i in range(args.finetunes):
        roll = rng.random()
        fate = "fail" if roll < 0.1 else "delete-running" if roll < 0.15 else "succeed"
        runs.append(
            Run(
                namespace=spaces[i % len(spaces)],
                name=f"soak-{i:05d}",
                fate=fate,
                runs_for=rng.uniform(args.run_seconds / 4, args.run_seconds),
                keep=rng.random() < args.keep,
            )
        )
    state = args.state_dir
    work = Path(tempfile.mkdtemp(prefix="gft-bench-"))
    c = pg.start(state, say=lambda m: print(f"[proving ground] {m}", flush=True), runner=False)
    op = None
    samples: list[tuple[float, float, float]] = []  # (seconds, rss MB, reconciles)
    with kwok_pods_served(time.time()), contextlib.ExitStack() as stop:
        stop.callback(pg.stop, state, say=lambda m: None)
        stop.callback(lambda: op is not None and op.kill(signal.SIGTERM))
        install(c)
        api = Kube(load_config(str(c.kubeconfig)))
        concurrent = int(args.finetunes / (args.minutes * 60) * args.run_seconds * 1.5) + 50
        add_kwok_nodes(c, concurrent)
        claim = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "shared-output"},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        for ns in spaces:
            c.kubectl("create", "namespace", ns)
            api.create({**claim, "metadata": {**claim["metadata"], "namespace": ns}})
        kubeconfig = service_account_kubeconfig(c, work / "operator.kubeconfig")
        op = OperatorProcess(
            c, kubeconfig, work / "operator.log", "--resync-seconds", "10",
            "--metrics-access", "pod-ip",
        )  # fmt: skip
        op.start()
        t0 = time.monotonic()
        done = threading.Event()

        def sample() -> None:
            while not done.wait(10):
                try:
                    m = operator_metrics(op)
                except OSError:
                    continue
                samples.append(
                    (time.monotonic() - t0, rss_mb(op.proc.pid), m["gft_operator_reconciles_total"])
                )

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        gap = args.minutes * 60 / args.finetunes
        rss_first = None
        pending = list(runs)
        live: dict[tuple[str, str], Run] = {}
        next_look = 0.0
        while pending or live:
            now = time.monotonic() - t0
            while pending and now >= (len(runs) - len(pending)) * gap:
                run = pending.pop(0)
                run.created = time.monotonic()
                api.request("POST", api.custom_path(run.namespace), body=manifest(run, rng))
                live[(run.namespace, run.name)] = run
                created = len(runs) - len(pending)
                if created == args.first:
                    rss_first = rss_mb(op.proc.pid)
                    print(f"{created} created after {now:.0f}s: operator RSS {rss_first:.1f} MB",
                          flush=True)  # fmt: skip
                now = time.monotonic() - t0
            if now < next_look:
                time.sleep(min(gap, 0.2))
                continue
            next_look = now + 5.0
            # End the runs whose time has come; see which have finished; delete the old ones.
            phases = {}
            for ns in spaces:
                for item in finetunes(api, ns):
                    phases[(ns, item["metadata"]["name"])] = (item.get("status") or {}).get("phase")
            moment = time.monotonic()
            for key, run in list(live.items()):
                phase = phases.get(key)
                if run.finished is None and phase in TERMINAL:
                    run.finished = moment
                if run.ended is None and moment - run.created >= run.runs_for:
                    if run.fate == "delete-running":
                        delete_finetune(api, run.namespace, run.name)
                        run.deleted = True
                        run.ended = moment
                    elif run.fate == "succeed":
                        # Ended once its pod was told to complete: a pod the operator has not
                        # made yet is told at a later look (before, such a run ran forever).
                        pods = api.list(
                            "Pod",
                            run.namespace,
                            labelSelector=f"finetune.gemma.dev/name={run.name}",
                        )
                        for pod in pods:
                            with contextlib.suppress(NotFound):
                                api.strategic_patch(
                                    "Pod", run.namespace, pod["metadata"]["name"], END_POD
                                )
                                run.ended = moment
                    else:
                        run.ended = moment
                if run.deleted and key not in phases:
                    del live[key]
                elif (
                    run.finished is not None
                    and not run.keep
                    and not run.deleted
                    and moment - run.finished >= args.retention
                ):
                    delete_finetune(api, run.namespace, run.name)
                    run.deleted = True
                elif run.finished is not None and run.keep:
                    del live[key]
            if now > args.minutes * 60 + 30 * args.run_seconds:
                raise SystemExit(f"not finished after {now:.0f}s: {len(live)} left")
        all_done = time.monotonic() - t0
        print(f"all {len(runs)} finished (or deleted) after {all_done:.0f}s", flush=True)
        time.sleep(20)  # the last deletions and TTLs settle
        before = operator_metrics(op)
        w0 = time.monotonic()
        time.sleep(args.window)
        after = operator_metrics(op)
        rate = (
            after["gft_operator_reconciles_total"] - before["gft_operator_reconciles_total"]
        ) / (time.monotonic() - w0)
        rss_end = rss_mb(op.proc.pid)
        done.set()
        creates = job_creates(c.state_dir / "logs" / "audit.log")
        log = op.log()
        left = Counter(
            (i.get("status") or {}).get("phase") or "-" for ns in spaces for i in finetunes(api, ns)
        )
    peak = max((s[1] for s in samples), default=0.0)
    result = {
        "finetunes": len(runs),
        "minutes": args.minutes,
        "kept": sum(r.keep and not r.deleted for r in runs),
        "fates": dict(Counter(r.fate for r in runs)),
        "all_finished_after_s": round(all_done, 1),
        "rss_after_first_mb": round(rss_first or 0.0, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_end_over_first": round(rss_end / rss_first, 3) if rss_first else None,
        "rss_peak_mb": round(peak, 1),
        "reconciles_per_s_after": round(rate, 3),
        "left_at_end": dict(left),
        "cached_at_end": {k: v for k, v in after.items() if k.startswith("gft_operator_cached")},
        "remembered_writes_at_end": after.get("gft_operator_remembered_writes"),
        "jobs_created": sum(creates.values()),
        "duplicate_jobs": sum(v - 1 for v in creates.values() if v > 1),
        "tracebacks_in_log": log.count("Traceback"),
        "rss_samples_mb": [
            (round(t), round(r, 1)) for t, r, _ in samples[:: max(1, len(samples) // 40)]
        ],
    }
    print("RESULT " + json.dumps(result))
    ok = result["duplicate_jobs"] == 0 and result["tracebacks_in_log"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
