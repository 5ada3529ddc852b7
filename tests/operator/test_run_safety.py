# ruff: noqa: F811  (pytest fixtures imported from operator_process are parameters here)
"""Run safety (issue 9), on the proving ground: each way a run's results could be silently
spoiled, tried the way it happens to users, with real trainers on the runner node where the
trainer's behaviour is what is at stake.

- a run that ended is never trained again (TTL 0; the operator down while it ends and its Job
  is deleted by hand),
- a re-created fine-tune never resumes the old run's checkpoints, two fine-tunes on one claim
  write apart, a child name held by something else is a conflict,
- one trainer at a time when a Job is deleted under a live run,
- a newer CRD never fails a running fine-tune,
- API faults (HTML 502/503 and 429 from a proxy in front of the API server; kube-apiserver
  and etcd restarted mid-run) are survived without a lost status or a second Job,
- a stale status writer gets a conflict instead of overwriting.

The figures of the restart test go to docs/reliability.md (printed as ``RELIABILITY`` lines).
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.request

import pytest
import yaml
from conftest import wait_for
from operator_process import (  # noqa: F401 (fixtures)
    MANIFESTS,
    OperatorProcess,
    apply,
    events_of,
    get_gft,
    installed,
    job_creates,
    operator,
    operator_looked_again,
    running_operator,
    start_operator,
    wait_phase,
    watch_job_events,
)
from operator_samples import finetune
from runner_runs import (  # noqa: F401 (model_dir is a fixture)
    STARTUP,
    checkpoint_steps,
    logs,
    model_dir,
    on_runner,
    output_dir,
    run_dir,
    running_pod,
    wait_for_checkpoint,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def on_kwok(name: str, **spec):
    spec.setdefault("resources", {"gpus": 1, "nodeSelector": {"type": "kwok"}})
    return finetune(name, **spec)


def jobs_added(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("ADDED ")]


def stop_watch(watch) -> str:
    watch.terminate()
    out, _ = watch.communicate(timeout=10)
    return out


# ---------------------------------------------------------------------------------------------
# 1. A run that ended is never trained again
# ---------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_a_run_that_ended_with_ttl_zero_is_never_trained_again(
    running_operator, namespace, model_dir
):
    """The operator is down while the run ends, and ``ttlSecondsAfterFinished: 0``. Before:
    the TTL controller deleted the finished Job (and, foreground, its pod with the trainer's
    termination message) at once; the operator, back, took the run for live and created the Job
    again, and each new trainer resumed from the last checkpoint and trained on past the plan.
    Now the operator applies the TTL itself, after recording the outcome."""
    op = running_operator
    c = op.cluster
    watch = watch_job_events(c, namespace)
    try:
        apply(c, namespace, on_runner("once", model_dir, max_steps=40, ttlSecondsAfterFinished=0))
        running_pod(c, namespace, "once")
        op.kill(signal.SIGKILL)
        wait_for(
            "the trainer to finish",
            lambda: any(
                cs["name"] == "trainer" and "terminated" in cs.get("state", {})
                for p in c.kubectl_json(
                    "get", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=trainer"
                )["items"]
                for cs in p.get("status", {}).get("containerStatuses") or []
            ),
            timeout=STARTUP,
        )
        op.start()
        status = wait_phase(c, namespace, "once", "Succeeded", timeout=60)
        wait_for(
            "the operator to delete the finished Job",
            lambda: c.kubectl("get", "job", "once", "-n", namespace, check=False).returncode,
        )
        operator_looked_again(op)
    finally:
        out = stop_watch(watch)
    assert jobs_added(out) == ["ADDED once"], out
    status = get_gft(c, namespace, "once")["status"]
    assert status["phase"] == "Succeeded" and status["result"]["globalStep"] == 40
    assert status["progress"]["totalSteps"] == 40 and status["progress"]["step"] == 40
    assert "jobName" not in status  # the Job is gone, and the status says so
    assert status["attempts"] == 1


@pytest.mark.e2e
def test_a_run_that_ended_while_the_operator_was_down_stays_ended(
    running_operator, namespace, model_dir
):
    """The operator is down while the run finishes and its Job is deleted by hand: started
    again, it records the outcome from what the Job and its pod still hold, and creates
    nothing."""
    op = running_operator
    c = op.cluster
    watch = watch_job_events(c, namespace)
    try:
        apply(c, namespace, on_runner("quiet", model_dir, max_steps=40))
        running_pod(c, namespace, "quiet")
        op.kill(signal.SIGKILL)
        wait_for(
            "the Job to complete",
            lambda: any(
                cond["type"] == "Complete" and cond["status"] == "True"
                for cond in c.kubectl_json("get", "job", "quiet", "-n", namespace)
                .get("status", {})
                .get("conditions", [])
            ),
            timeout=STARTUP,
        )
        c.kubectl("delete", "job", "quiet", "-n", namespace, "--wait=false")
        c.kubectl("delete", "pods", "-n", namespace, "--all", "--wait=false")
        op.start()
        status = wait_phase(c, namespace, "quiet", "Succeeded", timeout=60)
        wait_for(
            "the deleted Job to go once the outcome is recorded",
            lambda: c.kubectl("get", "job", "quiet", "-n", namespace, check=False).returncode,
        )
        operator_looked_again(op)
    finally:
        out = stop_watch(watch)
    assert jobs_added(out) == ["ADDED quiet"], out
    assert status["result"]["outcome"] == "Succeeded" and status["result"]["globalStep"] == 40
    trainers = c.kubectl_json(
        "get", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=trainer"
    )["items"]
    assert not trainers  # released, then gone


# ---------------------------------------------------------------------------------------------
# 2. Two runs never share checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_a_recreated_finetune_starts_fresh_unless_told_to_resume(
    running_operator, namespace, model_dir
):
    """Delete and re-create under the same name (how users change an immutable spec): the new
    run does not pick up the old run's checkpoints from the retained claim; naming one in
    resumeFrom does."""
    c = running_operator.cluster
    apply(c, namespace, on_runner("again", model_dir, max_steps=10))
    first = wait_phase(c, namespace, "again", "Succeeded", timeout=STARTUP + 60)
    first_uid = get_gft(c, namespace, "again")["metadata"]["uid"]
    assert first["outputPath"] == f"runs/{first_uid}"
    c.kubectl("delete", "gft", "again", "-n", namespace)

    apply(c, namespace, on_runner("again", model_dir, max_steps=12))
    second = wait_phase(c, namespace, "again", "Succeeded", timeout=STARTUP + 60)
    second_uid = get_gft(c, namespace, "again")["metadata"]["uid"]
    assert second_uid != first_uid and second["outputPath"] == f"runs/{second_uid}"
    log = logs(c, namespace, second["podName"])
    assert "resuming from" not in log and "step 5/12" in log, log[-2000:]
    volume = output_dir(c, namespace, "again-output")
    assert checkpoint_steps(volume / "runs" / first_uid) == [5, 10]  # untouched
    assert checkpoint_steps(volume / "runs" / second_uid)[-1] == 12
    c.kubectl("delete", "gft", "again", "-n", namespace)

    named = f"runs/{second_uid}/checkpoints/checkpoint-12"
    apply(c, namespace, on_runner("again", model_dir, max_steps=15, resumeFrom={"path": named}))
    third = wait_phase(c, namespace, "again", "Succeeded", timeout=STARTUP + 60)
    log = logs(c, namespace, third["podName"])
    assert f"resuming from /output/{named}" in log, log[-2000:]
    assert third["result"]["globalStep"] == 15 and "step 5/15" not in log


def test_two_finetunes_on_one_existing_claim_write_apart(operator, namespace):
    c = operator.cluster
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "shared"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    apply(c, namespace, claim)
    for name in ("left", "right"):
        apply(c, namespace, on_kwok(name, output={"existingClaim": "shared"}))
    dirs = {}
    for name in ("left", "right"):
        status = wait_phase(c, namespace, name, "Succeeded", timeout=60)
        uid = get_gft(c, namespace, name)["metadata"]["uid"]
        cm = c.kubectl_json("get", "configmap", f"{name}-config", "-n", namespace)
        config = yaml.safe_load(cm["data"]["config.yaml"])
        assert config["output"]["dir"] == f"/output/runs/{uid}" == f"/output/{status['outputPath']}"
        assert config["observability"]["tensorboardDir"].startswith(config["output"]["dir"])
        dirs[name] = config["output"]["dir"]
    assert dirs["left"] != dirs["right"]


def test_a_child_name_held_by_something_else_is_a_conflict(operator, namespace):
    """Before: the user's ConfigMap of the child's name was mounted as the trainer's config."""
    c = operator.cluster
    c.kubectl("create", "configmap", "clash-config", "-n", namespace, "--from-literal=a=b")
    apply(c, namespace, on_kwok("clash"))
    status = wait_phase(c, namespace, "clash", "Pending", "ChildConflict", timeout=60)
    assert "ConfigMap named clash-config" in status["message"]
    assert c.kubectl("get", "job", "clash", "-n", namespace, check=False).returncode != 0
    assert "a" in c.kubectl_json("get", "configmap", "clash-config", "-n", namespace)["data"]
    c.kubectl("delete", "configmap", "clash-config", "-n", namespace)
    wait_phase(c, namespace, "clash", "Succeeded", timeout=60)


# ---------------------------------------------------------------------------------------------
# 3. One trainer at a time
# ---------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_one_trainer_at_a_time_when_the_job_is_deleted_under_a_live_run(
    running_operator, namespace, model_dir
):
    """A Job deleted by hand (its pod orphaned, or stopping within its grace period) gets a
    successor only once its trainer has exited; the run then resumes from its checkpoint."""
    c = running_operator.cluster
    apply(c, namespace, on_runner("single", model_dir, max_steps=600))
    first = running_pod(c, namespace, "single")
    volume = output_dir(c, namespace, "single-output")
    wait_for(
        "a checkpoint",
        lambda: list(volume.rglob("checkpoint-*/gft-checkpoint-complete.json")),
        timeout=STARTUP,
    )

    def pod_phase(name: str) -> str:
        got = c.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
        return json.loads(got.stdout)["status"]["phase"] if got.returncode == 0 else "Gone"

    def successor(after_uid: str):
        got = c.kubectl("get", "job", "single", "-n", namespace, "-o", "json", check=False)
        if got.returncode != 0:
            return None
        job = json.loads(got.stdout)
        return job if job["metadata"]["uid"] != after_uid else None

    for cascade in ("orphan", "background"):
        job_uid = c.kubectl_json("get", "job", "single", "-n", namespace)["metadata"]["uid"]
        pod = running_pod(c, namespace, "single")
        c.kubectl(
            "delete", "job", "single", "-n", namespace, f"--cascade={cascade}", "--wait=false"
        )
        wait_for(f"a new Job after a {cascade} delete", lambda u=job_uid: successor(u), timeout=120)
        # The moment the new Job exists, the old trainer is no longer running.
        assert pod_phase(pod) in ("Failed", "Succeeded", "Gone"), (cascade, pod_phase(pod))

    status = wait_phase(c, namespace, "single", "Succeeded", timeout=3 * STARTUP)
    assert status["result"]["globalStep"] == 600
    assert "resuming from" in logs(c, namespace, status["podName"])
    assert status["podName"] != first


# ---------------------------------------------------------------------------------------------
# 4. Upgrades never fail healthy runs
# ---------------------------------------------------------------------------------------------
def newer_crd() -> dict:
    """The CRD of a later version: a new defaulted field in spec.training and a new section."""
    crd = yaml.safe_load((MANIFESTS / "crd.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["training"]["properties"]["newKnob"] = {
        "type": "integer",
        "default": 3,
        "description": "A knob of a later version.",
    }
    spec["properties"]["futureSection"] = {
        "type": "object",
        "default": {},
        "description": "A section of a later version.",
        "properties": {
            "mode": {"type": "string", "default": "fast", "maxLength": 16, "description": "x"}
        },
    }
    return crd


@pytest.mark.e2e
def test_a_newer_crd_never_fails_a_running_finetune(running_operator, namespace, model_dir):
    """Before: the operator refused the defaulted new field (InvalidSpec) and marked the
    healthy run Failed."""
    c = running_operator.cluster
    apply(c, namespace, on_runner("upgrade", model_dir, max_steps=300))
    running_pod(c, namespace, "upgrade")
    try:
        c.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(newer_crd())
        )

        def ignored():
            st = get_gft(c, namespace, "upgrade").get("status") or {}
            found = [x for x in st.get("conditions") or [] if x["type"] == "SpecUnderstood"]
            return found[0] if found else None

        cond = wait_for("SpecUnderstood=False", ignored, timeout=60)
        assert cond["status"] == "False" and cond["reason"] == "UnknownFields", cond
        assert (
            "spec.training.newKnob" in cond["message"] and "spec.futureSection" in cond["message"]
        )
        status = wait_phase(c, namespace, "upgrade", "Succeeded", timeout=2 * STARTUP)
    finally:
        c.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(MANIFESTS / "crd.yaml"))
    assert status["result"]["globalStep"] == 300
    events = events_of(c, namespace, "upgrade")
    assert not [e for e in events if e["message"].startswith("Failed")], events
    warned = [e for e in events if e["reason"] == "UnknownFields"]
    assert len(warned) == 1 and warned[0]["type"] == "Warning", events


# ---------------------------------------------------------------------------------------------
# 5. API faults are survived
# ---------------------------------------------------------------------------------------------
def test_html_and_retry_after_answers_from_a_proxy_are_survived(
    installed, operator, namespace, tmp_path
):
    """An API gateway in front of the API server answers some requests itself: an HTML 503
    page, a plain-text 502, a 429 with Retry-After. Before: the HTML page broke the JSON
    decoding (a traceback per reconcile) and Retry-After was not honoured."""
    from operator_process import service_account_kubeconfig

    from devcluster.faultproxy import HTML_503, Fault, FaultProxy

    c = installed
    operator.kill()
    proxy = FaultProxy(c).start()
    token = yaml.safe_load(service_account_kubeconfig(c, tmp_path / "sa.kubeconfig").read_text())[
        "users"
    ][0]["user"]["token"]
    proxied = OperatorProcess(
        c, proxy.kubeconfig_for(token, tmp_path / "proxied.kubeconfig"), tmp_path / "op.log"
    )
    ns = f"/namespaces/{namespace}/"
    try:
        proxied.start()
        proxy.inject(
            Fault(
                status=429,
                headers={"Retry-After": "3"},
                times=1,
                method="POST",
                path=ns + "jobs$",
                content_type="application/json",
                body='{"kind":"Status","apiVersion":"v1","status":"Failure",'
                '"reason":"TooManyRequests","code":429}',
            )
        )
        proxy.inject(
            Fault(
                status=503,
                body=HTML_503,
                content_type="text/html",
                times=6,
                method="PATCH",
                path=ns + r"gemmafinetunes/proxied/status$",
            )
        )
        proxy.inject(
            Fault(
                status=502,
                body="upstream connect error\n",
                times=3,
                method="GET",
                path=ns + "pods$",
            )
        )
        apply(c, namespace, on_kwok("proxied"))
        status = wait_phase(c, namespace, "proxied", "Succeeded", timeout=90)
    finally:
        proxied.kill(signal.SIGTERM)
        proxy.stop()
        operator.start()
    log = proxied.log()
    assert "Traceback" not in log and "JSONDecodeError" not in log, log[-3000:]
    assert re.search(
        r"the API server is unavailable \(HTTP 503[^)]*503 Service Temporarily "
        r"Unavailable nginx\); trying again in \d+s",
        log,
    ), log[-3000:]
    creates = proxy.seen("POST", ns + "jobs$")
    assert [s.status for s in creates] == [429, 201], creates
    assert creates[1].at - creates[0].at >= 3.0 - 0.1  # Retry-After honoured
    assert all(s.injected for s in proxy.seen("PATCH", ns + "gemmafinetunes/proxied/status$")[:6])
    assert status["attempts"] == 1 and status["jobName"] == "proxied"
    reasons = [e["reason"] for e in events_of(c, namespace, "proxied")]
    assert reasons.count("Completed") == 1, reasons


def _trainer_step(pod_ip: str) -> int:
    try:
        with _NO_PROXY.open(f"http://{pod_ip}:9090/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return -1
    found = re.search(r"^gft_global_step(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    return int(float(found.group(1))) if found else -1


@pytest.mark.e2e
def test_apiserver_and_etcd_restarts_mid_run_lose_nothing(running_operator, namespace, model_dir):
    """kube-apiserver, then etcd, stopped for a while and started again while a real trainer
    trains: the operator backs off with one line per reconcile put off, the trainer never
    stops, the run ends Succeeded with one Job and an attempt count of one."""
    op = running_operator
    c = op.cluster
    name = "steady"
    steps = 6000
    # Long enough that the trainer still trains through both outages (about 40 s in all) on a
    # fast machine: the tiny model does some 60 steps a second, and 1200 steps once ended
    # before etcd was stopped.
    manifest = on_runner(name, model_dir, max_steps=steps)
    manifest["spec"]["output"]["checkpointEverySteps"] = 500
    apply(c, namespace, manifest)
    pod = running_pod(c, namespace, name)
    pod_ip = c.kubectl_json("get", "pod", pod, "-n", namespace)["status"]["podIP"]
    wait_for("the trainer's metrics", lambda: _trainer_step(pod_ip) >= 0, timeout=STARTUP)

    progress: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(1.0):
            got = c.kubectl(
                "get", "gft", name, "-n", namespace, "-o", "json", check=False, timeout=10
            )
            if got.returncode == 0:
                step = ((json.loads(got.stdout).get("status") or {}).get("progress") or {}).get(
                    "step"
                )
                if step is not None:
                    progress.append(step)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    outages = []
    stopped: list[str] = []
    try:
        for component in ("kube-apiserver", "etcd"):
            before = _trainer_step(pod_ip)
            down = time.monotonic()
            c.stop_component(component)
            stopped.append(component)
            # Down long enough for the trainer to train on and the operator to notice.
            wait_for(
                f"the trainer to train on while {component} is down",
                lambda b=before: _trainer_step(pod_ip) >= b + 30,
                timeout=120,
            )
            wait_for(
                "the operator to notice",
                lambda: "API server is unavailable" in op.log(),
                timeout=60,
            )
            c.start_component(component)
            stopped.remove(component)
            outages.append((component, time.monotonic() - down))
            wait_for(
                f"the status to move on after {component} is back",
                lambda b=before: progress and progress[-1] > b,
                timeout=120,
            )
        status = wait_phase(c, namespace, name, "Succeeded", timeout=3 * STARTUP)
    finally:
        sampling.set()
        sampler.join(10)
        for component in stopped:  # a failure here must not leave the shared cluster down
            c.start_component(component)
    assert status["result"]["globalStep"] == steps
    assert status["attempts"] == 1 and status["failedAttempts"] == 0, status
    assert job_creates(c, namespace) == 1
    assert progress == sorted(progress), progress  # never went back
    log = op.log()
    assert "Traceback" not in log, log[-3000:]
    for component, seconds in outages:
        print(
            f"RELIABILITY fault={component}-restart down={seconds:.0f}s attempts=1 "
            f"steps_lost=0 duplicate_jobs={job_creates(c, namespace) - 1}"
        )


# ---------------------------------------------------------------------------------------------
# 6. Status writes cannot clobber each other
# ---------------------------------------------------------------------------------------------
def test_a_stale_status_writer_gets_a_conflict_not_a_clobber(operator, namespace):
    """The live-status writer holds the status it last read; meanwhile another writer (a
    second replica, a reconcile elsewhere) records that the run ended. Before: the stale
    writer's merge patch put its old conditions and a Running-era progress over it."""
    from gft_operator.apply import Writer
    from gft_operator.cache import CACHE
    from gft_operator.kube import Kube, load_config
    from gft_operator.live import LIVE
    from gft_operator.runtime import lock
    from gft_operator.scraper import Target
    from gft_operator.trainer_metrics import parse

    c = operator.cluster
    operator.kill()  # this test is the only writer but for the one it plays
    try:
        apply(c, namespace, on_kwok("stale", podAnnotations={"gft.dev/kwok-keep-running": "1"}))
        kube = Kube(load_config(str(c.kubeconfig)))
        LIVE.writer, LIVE.lock = Writer(kube, "test", "test"), lock
        running = {
            "phase": "Running",
            "reason": "TrainerRunning",
            "podName": "stale-pod",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "TrainerRunning",
                    "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                },
            ],
        }
        path = kube.custom_path(namespace, "stale", "status")
        read = kube.request(
            "PATCH", path, body={"status": running}, content_type="application/merge-patch+json"
        )
        # The test plays the operator's watch: it has delivered the Running version only.
        CACHE.attach({"gft_finetunes": {(namespace, "stale"): [read]}})

        ended = {
            "phase": "Succeeded",
            "reason": "Completed",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "Completed",
                    "message": "",
                    "lastTransitionTime": "2026-01-01T00:01:00Z",
                },
                {
                    "type": "Complete",
                    "status": "True",
                    "reason": "Completed",
                    "message": "done",
                    "lastTransitionTime": "2026-01-01T00:01:00Z",
                },
            ],
        }
        kube.request(
            "PATCH", path, body={"status": ended}, content_type="application/merge-patch+json"
        )

        reading = parse(
            "gft_global_step 7\ngft_total_steps 20\ngft_train_loss 1.5\n"
            "gft_last_log_timestamp_seconds 1.7e9\n"
        )
        target = Target(namespace, "stale", "stale-pod", "198.18.0.9", 9090, 1, time.time())
        wrote = LIVE.write(target, reading, None)
        status = get_gft(c, namespace, "stale")["status"]
        assert not wrote
        assert status["phase"] == "Succeeded" and "progress" not in status, status
        assert [x["type"] for x in status["conditions"]] == ["Ready", "Complete"], status
    finally:
        LIVE.forget(namespace, "stale")
        LIVE.writer = LIVE.lock = None
        CACHE.attach({})
        operator.start()


def test_a_finetune_deleted_behind_a_late_watch_is_not_built_again(
    operator, namespace, monkeypatch
):
    """Found by the soak benchmark with the operator slowed down (tracemalloc on): the
    fine-tunes' watch fell minutes behind, and a fine-tune deleted meanwhile stayed in the
    cache. Every reconcile made its ConfigMap, Service and Job again (garbage collection took
    them away: their owner was gone) and failed on the status write's 404, for minutes, 410
    times in one run. Now the 404 says it is gone: hidden from the cache until the watch
    shows it gone, however late that is."""
    from gft_operator import cache, reconcile
    from gft_operator.apply import Writer
    from gft_operator.cache import CACHE
    from gft_operator.kube import Kube, load_config
    from gft_operator.runtime import RUNTIME

    c = operator.cluster
    operator.kill()  # this test plays the operator, with a watch that is behind
    # "Minutes" behind: no time alone may bring it back.
    monkeypatch.setattr(cache, "WRITE_MEMORY_SECONDS", 0.0)
    kube = Kube(load_config(str(c.kubeconfig)))
    made = ("get", "jobs,configmaps,services", "-n", namespace, "-o", "name",
            "-l", "finetune.gemma.dev/name=late")  # fmt: skip
    try:
        apply(c, namespace, on_kwok("late"))
        seen = get_gft(c, namespace, "late")
        c.kubectl("delete", "gemmafinetune", "late", "-n", namespace, "--wait=true")
        # The watch has delivered the fine-tune, not yet its deletion.
        CACHE.attach({"gft_finetunes": {(namespace, "late"): [seen]}})
        RUNTIME.kube, RUNTIME.writer = kube, Writer(kube, "gft-operator", "test")

        reconcile.reconcile(namespace, "late")  # before: the API server's 404 came out of here
        assert CACHE.finetune(namespace, "late") is None
        c.kubectl("delete", *made[1:], "--ignore-not-found", "--wait=true")  # what it made

        CACHE.expire()
        reconcile.reconcile(namespace, "late")  # the watch still shows it: nothing is made
        assert c.kubectl(*made).stdout.strip() == ""
        assert not CACHE.has("GemmaFineTune", namespace, "late")

        # The watch catches up, then a new fine-tune of that name (a new uid) is seen as new.
        CACHE.attach({"gft_finetunes": {}})
        CACHE.expire()
        again = {**seen, "metadata": {**seen["metadata"], "uid": "another-uid"}}
        CACHE.attach({"gft_finetunes": {(namespace, "late"): [again]}})
        assert CACHE.finetune(namespace, "late")["metadata"]["uid"] == "another-uid"

        # A known run (Running, its Job named) whose children and Job are gone with it: one
        # read confirms it is gone before anything is made again (before: made at once, and
        # if its status did not change, no 404 would ever have said so).
        apply(c, namespace, on_kwok("known"))
        running = {"phase": "Running", "reason": "TrainerRunning", "jobName": "known"}
        seen = kube.request(
            "PATCH",
            kube.custom_path(namespace, "known", "status"),
            body={"status": running},
            content_type="application/merge-patch+json",
        )
        c.kubectl("delete", "gemmafinetune", "known", "-n", namespace, "--wait=true")
        CACHE.attach({"gft_finetunes": {(namespace, "known"): [seen]}})
        creates = []
        create = Writer.create
        monkeypatch.setattr(Writer, "create", lambda w, *a: creates.append(a) or create(w, *a))
        reconcile.reconcile(namespace, "known")
        assert creates == []
        assert CACHE.finetune(namespace, "known") is None
    finally:
        RUNTIME.kube = RUNTIME.writer = None
        CACHE.attach({})
        operator.start()


# ---------------------------------------------------------------------------------------------
# 9. The flaky test's cause: an event from before the pod was placed
# ---------------------------------------------------------------------------------------------
def test_a_late_bound_claim_does_not_hide_a_missing_configmap(operator, namespace):
    """Under load the output claim bound after the scheduler had tried the pod once; its
    FailedScheduling event stayed and, listed first, hid the FailedMount that says what holds
    the pod. Here the claim's StorageClass appears only after the first scheduling attempt."""
    c = operator.cluster
    klass = f"late-{namespace[-5:]}"
    manifest = finetune(
        "late",
        dataset={"configMap": {"name": "no-such-records", "key": "train.jsonl"}},
        output={"pvc": {"size": "1Gi", "storageClassName": klass}},
        resources={
            "gpus": 1,
            "nodeSelector": {"gft.dev/runner": "true"},
            "tolerations": [{"key": "gft.dev/runner", "operator": "Exists"}],
        },
    )
    apply(c, namespace, manifest)
    wait_phase(c, namespace, "late", "Pending", "PersistentVolumeClaimNotBound", timeout=60)
    c.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {"name": klass},
                "provisioner": "kubernetes.io/host-path",
                "volumeBindingMode": "Immediate",
            }
        ),
    )
    try:
        status = wait_phase(c, namespace, "late", "Pending", "ConfigMapNotFound", timeout=90)
        assert "no-such-records" in status["message"]
    finally:
        c.kubectl("delete", "storageclass", klass, "--wait=false")
