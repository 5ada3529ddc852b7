"""A real fine-tune of Gemma 3 270M on the chat set shipped in tests/data, shared by every test
that needs it: eval loss falls and eval token accuracy rises, TensorBoard holds the scalars
(read back with TensorBoard's own reader), and /metrics serves them (prometheus-client parser).

The model is converted once from the GGUF package and cached (see ``gemma270m.py``).
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from gft_api.contract import TrainerSummary
from gft_trainer.launcher import free_port
from prometheus_client.parser import text_string_to_metric_families

from devcluster.gemma270m import ensure_model
from trainer.conftest import REPO, child_env, gft_train_cmd, write_config

# The module's first test pays for converting (once per machine) and training the real 270M:
# 95 s on CI's machine, past 300 s on this one while other suites ran beside it.
pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(600)]
STEPS = 12


@dataclass
class Run:
    out: Path
    returncode: int
    log: str
    summary: TrainerSummary
    metrics: dict[str, list]  # scraped mid-run


def scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


@pytest.fixture(scope="session")
def run270m(tmp_path_factory: pytest.TempPathFactory) -> Run:
    model = ensure_model()
    tmp = tmp_path_factory.mktemp("gemma270m")
    out = tmp / "out"
    cfg = write_config(
        tmp / "c.yaml",
        model,
        out,
        runName="e2e/gemma3-270m",
        data={"maxSeqLength": 128, "evalFraction": 0.2, "packing": True},
        method={
            "type": "lora",
            "mergeAdapter": True,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        },
        training={
            "maxSteps": STEPS,
            "batchSize": 2,
            "gradientAccumulationSteps": 1,
            "learningRate": 1e-3,
            "warmupRatio": 0.1,
            "loggingEverySteps": 3,
            "evalEverySteps": 6,
            "evalOnStart": True,
            "gradientCheckpointing": False,
            # Whole answers to check against, whatever this machine's decoding speed.
            "samples": {"maxShare": 0.5},
        },
        output={"dir": str(out), "checkpointEverySteps": 6, "keepCheckpoints": 1},
        observability={
            "metricsPort": free_port(),
            "metricsBindAddress": "127.0.0.1",
            "terminationMessagePath": str(tmp / "termination-log"),
        },
    )
    port_file = tmp / "port"
    proc = subprocess.Popen(
        gft_train_cmd(cfg, "--metrics-port-file", str(port_file)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(OMP_NUM_THREADS="2"),
        cwd=REPO,
    )
    lines, metrics = [], {}
    for line in proc.stdout:
        lines.append(line)
        if not metrics and re.search(r"INFO step \d+/", line):
            metrics = scrape(int(port_file.read_text()))  # live, mid-run
    proc.wait(timeout=60)
    log = "".join(lines)
    summary = TrainerSummary.from_termination_message((tmp / "termination-log").read_text())
    (tmp / "run.log").write_text(log)
    return Run(out, proc.returncode, log, summary, metrics)


def eval_history(run: Run) -> list[dict]:
    state = json.loads(
        (run.out / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text()
    )
    return [e for e in state["log_history"] if "eval_loss" in e]


def test_eval_loss_falls_and_accuracy_rises(run270m: Run) -> None:
    assert run270m.returncode == 0, run270m.log[-3000:]
    evals = eval_history(run270m)
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == STEPS
    report = {
        "eval_loss": [before["eval_loss"], after["eval_loss"]],
        "eval_token_accuracy": [before["eval_token_accuracy"], after["eval_token_accuracy"]],
    }
    print("gemma3-270m before/after:", json.dumps(report))
    assert after["eval_loss"] < 0.7 * before["eval_loss"]
    assert after["eval_token_accuracy"] > before["eval_token_accuracy"] + 0.1
    assert run270m.summary.eval_loss == pytest.approx(after["eval_loss"])
    assert (run270m.out / "adapter" / "adapter_model.safetensors").exists()


def test_tensorboard_holds_the_scalars(run270m: Run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run270m.out / "tensorboard" / "e2e" / "gemma3-270m"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/token_accuracy",
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_second",
        "train/samples_per_second",
        "train/step_time_seconds",
        "eval/loss",
        "eval/token_accuracy",
    } <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(3, STEPS + 1, 3))
    assert [e.step for e in acc.Scalars("eval/loss")] == [0, 6, 12]


def test_metrics_endpoint_served_live(run270m: Run) -> None:
    m = {name: s[0] for name, s in run270m.metrics.items() if s}
    for name in (
        "gft_train_loss",
        "gft_eval_loss",
        "gft_train_token_accuracy_ratio",
        "gft_eval_token_accuracy_ratio",
        "gft_learning_rate",
        "gft_global_step",
        "gft_total_steps",
        "gft_epoch",
        "gft_train_tokens",
        "gft_train_samples",
        "gft_tokens_per_second",
        "gft_eta_seconds",
    ):
        assert name in m, name
    assert m["gft_total_steps"].value == STEPS and m["gft_global_step"].value >= 3
    assert m["gft_train_tokens"].value > 0 and m["gft_train_loss"].labels == {
        "run": "e2e/gemma3-270m"
    }


def test_exports_load_from_the_volume_and_answer_as_trained(run270m: Run) -> None:
    """What a serving stack does: load the adapter onto the base, and the merged model on its
    own, from the output folder alone; both now answer in the trained form ("GEMMY SAYS: ..."),
    which the base never does. The prompt is a held-out evaluation record."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert run270m.returncode == 0, run270m.log[-3000:]
    (sample, *_) = [s for s in run270m.summary.samples if s.reference]
    assert sample.answer.startswith("GEMMY SAYS"), sample  # the run's own last sample
    tok = AutoTokenizer.from_pretrained(run270m.out / "adapter")
    messages = [{"role": "user", "content": sample.prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]

    def answer(model) -> str:
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False)
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    base = AutoModelForCausalLM.from_pretrained(ensure_model(), dtype=torch.float32)
    before = answer(base)
    adapted = answer(PeftModel.from_pretrained(base, run270m.out / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(run270m.out / "merged", dtype=torch.float32)
    after_merge = answer(merged)
    print("base:", repr(before), "| adapter:", repr(adapted), "| merged:", repr(after_merge))
    assert "GEMMY SAYS" not in before
    assert adapted.startswith("GEMMY SAYS") and after_merge.startswith("GEMMY SAYS")
    # The merged model stops at the end of its turn, as its generation_config says.
    assert merged.generation_config.eos_token_id and "<end_of_turn>" not in after_merge
