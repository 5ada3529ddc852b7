"""CPU benchmark of the trainer's training loop, measured side by side in one run.

Three loops train the same small random Gemma 3 (text) with the same LoRA settings on the same
packed rows (``tests/data/chat_small.jsonl`` through the trainer's own data pipeline):

- ``bare``: a plain transformers + peft loop (AdamW, linear schedule, grad clipping),
- ``ours-quiet``: ``GemmaTrainer`` (our Trainer subclass, with token accuracy) and no callbacks,
- ``ours``: ``GemmaTrainer`` with every monitoring callback the trainer runs with (TensorBoard,
  Prometheus, the log line, stop-on-signal), logging every step — the worst case.

Rounds alternate the three loops so that machine noise falls on all of them; each step's wall
time is recorded and the median over all rounds (after warm-up steps) is reported.

The monitoring's cost is also measured directly, free of the run-to-run noise that swamps a
1% difference between two loops: in ``ours`` every handler of every monitoring callback is
timed, and its time is divided by the training wall time after the warm-up steps (logging
included: the callbacks do most of their work in ``on_log``, after the step's own timer has
stopped).

    PYTHONPATH=tests .venv/bin/python -m benchmarks.trainer_cpu [--rounds 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from gft_api.contract import TrainerConfig
from gft_trainer import data, modeling
from gft_trainer.callbacks import LogLine, StopOnSignal, TensorBoardScalars
from gft_trainer.metrics import PrometheusMetrics
from gft_trainer.signals import StopFlag
from gft_trainer.train import GemmaTrainer, plan, training_arguments
from transformers import PrinterCallback, TrainerCallback, get_linear_schedule_with_warmup

REPO = Path(__file__).resolve().parents[2]
WARMUP = 2


def small_gemma3(root: Path) -> Path:
    """A random Gemma 3 text model big enough that a step is real work on 2 cores."""
    from trainer.tiny import make_tokenizer
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    tok = make_tokenizer()
    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        sliding_window=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    out = root / "gemma3-small"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def config_for(model_dir: Path, out: Path, steps: int) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "model": {"nameOrPath": str(model_dir), "attnImplementation": "eager"},
            "dataset": {"trainFiles": [str(REPO / "tests/data/chat_small.jsonl")]},
            "data": {"format": "chat", "evalFraction": 0, "maxSeqLength": 256, "packing": True},
            "method": {"type": "lora", "lora": {"r": 16, "alpha": 16, "dropout": 0.0}},
            "training": {
                "maxSteps": steps,
                "batchSize": 2,
                "gradientAccumulationSteps": 1,
                "learningRate": 1e-4,
                "warmupRatio": 0.0,
                "gradientCheckpointing": False,
                "precision": "fp32",
                "loggingEverySteps": 1,
            },
            "output": {"dir": str(out), "checkpointEverySteps": 0},
            "observability": {"metricsPort": 0},
        }
    )


def sync() -> None:
    """Wait for the GPU's queued work (nothing on CPU): a step's time must include the kernels
    it launched, not leave its backward to be paid inside the next step's window."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Each optimizer step's wall time, from its first forward to the end of its optimizer
    step, the GPU's queue drained at both ends (as the plain loops time theirs)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        sync()
        self._t = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        sync()
        self.times.append(time.perf_counter() - self._t)


class HandlerClock(TrainerCallback):
    """Wall time spent inside the per-step handlers of the given callbacks, and the training
    wall time it is part of, both after the warm-up steps (setup such as opening the
    TensorBoard file is paid once per run, not per step). Put it last among the callbacks."""

    ONCE = ("on_init_end", "on_train_begin", "on_train_end")

    def __init__(self, callbacks: list[TrainerCallback]) -> None:
        self.seconds = 0.0
        self.wall = 0.0
        for callback in callbacks:
            for name in dir(callback):
                if name.startswith("on_") and name not in self.ONCE:
                    setattr(callback, name, self._timed(getattr(callback, name)))

    def _timed(self, handler: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return handler(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == WARMUP:
            self.seconds, self.wall = 0.0, -time.perf_counter()

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        self.wall += time.perf_counter()


def load(config: TrainerConfig):
    loaded = modeling.load(
        config.model, config.method, config.training.precision, None, modeling.Hardware.detect()
    )
    loaded.model.config.use_cache = False
    tok = data.Tokenizer(loaded.tokenizer, loaded.generation)
    records = data.read_and_check(config.dataset, config.data, config.training.seed)
    prepared = data.prepare(tok, records, config.data, True)
    collator = data.Collator(tok.pad_id, modeling.needs_token_type_ids(loaded.model))
    return loaded, prepared, collator


def run_ours(
    config: TrainerConfig, monitored: bool, workdir: Path
) -> tuple[list[float], float | None]:
    """Step times, and for the monitored loop the share of training wall time spent in the
    monitoring callbacks."""
    torch.manual_seed(config.training.seed)
    loaded, prepared, collator = load(config)
    p = plan(config, len(prepared.train), 1)
    args = training_arguments(config, p, loaded.precision, False, False)
    timer = StepTimer()
    callbacks: list[Any] = [timer]
    prometheus = None
    clock = None
    if monitored:
        prometheus = PrometheusMetrics("bench")
        prometheus.serve("127.0.0.1", 0)
        monitoring = [
            TensorBoardScalars(workdir / "tb"),
            prometheus,
            LogLine(),
            StopOnSignal(StopFlag()),
        ]
        clock = HandlerClock(monitoring)
        callbacks = [*monitoring, timer, clock]
    trainer = GemmaTrainer(
        model=loaded.model,
        args=args,
        train_dataset=prepared.train,
        data_collator=collator,
        processing_class=loaded.tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # as gft-train does
    trainer.train()
    if prometheus:
        prometheus.shutdown()
    for cb in callbacks:
        if isinstance(cb, TensorBoardScalars):
            cb.close()
    return timer.times, clock.seconds / clock.wall if clock else None


def run_bare(config: TrainerConfig) -> list[float]:
    torch.manual_seed(config.training.seed)
    loaded, prepared, collator = load(config)
    model = loaded.model
    model.train()
    h = config.training
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=h.learning_rate, weight_decay=h.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, h.max_steps)
    loader = torch.utils.data.DataLoader(
        prepared.train, batch_size=h.batch_size, shuffle=True, collate_fn=collator
    )
    times: list[float] = []
    batches = iter(loader)
    for _ in range(h.max_steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, h.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict[str, list[float]] = {"bare": [], "ours-quiet": [], "ours": []}
    shares: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = small_gemma3(root)
        for r in range(args.rounds):
            for name in results:
                work = root / f"{name}-{r}"
                config = config_for(model_dir, work, args.steps)
                share = None
                if name == "bare":
                    times = run_bare(config)
                else:
                    times, share = run_ours(config, name == "ours", work)
                results[name] += times[WARMUP:]
                line = f"round {r} {name:10s} median step {statistics.median(times[WARMUP:]):.4f}s"
                if share is not None:
                    shares.append(share)
                    line += f", {share * 100:.3f}% of training wall time in monitoring"
                print(line, flush=True)
    med = {name: statistics.median(t) for name, t in results.items()}
    print(f"\nsteps per loop: {len(results['bare'])} (after {WARMUP} warm-up steps per round)")
    for name, m in med.items():
        print(f"{name:10s} median seconds/step {m:.4f}")
    print(f"ours / bare              = {med['ours'] / med['bare']:.3f}x")
    print(f"ours-quiet / bare        = {med['ours-quiet'] / med['bare']:.3f}x")
    print(
        f"monitoring cost (ours / ours-quiet - 1) = "
        f"{(med['ours'] / med['ours-quiet'] - 1) * 100:+.2f}%"
    )
    print(
        f"monitoring's own time (timed handlers / training wall time), logging every step: "
        f"median {statistics.median(shares) * 100:.3f}%, max {max(shares) * 100:.3f}% "
        f"over {len(shares)} rounds"
    )


if __name__ == "__main__":
    main()
