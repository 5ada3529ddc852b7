# ruff: noqa: F811  (pytest fixtures imported from operator_process are parameters here)
"""Live status with a real trainer on the runner node: while it trains, the GemmaFineTune's
status follows the trainer's own /metrics within one interval, with the operator reading the
pod IP and with it reading through the API server's pod proxy; ``kubectl get gft`` shows it;
the final summary stays in ``status.result``.

Freshness (trainer's logging step -> that step in the status) is measured here and printed as
one ``FRESHNESS`` line per access mode; docs/benchmarks.md records it.
"""

from __future__ import annotations

import json
import signal
import statistics
import time
import urllib.request

import pytest
from operator_process import (  # noqa: F401 (fixtures)
    TENSORBOARD_ON_RUNNER,
    apply,
    get_gft,
    installed,
    start_operator,
    wait_phase,
)
from prometheus_client.parser import text_string_to_metric_families
from runner_runs import (  # noqa: F401 (model_dir is a fixture)
    STARTUP,
    logged_losses,
    model_dir,
    on_runner,
    run_dir,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.e2e]

INTERVAL = 2.0
KEEP_TENSORBOARD = 40
STARTUP_GRACE = 5.0
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module", params=["pod-ip", "proxy"])
def live_operator(request, installed, tmp_path_factory):
    """The operator reading trainers' metrics every INTERVAL seconds, one way or the other."""
    access = request.param
    op = start_operator(
        installed,
        tmp_path_factory,
        "--metrics-interval",
        str(INTERVAL),
        "--metrics-access",
        access,
        "--metrics-startup-grace",
        str(STARTUP_GRACE),
        *TENSORBOARD_ON_RUNNER,
    )
    op.access = access  # type: ignore[attr-defined]
    yield op
    op.kill(signal.SIGTERM)


def scrape(url: str) -> dict[str, float]:
    with _NO_PROXY.open(url, timeout=5) as response:
        text = response.read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels or set(s.labels) == {"run"}
    }


def test_status_follows_the_trainer_within_one_interval(live_operator, namespace, model_dir):
    c = live_operator.cluster
    access = live_operator.access
    name = "live"
    total = 200
    manifest = on_runner(
        name,
        model_dir,
        max_steps=total,
        output={"checkpointEverySteps": 20, "pvc": {"size": "1Gi"}},
    )
    # Enough work per step that the run lasts many intervals even on an idle machine (about
    # 20 s alone here, 10 steps a second; a tiny model's plain step takes milliseconds),
    # logging every step.
    manifest["spec"]["training"].update(
        batchSize=4, gradientAccumulationSteps=8, loggingEverySteps=1
    )
    manifest["spec"]["tensorboard"] = {"keepAfterFinishSeconds": KEEP_TENSORBOARD}
    apply(c, namespace, manifest)
    status = wait_phase(c, namespace, name, "Running", "TrainerRunning", timeout=STARTUP)
    running_since = time.time()
    pod = c.kubectl_json("get", "pod", status["podName"], "-n", namespace)
    url = f"http://{pod['status']['podIP']}:9090/metrics"

    # Sample the trainer's endpoint and the status side by side while it trains.
    trainer: list[tuple[float, int, float, float | None]] = []  # (seen, step, logged_at, loss)
    seen_in_status: list[tuple[float, int, float | None]] = []  # (seen, step, loss)
    table = ""
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        try:
            m = scrape(url)
        except OSError:
            m = {}  # not serving yet, or finished
        if "gft_global_step" in m and "gft_last_log_timestamp_seconds" in m:
            trainer.append(
                (
                    time.time(),
                    int(m["gft_global_step"]),
                    m["gft_last_log_timestamp_seconds"],
                    m.get("gft_train_loss"),
                )
            )
        st = get_gft(c, namespace, name).get("status") or {}
        step = (st.get("progress") or {}).get("step")
        if step is not None and st.get("phase") == "Running":
            seen_in_status.append((time.time(), step, (st.get("metrics") or {}).get("loss")))
            if not table and step >= 5:
                table = c.kubectl("get", "gft", name, "-n", namespace).stdout
        if st.get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(0.25)

    steps_in_status = sorted({s for _, s, _ in seen_in_status})
    assert len(steps_in_status) >= 4, (steps_in_status, live_operator.log()[-3000:])
    assert len({s for _, s, _, _ in trainer}) >= 4

    # While the trainer serves, the step in the status is never older than one interval (plus
    # a second of slack) of the trainer's own numbers. (Once its process has exited, the status
    # keeps the last numbers read until the pod's end shows.)
    serving_until = trainer[-1][0]
    for t, step, _ in seen_in_status:
        if t > serving_until:
            continue
        before = [s for seen, s, _, _ in trainer if seen <= t - INTERVAL - 1.0]
        if before:
            assert step >= max(before), (t, step, max(before))
    # Freshness: for every step the trainer logged while the status was watched, the time from
    # that step to the first status showing it or a later one (steps come faster than the
    # interval, so most are overtaken: they count with the delay until the newer one shows).
    logged = {s: at for _, s, at, _ in trainer}
    watched_from = seen_in_status[0][0]
    delays = []
    for s, at in sorted(logged.items()):
        shown = [t for t, step, _ in seen_in_status if step >= s and t >= at]
        if at >= watched_from and shown and at <= serving_until:
            delays.append(min(shown) - at)
    assert len(delays) >= 4, (logged, seen_in_status)
    median = statistics.median(delays)
    print(
        f"FRESHNESS access={access} interval={INTERVAL}s steps={len(delays)} "
        f"median={median:.2f}s max={max(delays):.2f}s"
    )
    assert median <= INTERVAL + 1.0, delays

    # What a user sees at a glance.
    header, row = table.splitlines()[:2]
    assert header.split()[:6] == ["NAME", "PHASE", "MODEL", "METHOD", "PROGRESS", "LOSS"]
    cells = row.split()
    assert cells[1] == "Running" and float(cells[4]) > 0 and float(cells[5]) > 0, table

    status = wait_phase(c, namespace, name, "Succeeded", timeout=STARTUP)
    running_for = time.time() - running_since
    assert status["result"]["globalStep"] == total and status["result"]["trainLoss"] > 0
    assert status["progress"]["step"] == total and status["progress"]["percent"] == 100
    assert status["lastCheckpoint"]["step"] == total and status["lastCheckpoint"]["time"]
    metrics_condition = [c for c in status["conditions"] if c["type"] == "MetricsAvailable"]
    assert not metrics_condition  # it described a live endpoint; the run is over
    # The loss the status showed at each step, while the trainer served, is the loss the trainer
    # logged at that step. (Once the run has ended the status shows the run's mean train loss.)
    loss_at = logged_losses(run_dir(c, namespace, name))
    matched = [
        (loss, loss_at[s])
        for t, s, loss in seen_in_status
        if s in loss_at and loss and t <= serving_until
    ]
    assert matched, (seen_in_status, loss_at)
    wrong = [(a, b) for a, b in matched if abs(a - b) > 1e-5 * abs(b)]
    assert not wrong, wrong

    with _NO_PROXY.open(f"http://127.0.0.1:{live_operator.metrics_port}/metrics") as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    value = {(s.name, s.labels.get("kind")): s.value for f in families for s in f.samples}
    metrics_writes = value[("gft_operator_status_writes_total", "metrics")]
    # At most one live-status write per interval while it ran, and most steps seen were written.
    assert len(steps_in_status) / 2 <= metrics_writes <= running_for / INTERVAL + 1
    assert value[("gft_operator_status_update_lag_seconds_count", None)] >= len(steps_in_status) / 2

    if access == "pod-ip":  # TensorBoard after the run does not depend on how metrics are read
        tensorboard_after_the_run(c, namespace, name, status, total)


def test_a_trainer_whose_endpoint_is_down_gets_a_condition_saying_so(live_operator, namespace):
    """A pod on a KWOK node "runs" but nothing serves its address (the proving ground routes
    KWOK's pod range nowhere): after the start-up grace the condition says the endpoint cannot
    be read, and the operator carries on."""
    from conftest import wait_for
    from operator_samples import finetune

    manifest = finetune(
        "down", resources={"gpus": 0}, podAnnotations={"gft.dev/kwok-keep-running": "true"}
    )
    apply(c := live_operator.cluster, namespace, manifest)
    wait_phase(c, namespace, "down", "Running", "TrainerRunning", timeout=60)

    def condition():
        st = get_gft(c, namespace, "down").get("status") or {}
        found = [x for x in st.get("conditions") or [] if x["type"] == "MetricsAvailable"]
        return found[0] if found and found[0]["status"] == "False" else None

    cond = wait_for("MetricsAvailable=False", condition, timeout=STARTUP_GRACE + 30)
    pod_ip = c.kubectl_json("get", "pods", "-n", namespace)["items"][0]["status"]["podIP"]
    assert cond["reason"] == "MetricsUnreachable", cond
    assert "cannot be read" in cond["message"]
    where = pod_ip if live_operator.access == "pod-ip" else "pod proxy"
    assert where in cond["message"], cond
    assert "progress" not in get_gft(c, namespace, "down")["status"]
    with urllib.request.urlopen(f"http://127.0.0.1:{live_operator.port}/healthz", timeout=5):
        pass  # still healthy


def tensorboard_after_the_run(c, namespace: str, name: str, status: dict, total: int) -> None:
    """The sidecar stopped with the trainer; the same Service keeps answering from a
    TensorBoard Deployment until keepAfterFinishSeconds have passed, then it is removed."""
    from conftest import wait_for

    assert status["tensorboardURL"] == f"http://{name}.{namespace}.svc:6006/"
    scalars = (
        f"/api/v1/namespaces/{namespace}/services/{name}:tensorboard/proxy"
        f"/data/plugin/scalars/scalars?run={namespace}%2F{name}&tag=train%2Floss"
    )

    def loss_curve():
        got = c.kubectl("get", "--raw", scalars, check=False)
        return json.loads(got.stdout) if got.returncode == 0 else None

    curve = wait_for("TensorBoard behind the Service after the run", loss_curve, timeout=120)
    steps = [point[1] for point in curve]  # [wall_time, step, value]
    assert steps[-1] == total and len(steps) >= total // 2, steps
    assert all(point[2] > 0 for point in curve)
    owner = c.kubectl_json("get", "deployment", f"{name}-tb", "-n", namespace)
    assert owner["metadata"]["ownerReferences"][0]["kind"] == "GemmaFineTune"

    def removed():
        st = get_gft(c, namespace, name)["status"]
        gone = c.kubectl("get", "deployment", f"{name}-tb", "-n", namespace, check=False)
        return gone.returncode != 0 and "tensorboardURL" not in st

    wait_for(
        "TensorBoard removed after keepAfterFinishSeconds", removed, timeout=KEEP_TENSORBOARD + 60
    )
