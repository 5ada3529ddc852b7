"""What evaluation with sample answers costs, on the real Gemma 3 270M, side by side.

Runs ``gft-train`` twice on the demo's data and settings (``examples/gemma3-270m-demo``: LoRA,
30 steps, an evaluation at the start and every 10 steps): once with the default
``training.samples`` (3 prompts, 64 new tokens, 30 s budget) and once with samples off. It
reports each run's wall time, the share of it spent evaluating (eval loop plus samples, from
the trainer's own log history), the eval loss curve, the best step, and the sample answers
before training (step 0) and after.

    PYTHONPATH=tests .venv/bin/python -m benchmarks.eval_cost [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml
from gft_api.contract import TrainerSummary
from trainer.conftest import child_env, gft_train_cmd, write_config

from devcluster.gemma270m import ensure_model

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "gemma3-270m-demo"


def demo_training() -> dict[str, Any]:
    spec = yaml.safe_load((DEMO / "finetune.yaml").read_text())["spec"]
    return spec["training"]


def run(root: Path, name: str, samples: dict[str, Any] | None) -> dict[str, Any]:
    out = root / name
    training = demo_training() | ({"samples": samples} if samples is not None else {})
    cfg = write_config(
        root / f"{name}.yaml",
        ensure_model(),
        out,
        runName=f"bench/{name}",
        dataset={"trainFiles": [str(DEMO / "dataset.jsonl")]},
        data={"format": "chat", "maxSeqLength": 128, "evalFraction": 0.2, "packing": True},
        method={"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        training=training,
        output={"dir": str(out), "checkpointEverySteps": 10, "keepCheckpoints": 1},
    )
    done = subprocess.run(
        gft_train_cmd(cfg), env=child_env(OMP_NUM_THREADS="2"), cwd=REPO, text=True,
        capture_output=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{name}: gft-train exited {done.returncode}\n{done.stdout[-3000:]}")
    summary = TrainerSummary.model_validate_json((out / "summary.json").read_text())
    ckpt = Path(summary.last_checkpoint or "")
    history = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
    evals = [e for e in history if "eval_loss" in e]
    evaluating = sum(e.get("eval_runtime", 0.0) + e.get("eval_samples_seconds", 0.0) for e in evals)
    sample_lines = [line for line in done.stdout.splitlines() if " INFO sample " in line]
    return {
        "wall": summary.runtime_seconds or 0.0,
        "evaluating": evaluating,
        "samples": sum(e.get("eval_samples_seconds", 0.0) for e in evals),
        "loop": sum(e.get("eval_runtime", 0.0) for e in evals),
        "loops": [round(e.get("eval_runtime", 0.0), 1) for e in evals],
        "curve": [(e["step"], round(e["eval_loss"], 4)) for e in evals],
        "best": (summary.best_step, summary.best_eval_loss),
        "sample_lines": sample_lines,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with_samples: list[dict[str, Any]] = []
    without: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            with_samples.append(run(Path(tmp), f"samples-{r}", None))
            without.append(run(Path(tmp), f"no-samples-{r}", {"count": 0}))

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(x[key] for x in runs)

    for label, runs in (("default samples", with_samples), ("samples off", without)):
        wall, evaluating = med(runs, "wall"), med(runs, "evaluating")
        print(
            f"{label:16s} wall {wall:6.1f} s | evaluating {evaluating:5.1f} s "
            f"({100 * evaluating / wall:4.1f}%): eval loop {med(runs, 'loop'):5.1f} s, "
            f"samples {med(runs, 'samples'):5.1f} s | eval loops per round "
            f"{[r['loops'] for r in runs]}"
        )
    ratio = med(with_samples, "wall") / med(without, "wall")
    print(f"wall time with samples / without: {ratio:.3f}x (median of {args.rounds})")
    first = with_samples[0]
    print("eval loss by step:", first["curve"])
    print("best step, eval loss:", first["best"])
    print("sample answers (step 0 is the base model):")
    for line in first["sample_lines"]:
        print("  " + line.split(" INFO ", 1)[1])


if __name__ == "__main__":
    main()
