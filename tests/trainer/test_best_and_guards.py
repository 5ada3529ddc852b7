"""``gft-train`` judging its own run: sample answers, the best checkpoint exported, early
stopping, and the divergence guard that keeps the last good checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from gft_api.contract import ExitCode
from gft_api.training import DatasetFormat, Samples
from gft_trainer import checkpoints, data, samples
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.conftest import CHAT, write_config
from trainer.test_cli import run_cli

ADAPTER = "adapter_model.safetensors"


def test_early_stop_exports_the_best_checkpoint_and_keeps_it(
    tmp_path: Path, tiny_gemma3: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Seeded (training.seed), and a learning rate high enough that the eval loss stalls after
    # step 4: no later evaluation beats it by more than minDelta.
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_gemma3,
        out,
        training={
            "maxSteps": 12,
            "evalEverySteps": 2,
            "learningRate": 0.05,
            "earlyStopping": {"patience": 2, "minDelta": 0.01},
            "samples": {"count": 2, "maxNewTokens": 8, "exactMatchExamples": 3, "maxShare": 1},
        },
        output={"dir": str(out), "checkpointEverySteps": 4, "keepCheckpoints": 1},
    )
    code, summary = run_cli(cfg)
    log = capfd.readouterr().out
    assert code == 0 and summary.outcome == "Succeeded" and summary.reason == "EarlyStopped"
    state = json.loads((out / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    losses = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    best = min(losses, key=lambda s: losses[s])
    assert best < summary.global_step < 12, losses  # it did stop early, after the best
    assert (summary.best_step, summary.exported_step) == (best, best)
    assert summary.best_eval_loss == pytest.approx(losses[best])
    assert f"best at step {best}" in summary.message and "exported the best" in summary.message
    # Rotation kept one newest checkpoint and, besides it, the best.
    names = [p.name for p in checkpoints.all_checkpoints(out / "checkpoints")]
    assert names == [f"checkpoint-{best}", f"checkpoint-{summary.global_step}"]
    exported = load_file(out / "adapter" / ADAPTER)
    at_best = load_file(out / "checkpoints" / f"checkpoint-{best}" / ADAPTER)
    last = load_file(out / "checkpoints" / f"checkpoint-{summary.global_step}" / ADAPTER)
    assert exported.keys() == at_best.keys()
    assert all(torch.equal(exported[k], at_best[k]) for k in exported)
    assert not all(torch.equal(exported[k], last[k]) for k in exported)
    # Samples: greedy answers to the first eval records, with their references.
    assert len(summary.samples) == 2 and all(s.reference for s in summary.samples)
    assert summary.eval_exact_match == 0.0  # a tiny random model answers nothing right
    assert "sample 1 at step 2:" in log and "exact_match 0.000" in log
    texts = _tensorboard_texts(out / "tensorboard")
    assert texts["samples/1"] and "**reference**" in texts["samples/1"][-1]


def _tensorboard_texts(root: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = next(p.parent for p in root.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    return {  # torch's SummaryWriter names a text tag <tag>/text_summary
        tag.removesuffix("/text_summary"): [
            e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)
        ]
        for tag in acc.Tags()["tensors"]
        if tag.startswith("samples/")
    }


def _nan_adapter(tmp_path: Path, tiny_gemma3: Path) -> Path:
    """An adapter whose weights are NaN: a run that starts from it diverges at its first step."""
    out = tmp_path / "seed"
    cfg = write_config(
        tmp_path / "seed.yaml", tiny_gemma3, out, training={"maxSteps": 1}, data={"evalFraction": 0}
    )
    assert run_cli(cfg)[0] == 0
    weights = load_file(out / "adapter" / ADAPTER)
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in weights.items()}, out / "adapter" / ADAPTER
    )
    return out / "adapter"


def test_nan_loss_stops_as_diverged_without_a_checkpoint_and_is_not_retried(
    tmp_path: Path, tiny_gemma3: Path
) -> None:
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_gemma3,
        out,
        training={"maxSteps": 6, "loggingEverySteps": 2},
        # A checkpoint is due at step 1, before the first log: the guard must refuse it.
        output={
            "dir": str(out),
            "checkpointEverySteps": 1,
            "resumeFrom": str(_nan_adapter(tmp_path, tiny_gemma3)),
        },
    )
    code, summary = run_cli(cfg)
    assert code == ExitCode.DIVERGED and code in (65, 66, 69, 77, 78, 79)
    assert summary.reason == "Diverged" and summary.outcome == "Failed"
    assert "diverged at step 1" in summary.message and "NaN or infinite" in summary.message
    assert "training.learningRate" in summary.message
    assert checkpoints.all_checkpoints(out / "checkpoints") == []
    assert not (out / "adapter").exists()
    # Started again on the same folder and config, it does not train into the same wall.
    code, again = run_cli(cfg)
    assert code == ExitCode.DIVERGED and "already diverged" in again.message


def test_samples_stay_within_their_time_budget(tiny_gemma3: Path) -> None:
    tok = data.Tokenizer(AutoTokenizer.from_pretrained(tiny_gemma3), 3)
    records = data.read_file(CHAT)
    settings = Samples(count=3, prompts=["Name a fruit."], maxNewTokens=4, maxSeconds=30)
    prompts = samples.collect(tok, settings, DatasetFormat.CHAT, records)
    assert [p.reference is None for p in prompts] == [True, False, False]
    assert prompts[0].shown == "Name a fruit." and prompts[1].reference
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3)
    model.train()
    long_ago = time.monotonic() - 1000  # the run began long ago: maxShare leaves 50 s
    sampler = samples.Sampler(tok, prompts, settings, [tok.eos_id], 128, started=long_ago)
    answers = sampler.run(model, 1)
    assert len(answers.samples) == 3 and answers.skipped == 0 and model.training
    assert answers.exact_match is None  # not asked for
    assert sampler.spent == answers.seconds > 0
    tight = Samples(count=3, maxNewTokens=4, maxSeconds=1e-9)
    answers = samples.Sampler(tok, prompts, tight, [tok.eos_id], 128, started=long_ago).run(
        model, 1
    )
    assert answers.skipped == 3 and answers.samples == []
    # maxShare: a run that began just now has no time to spare for samples yet.
    answers = samples.Sampler(tok, prompts, settings, [tok.eos_id], 128).run(model, 1)
    assert answers.skipped == 3


def test_samples_take_at_most_their_share_of_the_run() -> None:
    settings = Samples(maxSeconds=30, maxShare=0.05)
    now = time.monotonic()
    sampler = samples.Sampler(_FakeTok(), [], settings, [1], 128, started=now - 100)
    assert sampler.budget() == pytest.approx(5.0, abs=0.05)
    sampler.spent = 4.0
    assert sampler.budget() == pytest.approx(1.0, abs=0.05)
    sampler.started = now - 10_000
    assert sampler.budget() == 30.0  # maxSeconds caps one evaluation


class _FakeTok:
    eos_id = 1
    pad_id = 0


def test_a_sample_answer_is_never_cut_silently(tiny_gemma3: Path) -> None:
    """Issue 27, item 11: a held-out run's answers were cut after 14 tokens by the time budget
    and looked wrong. An answer the budget cuts says so (and is not scored for exact match);
    the run's final answers are whole, up to maxNewTokens, and say when that cut them."""
    tok = data.Tokenizer(AutoTokenizer.from_pretrained(tiny_gemma3), 3)
    records = data.read_file(CHAT)
    # A random model rarely says end-of-text: its answers run to maxNewTokens unless cut.
    settings = Samples(count=2, maxNewTokens=300, maxSeconds=0.05, exactMatchExamples=2)
    prompts = samples.collect(tok, settings, DatasetFormat.CHAT, records)
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3)
    long_ago = time.monotonic() - 1000
    sampler = samples.Sampler(tok, prompts, settings, [tok.eos_id], 512, started=long_ago)
    cut = sampler.run(model, 1)
    assert cut.samples and all(s.truncated == "timeBudget" for s in cut.samples), cut.samples
    assert cut.scored == 0 and cut.exact_match is None  # a cut answer is no answer to score
    whole = sampler.run(model, 2, whole=True)  # the run's last word: no time budget
    assert len(whole.samples) == 2
    for s in whole.samples:  # 300 tokens, trimmed to 240 characters for the status
        assert s.truncated == "maxNewTokens" and s.answer.endswith("..."), s
    # What the page and TensorBoard show says so too.
    assert "cut at training.samples.maxNewTokens" in samples.markdown(whole.samples[0])


def test_the_runs_final_samples_are_whole_whatever_the_budget(tmp_path: Path, tiny_gemma3: Path):
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_gemma3,
        out,
        training={
            "maxSteps": 4,
            "evalEverySteps": 2,
            "samples": {"count": 2, "maxNewTokens": 40, "maxSeconds": 0.001, "maxShare": 0.001},
        },
    )
    code, summary = run_cli(cfg)
    assert code == 0 and len(summary.samples) == 2, summary
    assert all(s.truncated != "timeBudget" and s.answer for s in summary.samples), summary.samples
