# ruff: noqa: F811  (pytest fixtures imported from operator_process are parameters here)
"""Trainers whose /metrics misbehave, on the proving ground: four fine-tunes run on KWOK nodes
and fake trainers answer at their pod addresses (``devcluster.fake_trainers``). Once all
four show live numbers, three trainers turn slow, broken (HTTP 500) and garbage; each gets a
MetricsAvailable condition that says so, while the healthy one keeps advancing at the interval,
and a trainer that recovers is read again.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest
from conftest import wait_for
from operator_process import (  # noqa: F401 (fixtures)
    apply,
    get_gft,
    installed,
    start_operator,
)
from operator_samples import finetune

from devcluster.fake_trainers import kwok_pods_served

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

INTERVAL = 1.0
TIMEOUT = 0.5
NAMES = ("healthy", "slow", "broken", "garbage")


@pytest.fixture(scope="module")
def reading_operator(installed, tmp_path_factory):
    op = start_operator(
        installed,
        tmp_path_factory,
        "--metrics-interval",
        str(INTERVAL),
        "--metrics-timeout",
        str(TIMEOUT),
        "--metrics-access",
        "pod-ip",
    )
    yield op
    op.kill(signal.SIGTERM)


def metrics_condition(c, namespace: str, name: str) -> dict | None:
    status = get_gft(c, namespace, name).get("status") or {}
    found = [x for x in status.get("conditions") or [] if x["type"] == "MetricsAvailable"]
    return found[0] if found else None


def test_bad_endpoints_get_a_condition_and_never_stall_the_others(
    reading_operator, namespace, tmp_path
):
    c = reading_operator.cluster
    behaviours = tmp_path / "behaviours.json"
    with kwok_pods_served(time.time(), behaviours):
        for name in NAMES:
            manifest = finetune(
                name,
                resources={"gpus": 0},
                tensorboard={"enabled": False},
                podAnnotations={"gft.dev/kwok-keep-running": "true"},
            )
            apply(c, namespace, manifest)

        def all_live():
            return all(
                (metrics_condition(c, namespace, n) or {}).get("status") == "True" for n in NAMES
            )

        wait_for("all four trainers read", all_live, timeout=60)
        pods = c.kubectl_json("get", "pods", "-n", namespace)["items"]
        name_label = "finetune.gemma.dev/name"
        ip = {p["metadata"]["labels"][name_label]: p["status"]["podIP"] for p in pods}
        behaviours.write_text(
            json.dumps({ip["slow"]: "slow", ip["broken"]: "error", ip["garbage"]: "garbage"})
        )

        expected = {
            "slow": ("MetricsTimeout", f"did not answer within {TIMEOUT:g} s"),
            "broken": ("MetricsUnreachable", "HTTP 500 Internal Server Error"),  # not its words
            "garbage": ("MetricsInvalid", "not the Prometheus text format"),
        }
        for name, (reason, says) in expected.items():
            cond = wait_for(
                f"{name}: MetricsAvailable=False",
                lambda n=name: (
                    (x := metrics_condition(c, namespace, n)) and x["status"] == "False" and x
                ),
                timeout=30,
                on_timeout=lambda: reading_operator.log()[-4000:],
            )
            assert cond["reason"] == reason and says in cond["message"], cond
            assert ip[name] in cond["message"]

        # Meanwhile the healthy trainer is read at the interval, slow neighbour or not.
        steps = set()
        deadline = time.monotonic() + 6 * INTERVAL
        while time.monotonic() < deadline:
            steps.add(get_gft(c, namespace, "healthy")["status"]["progress"]["step"])
            time.sleep(0.2)
        assert len(steps) >= 4, steps
        assert metrics_condition(c, namespace, "healthy")["status"] == "True"

        # A trainer that recovers is read again and its condition clears.
        behaviours.write_text(json.dumps({ip["broken"]: "error", ip["garbage"]: "garbage"}))
        wait_for(
            "slow: MetricsAvailable=True again",
            lambda: (metrics_condition(c, namespace, "slow") or {}).get("status") == "True",
            timeout=30,
        )

    log = reading_operator.log()
    assert "Traceback" not in log, log[-3000:]
    url = f"http://127.0.0.1:{reading_operator.port}/healthz"
    with urllib.request.urlopen(url, timeout=5):
        pass
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{reading_operator.metrics_port}/metrics", timeout=5
    ).read()
    for reason in ("timeout", "unreachable", "invalid"):
        line = f'gft_operator_metrics_read_failures_total{{reason="{reason}"}}'.encode()
        value = next(x for x in metrics.splitlines() if x.startswith(line)).split()[-1]
        assert float(value) >= 1, reason
