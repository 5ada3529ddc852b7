"""Fine-tunes that really train on the runner node: a tiny random Gemma 3 on CPU, the chat
data in tests/data, and helpers to look at what the run left (pods, logs, output volume)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from operator_process import wait_phase
from operator_samples import finetune

DATA = Path(__file__).resolve().parents[1] / "data" / "chat_small.jsonl"
STARTUP = 180  # seconds for a trainer process to import torch and load the model, on 2 busy cores


@pytest.fixture(scope="session")
def model_dir() -> Iterator[Path]:
    """A tiny Gemma 3 the runner's trainers read as ``model.path``: outside /tmp, which the
    training pod mounts a scratch emptyDir over (as a container's /tmp is its own)."""
    from trainer.tiny import make_model_dir

    root = Path(tempfile.mkdtemp(prefix="gft-test-models-", dir="/var/tmp"))
    try:
        yield make_model_dir(root, "gemma3_text")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# One torch thread per trainer: a tiny model's step is no faster with two, and each thread
# beyond the first spins on 2 cores shared by the suite's sessions (a third more CPU per run).
ONE_THREAD = {"name": "OMP_NUM_THREADS", "value": "1"}


def on_runner(name: str, model_dir: Path, max_steps: int = 30, gpus: int = 1, **spec):
    """A GemmaFineTune that really trains on the runner node."""
    spec.setdefault("output", {"checkpointEverySteps": 5, "pvc": {"size": "1Gi"}})
    spec["env"] = [ONE_THREAD, *spec.get("env", [])]
    return finetune(
        name,
        model={"name": "tiny-gemma3", "path": str(model_dir)},
        dataset={"path": str(DATA), "format": "chat", "maxSeqLength": 64, "evalFraction": 0},
        training={
            "maxSteps": max_steps,
            "batchSize": 2,
            "gradientAccumulationSteps": 1,
            "loggingEverySteps": 5,
        },
        resources={
            "gpus": gpus,
            "nodeSelector": {"gft.dev/runner": "true"},
            "tolerations": [
                {"key": "gft.dev/runner", "operator": "Exists", "effect": "NoSchedule"}
            ],
        },
        terminationGracePeriodSeconds=60,
        **spec,
    )


def output_dir(c, namespace: str, claim: str) -> Path:
    """The host folder behind the output claim (the host-path provisioner's PV)."""

    def bound():
        pvc = c.kubectl_json("get", "pvc", claim, "-n", namespace)
        return pvc["spec"].get("volumeName")

    pv = c.kubectl_json("get", "pv", wait_for(f"{claim} bound", bound))
    return Path(pv["spec"]["hostPath"]["path"])


def run_dir(c, namespace: str, name: str) -> Path:
    """The host folder of a fine-tune's run: its own folder (``status.outputPath``) on the
    output volume."""

    def path():
        st = c.kubectl_json("get", "gft", name, "-n", namespace).get("status") or {}
        return st.get("outputClaim") and st.get("outputPath") and st

    st = wait_for(f"{name}'s output folder in its status", path)
    return output_dir(c, namespace, st["outputClaim"]) / st["outputPath"]


def checkpoint_steps(out: Path) -> list[int]:
    """Steps of the complete checkpoints on the output volume (a folder still being written,
    or cut short by a kill, is not one: the trainer would not resume from it)."""
    from gft_trainer.checkpoints import is_valid

    return sorted(
        int(p.name.split("-")[-1]) for p in out.glob("checkpoints/checkpoint-*") if is_valid(p)
    )


def logged_losses(run: Path) -> dict[int, float]:
    """The logged training loss per step, from the newest checkpoint's trainer state (a
    resumed run carries the history of the attempts before it)."""
    newest = max(checkpoint_steps(run))
    state = json.loads(
        (run / "checkpoints" / f"checkpoint-{newest}" / "trainer_state.json").read_text()
    )
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def trainer_pids(pod: str) -> list[int]:
    """Processes of this machine that run the trainer of ``pod`` (the runner sets HOSTNAME)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"HOSTNAME={pod}".encode() in environ and b"gft-train" in cmdline:
            pids.append(int(proc.name))
    return pids


def running_pod(c, namespace, name) -> str:
    status = wait_phase(c, namespace, name, "Running", "TrainerRunning", timeout=STARTUP)
    return status["podName"]


def logs(c, namespace, pod) -> str:
    return c.kubectl("logs", "-n", namespace, pod, "-c", "trainer").stdout


def resumed_step(c, namespace, pod) -> int:
    """The step of the checkpoint the trainer of ``pod`` resumed from (its log says)."""
    text = logs(c, namespace, pod)
    assert "resuming from " in text, text[-2000:]
    return int(text.split("resuming from ")[1].split()[0].rsplit("-", 1)[1])


def wait_for_checkpoint(out: Path, timeout=STARTUP) -> int:
    return wait_for(
        "a checkpoint on the output volume",
        lambda: (checkpoint_steps(out) or [0])[-1],
        timeout=timeout,
    )
