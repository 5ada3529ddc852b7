# ruff: noqa: F811  (pytest fixtures imported from operator_process are parameters here)
"""The operator right after a restart and across a failover (issue 25), on the proving ground
with KWOK nodes:

- a cold start whose lists are slow (a proxy in front of the API server holds the Job, pod
  and event lists back) misjudges nothing: no conflict, no outcome decided from pods not seen,
  and ``/readyz`` says not ready until the caches are filled;
- leader election as client-go does it: a standby whose clock is skewed does not take a held
  Lease, a deposed leader makes no write (even one it had started), the Lease is given up only
  after the writes in flight are done, and a deposed leader's gauges stop counting;
- a fine-tune deleted while no one leads gets its cleanup from the next leader.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import wait_for
from operator_process import (  # noqa: F401 (fixtures)
    OperatorProcess,
    apply,
    events_of,
    get_gft,
    installed,
    service_account_kubeconfig,
    start_operator,
    wait_phase,
)
from operator_samples import finetune

from devcluster.faultproxy import Fault, FaultProxy

pytestmark = pytest.mark.cluster

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
LEASE_NAMESPACE = "gft-system"


def kept_running(name: str, **spec) -> dict:
    """A fine-tune whose pod runs on a KWOK node until it is told to end."""
    spec.setdefault("resources", {"gpus": 1, "nodeSelector": {"type": "kwok"}})
    spec.setdefault("podAnnotations", {"gft.dev/kwok-keep-running": "1"})
    return finetune(name, **spec)


def readyz(op: OperatorProcess) -> tuple[int, str]:
    try:
        with _DIRECT.open(f"http://127.0.0.1:{op.metrics_port}/readyz", timeout=5) as r:
            return r.status, r.read().decode().strip()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode().strip()


def metric(op: OperatorProcess, name: str) -> list[tuple[dict, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    with _DIRECT.open(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return [
        (s.labels, s.value)
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name
    ]


def sa_token(c, tmp_path: Path) -> str:
    config = yaml.safe_load(service_account_kubeconfig(c, tmp_path / "sa.kubeconfig").read_text())
    return config["users"][0]["user"]["token"]


def end_pod(c, namespace: str, name: str, exit_code: int) -> None:
    """Make the KWOK pod of fine-tune ``name`` end with ``exit_code``."""
    c.kubectl(
        "annotate",
        "pods",
        "-n",
        namespace,
        "-l",
        f"finetune.gemma.dev/name={name}",
        f"gft.dev/kwok-exit-code={exit_code}",
        "gft.dev/kwok-keep-running-",
        "--overwrite",
    )


def job_condition(c, namespace: str, name: str) -> str | None:
    job = c.kubectl_json("get", "job", name, "-n", namespace)
    for cond in job.get("status", {}).get("conditions") or []:
        if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
            return cond["type"]
    return None


# ---------------------------------------------------------------------------------------------
# Finding 1: nothing reaches reconcile before the caches are filled
# ---------------------------------------------------------------------------------------------
def test_a_cold_start_with_slow_lists_misjudges_nothing(
    installed, namespace, tmp_path, tmp_path_factory
):
    """The operator starts while the Job list takes 6 s and the pod and event lists 12 s.
    Before: the resync (first pass after 3 s here) reconciled from the half-filled caches:
    the live run got ``JobConflict`` (its own Job, not listed yet, answered the create with
    409), the run whose Job failed while the operator was down was decided with no pods seen
    (``Failed/PodFailurePolicy``: the trainer's reason lost, the Job's finalizer released), and
    ``/readyz`` answered 200 throughout."""
    c = installed
    op = start_operator(c, tmp_path_factory, "--resync-seconds", "3")
    try:
        apply(c, namespace, kept_running("live"))
        apply(c, namespace, kept_running("ended"))
        wait_phase(c, namespace, "live", "Running", timeout=60)
        wait_phase(c, namespace, "ended", "Running", timeout=60)
    finally:
        op.kill(signal.SIGKILL)
    end_pod(c, namespace, "ended", 78)  # a non-retryable exit: the Job fails at once
    wait_for("the Job to fail", lambda: job_condition(c, namespace, "ended") == "Failed")

    proxy = FaultProxy(c).start()
    lists = r"^(?!.*watch=)"  # a LIST, not the WATCH that follows it
    for path, seconds in (("/jobs$", 6), ("/pods$", 12), ("/events$", 12)):
        proxy.inject(
            Fault(delay=seconds, forward=True, method="GET", path=path, query=lists, times=1)
        )
    kubeconfig = proxy.kubeconfig_for(sa_token(c, tmp_path), tmp_path / "proxied.kubeconfig")
    cold = OperatorProcess(c, kubeconfig, tmp_path / "cold.log", "--resync-seconds", "3")
    try:
        cold.start()
        early = readyz(cold)
        wait_for("the caches to be filled", lambda: readyz(cold)[0] == 200, timeout=60)
        status = wait_phase(c, namespace, "ended", "Failed", timeout=60)
        live = wait_phase(c, namespace, "live", "Running", timeout=30)
    finally:
        cold.kill(signal.SIGTERM)
        proxy.stop()
    log = cold.log()
    for name in ("live", "ended"):
        reasons = [e["reason"] for e in events_of(c, namespace, name)]
        assert "JobConflict" not in reasons and "ChildConflict" not in reasons, (name, reasons)
    assert status["reason"] == "InvalidConfig", status  # from the pod's exit code
    assert early[0] == 503 and "sync" in early[1], early
    assert "JobConflict" not in log and "Traceback" not in log, log[-3000:]
    assert live["reason"] == "TrainerRunning" and live["attempts"] == 1


# ---------------------------------------------------------------------------------------------
# Finding 5: leader election as client-go does it (in-process, against the real API server)
# ---------------------------------------------------------------------------------------------
def _lease(c, name: str) -> dict | None:
    got = c.kubectl("get", "lease", name, "-n", LEASE_NAMESPACE, "-o", "json", check=False)
    return json.loads(got.stdout) if got.returncode == 0 else None


def _hold_lease(c, name: str, holder: str, stop: threading.Event, skew: float = 0.0) -> None:
    """Play another replica holding the Lease: renew it every 0.5 s with a clock ``skew``
    seconds off."""
    from gft_operator.leader import micro_time

    while not stop.is_set():
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": LEASE_NAMESPACE},
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": 3,
                "renewTime": micro_time(time.time() + skew),
                "acquireTime": micro_time(time.time() + skew),
            },
        }
        c.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(lease))
        stop.wait(0.5)


def _admin_kube(c):
    from gft_operator.kube import Kube, load_config

    return Kube(load_config(str(c.kubeconfig)))


def test_a_standby_with_a_skewed_clock_does_not_take_a_held_lease(installed):
    """The holder renews every 0.5 s, but its clock is 30 s behind the standby's. Before: the
    standby judged expiry from the holder's renewTime against its own clock and took the
    Lease at once (two leaders). Now expiry is judged by when the standby itself last saw
    the record change (client-go's observedTime); once the holder stops, it takes over."""
    from gft_operator.leader import LeaderElector

    c = installed
    stop = threading.Event()
    holder = threading.Thread(
        target=_hold_lease, args=(c, "skewed", "other", stop, -30.0), daemon=True
    )
    holder.start()
    wait_for("the other holder", lambda: _lease(c, "skewed"), timeout=30)
    elector = LeaderElector(
        _admin_kube(c), LEASE_NAMESPACE, "skewed", "me", duration=3, renew_deadline=2, retry=0.3
    )
    done = threading.Event()
    runner = threading.Thread(target=elector.run, args=(done,), daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 8  # more than two lease durations
        led = False
        while time.monotonic() < deadline and not led:
            led = elector.is_leader()
            time.sleep(0.1)
        assert not led, "took a Lease its holder kept renewing"
        assert _lease(c, "skewed")["spec"]["holderIdentity"] == "other"
        stop.set()
        holder.join(10)
        wait_for("the standby to take the abandoned Lease", elector.is_leader, timeout=15)
    finally:
        stop.set()
        done.set()
        runner.join(10)


def test_a_deposed_leader_makes_no_write_and_drains_before_it_releases(
    installed, namespace, tmp_path
):
    """A status write answered 429 (Retry-After 4 s); the Lease is taken from the leader
    meanwhile. Before: leadership was checked once before the retries, so the retry was sent
    by a replica that no longer led; and on shutdown the Lease was given up while a write was
    still in flight. Now every attempt checks, and the release waits for the writes."""
    from gft_operator import handlers
    from gft_operator.kube import Kube, NotLeader, load_config
    from gft_operator.leader import LeaderElector

    c = installed
    apply(c, namespace, finetune("target"))
    proxy = FaultProxy(c).start()
    kube = Kube(
        load_config(str(proxy.kubeconfig_for(sa_token(c, tmp_path), tmp_path / "p.kubeconfig")))
    )
    status_path = kube.custom_path(namespace, "target", "status")
    elector = LeaderElector(kube, LEASE_NAMESPACE, "deposed", "me", 3, 2, 0.3)
    kube.may_write = elector.is_leader
    done = threading.Event()
    runner = threading.Thread(target=elector.run, args=(done,), daemon=True)
    runner.start()
    thief = threading.Event()
    try:
        wait_for("the leadership", elector.is_leader, timeout=15)
        proxy.inject(
            Fault(
                status=429,
                headers={"Retry-After": "4"},
                method="PATCH",
                path=r"gemmafinetunes/target/status$",
                content_type="application/json",
                body='{"kind":"Status","apiVersion":"v1","status":"Failure","code":429}',
            )
        )
        outcome: list[object] = []

        def write() -> None:
            try:
                outcome.append(
                    kube.request(
                        "PATCH",
                        status_path,
                        body={"status": {"phase": "Pending"}},
                        content_type="application/merge-patch+json",
                    )
                )
            except Exception as e:  # the outcome is what is checked
                outcome.append(e)

        writer = threading.Thread(target=write)
        writer.start()
        wait_for("the first attempt", lambda: proxy.seen("PATCH", "target/status$"), timeout=10)
        stealer = threading.Thread(
            target=_hold_lease, args=(c, "deposed", "thief", thief), daemon=True
        )
        stealer.start()
        writer.join(30)
        patches = proxy.seen("PATCH", "target/status$")
        assert [p.status for p in patches] == [429], patches  # no retry by the deposed leader
        assert isinstance(outcome[0], NotLeader), outcome

        # Drain: leading again, a write in flight (held 3 s by the proxy) when it shuts down.
        thief.set()
        stealer.join(10)
        wait_for("the leadership again", elector.is_leader, timeout=20)
        proxy.inject(
            Fault(delay=3, forward=True, method="PATCH", path=r"gemmafinetunes/target/status$")
        )
        writer = threading.Thread(target=write)
        writer.start()
        wait_for("the write in flight", lambda: len(proxy.seen("PATCH", "target/status$")) >= 1)
        handlers.RUNTIME.kube, handlers.RUNTIME.leader = kube, elector
        time.sleep(0.5)  # the write is held in the proxy now
        handlers.cleanup()
        released = time.monotonic()
        writer.join(30)
        answered = proxy.seen("PATCH", "target/status$")[-1].at
        assert answered <= released, "the Lease was given up while a write was in flight"
        assert _lease(c, "deposed")["spec"].get("holderIdentity") in ("", None)
    finally:
        thief.set()
        done.set()
        runner.join(10)
        handlers.RUNTIME.kube = handlers.RUNTIME.leader = None
        proxy.stop()


# ---------------------------------------------------------------------------------------------
# Findings 6 and 9: a failover with real operator processes
# ---------------------------------------------------------------------------------------------
def test_a_finetune_deleted_while_no_one_leads_gets_its_cleanup(
    installed, namespace, tmp_path_factory
):
    """Kill the leader, delete a live fine-tune before the standby takes over. Before: the new
    leader looked only at the fine-tunes it knew, so the deleted one's Job kept the outcome
    finalizer (and its pod its trainer) forever. Now the takeover sweeps the labelled Jobs and
    pods whose fine-tune is gone. Also finding 9: a replica that stops leading stops reporting
    the fine-tunes by phase (before, the deposed leader's gauges kept counting)."""
    c = installed
    # A lease long enough for everything the delete sets off to happen while no one leads.
    args = ("--leader-elect", "--lease-duration", "10", "--leader-election-id", "failover")
    first = start_operator(c, tmp_path_factory, *args)
    second = None
    try:
        wait_for(
            "a leader",
            lambda: (_lease(c, "failover") or {}).get("spec", {}).get("holderIdentity"),
            timeout=30,
        )
        second = start_operator(c, tmp_path_factory, *args)
        apply(c, namespace, kept_running("doomed"))
        apply(c, namespace, kept_running("kept"))
        wait_phase(c, namespace, "doomed", "Running", timeout=60)
        wait_phase(c, namespace, "kept", "Running", timeout=60)
        leader, standby = (first, second)
        holder = _lease(c, "failover")["spec"]["holderIdentity"]
        if holder.endswith(f"-{second.proc.pid}"):
            leader, standby = second, first
        assert metric(leader, "gft_operator_finetunes")  # counting while it leads
        leader.kill(signal.SIGKILL)
        c.kubectl("delete", "gft", "doomed", "-n", namespace, "--wait=false")
        # What garbage collection does next (on a fresh proving ground it notices a new CRD's
        # deletions only after its next discovery, up to 30 s later): delete the Job, which the
        # outcome finalizer holds. (KWOK's nodes take the pods' finalizers off on delete,
        # where a kubelet would wait for the trainer.)
        c.kubectl("delete", "job", "doomed", "-n", namespace, "--wait=false")
        wait_for(
            "the Job to be held by its finalizer",
            lambda: c.kubectl_json("get", "job", "doomed", "-n", namespace)["metadata"].get(
                "deletionTimestamp"
            ),
            timeout=30,
        )
        assert _lease(c, "failover")["spec"]["holderIdentity"] == holder  # no one leads yet
        wait_for(
            "the standby to lead",
            lambda: _lease(c, "failover")["spec"]["holderIdentity"] not in ("", holder),
            timeout=30,
        )
        wait_for(
            "the deleted fine-tune's Job to go",
            lambda: c.kubectl("get", "job", "doomed", "-n", namespace, check=False).returncode,
            timeout=30,
        )
        wait_for(
            "its trainer's pod to go",
            lambda: (
                not c.kubectl_json(
                    "get", "pods", "-n", namespace, "-l", "finetune.gemma.dev/name=doomed"
                )["items"]
            ),
            timeout=60,
        )
        assert get_gft(c, namespace, "kept")["status"]["phase"] == "Running"

        # The new leader is deposed (the Lease taken by hand): its gauges stop counting.
        stop = threading.Event()
        thief = threading.Thread(
            target=_hold_lease, args=(c, "failover", "thief", stop), daemon=True
        )
        thief.start()
        try:
            wait_for(
                "the deposed leader to say so",
                lambda: metric(standby, "gft_operator_leader") == [({}, 0.0)],
                timeout=30,
            )
            assert metric(standby, "gft_operator_finetunes") == []
        finally:
            stop.set()
            thief.join(10)
    except BaseException:
        for op in (first, second):
            if op is not None:
                print("=====", op.log_path, "\n", op.log()[-4000:])
        raise
    finally:
        for op in (first, second):
            if op is not None:
                op.kill(signal.SIGTERM)
