"""What a run costs (issue 27, item 8): GPU-seconds and energy, measured by each pod's trainer,
summed over pods and attempts into ``status.result.cost``; and through the real trainer with a
stand-in NVML (300 W per GPU), the energy is that power integrated over the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gft_api.contract import TrainerSummary
from gft_trainer import cost
from prometheus_client import CollectorRegistry, generate_latest

from trainer.conftest import run_gft_train, write_config

FAKE_NVML = Path(__file__).resolve().parents[1] / "operator" / "fake_nvml"


def meter(folder: Path, pod: str, gpus: int, watts, counter=None, started: float = 100.0):
    return cost.Meter(
        folder,
        pod,
        started=started,
        interval=3600,  # the tests bring it forward themselves (sample(now))
        gpus=lambda: gpus,
        power=lambda n: watts(n) if callable(watts) else watts,
        energy_counter=lambda n: counter() if counter else None,
    )


def test_power_is_integrated_and_pods_and_attempts_add_up(tmp_path: Path) -> None:
    folder = tmp_path / "cost"
    # Pod 0: two GPUs at 300 W (600 W together) for 100 s.
    m = meter(folder, "run-0", 2, 600.0).start()
    m.sample(now=150.0)
    m.sample(now=200.0)
    assert m.totals().gpu_seconds == pytest.approx(200.0)
    assert m.totals().energy_joules == pytest.approx(60_000.0)
    m._stop.set()
    m.flush()
    # The same pod's next process carries on from its file; pod 1 (one GPU, 200 W) is another.
    again = meter(folder, "run-0", 2, 600.0, started=1000.0).start()
    again.sample(now=1010.0)
    other = meter(folder, "run-1", 1, 200.0, started=1000.0).start()
    again._stop.set()
    other._stop.set()
    again.flush()
    run = other.stop(now=1036.0)
    assert run.gpu_seconds == pytest.approx(200 + 20 + 36)
    assert run.gpu_hours == pytest.approx(256 / 3600, abs=1e-6)
    assert run.energy_wh == pytest.approx((60_000 + 6_000 + 7_200) / 3600, abs=1e-3)
    # This process's own share is what Prometheus counts (the earlier process's is not).
    registry = CollectorRegistry()
    registry.register(again)
    text = generate_latest(registry).decode()
    assert "gft_gpu_seconds_total 20.0" in text and "gft_gpu_energy_joules_total 6000.0" in text


def test_the_energy_counter_wins_and_a_gpu_without_power_leaves_energy_unknown(
    tmp_path: Path,
) -> None:
    readings = iter([5_000.0, 5_900.0])  # joules, since the driver loaded
    m = meter(tmp_path / "a", "p", 1, 123.0, counter=lambda: next(readings)).start()
    m.sample(now=110.0)
    assert m.totals().energy_joules == pytest.approx(900.0)
    m.energy_counter = lambda n: None  # its two readings are spent; stop() reads once more
    m.stop(now=110.0)
    blind = meter(tmp_path / "b", "p", 1, None).start()
    blind.sample(now=110.0)
    assert blind.stop(now=110.0).energy_wh is None
    cpu = meter(tmp_path / "c", "p", 0, None).start()
    run = cpu.stop(now=130.0)
    assert run.gpu_seconds == 0 and run.energy_wh is None


@pytest.mark.slow  # a real (tiny) run in a process of its own
def test_the_real_trainer_reports_its_cost_in_the_summary(
    tmp_path: Path, tiny_gemma3: Path
) -> None:
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml", tiny_gemma3, out, training={"maxSteps": 4}, data={"evalFraction": 0}
    )
    done = run_gft_train(cfg, env={"PYTHONPATH": f"{FAKE_NVML}:{_path()}", "HOSTNAME": "pod-a"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = TrainerSummary.from_termination_message(
        (tmp_path / "out.termination-log").read_text()
    )
    assert summary is not None and summary.cost is not None, summary
    # One stand-in GPU drawing 300 W from the trainer's start to its end.
    assert summary.cost.gpu_seconds >= summary.runtime_seconds * 0.95
    assert summary.cost.gpu_seconds <= summary.runtime_seconds + 5
    assert summary.cost.energy_wh == pytest.approx(300 * summary.cost.gpu_seconds / 3600, rel=0.02)
    written = json.loads((out / "cost" / "pod-a.json").read_text())
    assert written["gpus"] == 1 and written["gpuSeconds"] == pytest.approx(
        summary.cost.gpu_seconds, abs=0.01
    )


def _path() -> str:
    import os

    return os.environ.get("PYTHONPATH", "")
