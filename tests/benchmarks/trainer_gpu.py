"""GPU throughput of the trainer on real-size Gemma shapes with random weights, beside two plain
loops.

For each shape (Gemma 3 1B, Gemma 2 2B, Gemma 3 4B: the published configs), LoRA r=16 on all
linear layers with dropout 0.05 (gft-train's default), a bf16 base, the same examples (random
tokens with chat-like lengths: log-normal around 300 tokens, the first third of each a prompt
that is not learned) go through three loops:

- ``padded``: a plain transformers + peft loop: each step's examples padded to the longest, with
  an attention mask, the model's default attention kernel, bf16 autocast, torch's fused AdamW,
  grad clipping; no Liger;
- ``packed``: the same plain loop on the same packed rows gft-train makes (one row per packed
  row, positions restarting per example), the attention kernel gft-train picks; no Liger;
- ``ours``: what gft-train runs by default: ``GemmaTrainer`` with its ``TrainingArguments``
  (fused AdamW, DataLoader workers and pinned memory, gradient checkpointing as its memory plan
  decides), Liger's kernels applied to the model instance as gft-train applies them, and every
  monitoring callback.

Every loop sees the same examples in the same steps: a step is ``--batch`` packed rows of up to
``--seq`` tokens for ``packed`` and ``ours``, and exactly those examples, padded, for ``padded``.
Each (shape, loop) runs in a process of its own, so that nothing one loop patches or caches
(Liger's module-wide RoPE, compiled kernels, the allocator) reaches another. A step's time is
taken with the GPU's queue drained at both ends, the same way in every loop. Reported per loop:
median step time after the warm-up steps, tokens/s (real tokens, padding not counted), MFU
(model FLOPs over the GPU's peak: 4 x frozen parameters x tokens for LoRA, plus the attention
products), and peak memory (``torch.cuda.max_memory_allocated``, weights included).

    PYTHONPATH=tests python -m benchmarks.trainer_gpu [--steps 12] [--seq 2048] [--batch 1]
        [--peak-tflops 989] [--json results.json]   # H100/H200 SXM dense bf16
    PYTHONPATH=tests python -m benchmarks.trainer_gpu --tiny   # a smoke run on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gft_api.contract import DataSource, ModelSource, OutputSettings, TrainerConfig
from gft_api.training import Hyperparameters, Method, MethodType, Precision
from gft_trainer import data, liger, memory, modeling
from gft_trainer.callbacks import LogLine, StopOnSignal, TensorBoardScalars
from gft_trainer.metrics import PrometheusMetrics
from gft_trainer.signals import StopFlag
from gft_trainer.train import GemmaTrainer, plan, training_arguments
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, PrinterCallback

from benchmarks.trainer_cpu import WARMUP, StepTimer, sync

LOOPS = ("padded", "packed", "ours")
# Published shapes of the real models (random weights here), and the kernel transformers picks
# by default for each (the padded loop's).
SHAPES: dict[str, tuple[type, dict[str, Any], str]] = {
    "gemma-3-1b": (
        Gemma3TextConfig,
        dict(
            vocab_size=262144,
            hidden_size=1152,
            intermediate_size=6912,
            num_hidden_layers=26,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=512,
        ),
        "sdpa",
    ),
    "gemma-2-2b": (
        Gemma2Config,
        dict(
            vocab_size=256000,
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            sliding_window=4096,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
        ),
        "eager",
    ),
    "gemma-3-4b": (
        Gemma3TextConfig,
        dict(
            vocab_size=262208,
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=34,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            sliding_window=1024,
        ),
        "sdpa",
    ),
}
TINY = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    sliding_window=64,
)
LORA = Method.model_validate({"type": "lora", "lora": {"r": 16, "alpha": 16}})  # dropout 0.05


def examples(n: int, seq: int, vocab: int, mean: int) -> data.Tokens:
    """Random tokens with chat-like lengths; the first third of each example is an unlearned
    prompt."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(mean), 0.8, n).astype(int), 16, seq)
    out = []
    for length in lengths:
        ids = [2, *rng.integers(3, vocab, length - 1).tolist()]
        prompt = length // 3
        out.append(data.Example(ids, [data.IGNORE_INDEX] * prompt + ids[prompt:]))
    return data.Tokens.of(out)


def steps_of(tokens: data.Tokens, a: argparse.Namespace) -> list[tuple[int, int]]:
    """Each step's examples, as a range: ``--batch`` packed rows of up to ``--seq`` tokens."""
    bounds = data.pack_bounds(np.diff(tokens.offsets), a.seq)
    return [
        (int(bounds[i]), int(bounds[min(i + a.batch, len(bounds) - 1)]))
        for i in range(0, len(bounds) - 1, a.batch)
    ][: a.steps]


class Steps(torch.utils.data.Dataset):
    """The packed rows of the chosen steps, in order."""

    def __init__(self, tokens: data.Tokens, steps: list[tuple[int, int]], seq: int) -> None:
        self.rows = data.rows(tokens, True, seq)
        first, last = steps[0][0], steps[-1][1]
        self.index = [
            r
            for r in range(len(self.rows))
            if first <= self.rows.bounds[r] and self.rows.bounds[r + 1] <= last
        ]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.rows[self.index[i]]


def build(shape: str, tiny: bool, device: str, attention: str) -> tuple[Any, Any]:
    cls, kwargs, _ = SHAPES[shape]
    cfg = cls(**(TINY if tiny else kwargs), max_position_embeddings=8192)
    cfg.use_cache = False
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):  # random weights made where they are used
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attention)
    return model, cfg


def model_flops_per_token(model: Any, cfg: Any, seq: int) -> float:
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    attn = 2 * 2 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_dim
    return 4 * params + 2 * attn  # forward + backward through activations


def plain_loop(model: Any, batches: list[dict[str, torch.Tensor]], device: str) -> list[float]:
    """A plain loop: forward under bf16 autocast (on CUDA), backward, clip, fused AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    model.train()
    times = []
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        sync()
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
    return times


def run_ours(model: Any, dataset: Steps, kernels: Any, a: argparse.Namespace, work: Path) -> Any:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = TrainerConfig(
        model=ModelSource(name_or_path="random"),
        dataset=DataSource(train_files=["random"]),
        training=Hyperparameters(
            max_steps=len(dataset) // a.batch,
            batch_size=a.batch,
            gradient_accumulation_steps=1,  # a step is one micro-batch, as in the plain loops
            learning_rate=1e-4,
            logging_every_steps=1,
            precision=Precision.BF16 if device == "cuda" else Precision.FP32,
        ),
        output=OutputSettings(dir=str(work), checkpoint_every_steps=0),
    )
    precision = config.training.precision
    checkpointing = False
    if device == "cuda":
        run = memory.RunShape(
            method=MethodType.LORA,
            optimizer=config.training.optimizer,
            half=True,
            rows=a.batch,
            row_tokens=a.seq,
            attention=model.config._attn_implementation,
            liger_loss=kernels is not None,
            lora_dropout=True,
        )
        shape = memory.shape_of_model(model.get_base_model(), LORA)
        total = torch.cuda.get_device_properties(0).total_memory
        checkpointing = memory.plan(shape, run, None, total)
    args = training_arguments(
        config, plan(config, len(dataset), 1), precision, device == "cuda", False, checkpointing
    )
    args.dataloader_drop_last = False
    timer = StepTimer()
    callbacks = [
        TensorBoardScalars(work / "tb"),
        PrometheusMetrics("bench"),
        LogLine(),
        StopOnSignal(StopFlag()),
        timer,
    ]
    attention = model.config._attn_implementation
    trainer = InOrder(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=data.Collator(0, flatten=data.flattens(attention)),
        callbacks=callbacks,
        liger=kernels is not None,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    callbacks[0].close()
    return timer.times, checkpointing


class InOrder(GemmaTrainer):
    """GemmaTrainer with the rows in order (the plain loops take the same examples per step);
    its DataLoader is otherwise gft-train's (workers, pinned memory)."""

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> torch.utils.data.Sampler:
        return torch.utils.data.SequentialSampler(self.train_dataset)


def one(shape: str, loop: str, a: argparse.Namespace) -> dict[str, Any]:
    """One loop on one shape, in this process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cls, _, default_attention = SHAPES[shape]
    hw = modeling.Hardware.detect()
    model_type = cls.model_type
    attention = default_attention
    if loop != "padded":
        attention = modeling.choose_attention("auto", model_type, hw)
    model, cfg = build(shape, a.tiny, device, attention)
    kernels = modeling.choose_liger(None, model_type, hw) if loop == "ours" else None
    if kernels is not None:
        liger.apply(model, kernels)  # as modeling.load does: this model only
    model = modeling.apply_method(model, LORA)
    # Enough examples to fill every step's rows (a log-normal's mean is above its median).
    n = 2 * a.batch * (a.steps + 1) * a.seq // a.mean_len + 8
    tokens = examples(n, a.seq, cfg.vocab_size, a.mean_len)
    steps = steps_of(tokens, a)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    checkpointing = False
    if loop == "padded":
        one_each = data.TokenDataset(tokens, np.arange(len(tokens) + 1), packed=False)
        collate = data.Collator(0)
        batches = [collate([one_each[i] for i in range(f, t)]) for f, t in steps]
        times = plain_loop(model, batches, device)
    elif loop == "packed":
        rows = Steps(tokens, steps, a.seq)
        collate = data.Collator(0, flatten=data.flattens(attention))
        batches = [
            collate([rows[i] for i in range(s, min(s + a.batch, len(rows)))])
            for s in range(0, len(rows), a.batch)
        ]
        times = plain_loop(model, batches, device)
    else:
        with tempfile.TemporaryDirectory() as work:
            times, checkpointing = run_ours(
                model, Steps(tokens, steps, a.seq), kernels, a, Path(work)
            )
    learned = [int(tokens.offsets[last] - tokens.offsets[first]) for first, last in steps]
    step = statistics.median(times[WARMUP:])
    tokens_per_s = statistics.median(learned[WARMUP:]) / step
    flops = model_flops_per_token(model, cfg, a.mean_len) * tokens_per_s
    return {
        "shape": shape,
        "loop": loop,
        "pid": os.getpid(),
        "attention": attention,
        "liger": kernels is not None,
        "gradient_checkpointing": checkpointing,
        "steps": len(times),
        "step_s": step,
        "tokens_per_s": tokens_per_s,
        "mfu": flops / (a.peak_tflops * 1e12),
        "peak_gib": (torch.cuda.max_memory_allocated() if device == "cuda" else 0) / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1, help="packed rows per step")
    parser.add_argument("--mean-len", type=int, default=300, help="typical example length")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke run")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--json", type=Path, help="also write every result to this file")
    parser.add_argument("--one", nargs=2, metavar=("SHAPE", "LOOP"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.tiny:
        a.seq, a.batch, a.steps, a.mean_len = min(a.seq, 64), min(a.batch, 2), min(a.steps, 6), 12
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], a)))
        return
    cuda = torch.cuda.is_available()
    if not cuda and not a.tiny:
        raise SystemExit("no CUDA GPU here: real-size shapes need one (use --tiny for a smoke run)")
    print(
        f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, seq {a.seq}, batch {a.batch}, "
        f"steps {a.steps} (median after {WARMUP} warm-up), one process per shape and loop",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    argv = [
        *("--steps", str(a.steps), "--seq", str(a.seq), "--batch", str(a.batch)),
        *("--mean-len", str(a.mean_len), "--peak-tflops", str(a.peak_tflops)),
        *(["--tiny"] if a.tiny else []),
    ]
    for shape in a.shapes:
        got: dict[str, dict[str, Any]] = {}
        for loop in LOOPS:
            cmd = [sys.executable, "-m", "benchmarks.trainer_gpu", *argv, "--one", shape, loop]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(
                    f"{shape:11s} {loop:6s} FAILED (exit {done.returncode}):\n"
                    f"{done.stderr[-4000:]}",
                    flush=True,
                )
                results.append({"shape": shape, "loop": loop, "error": done.stderr[-4000:]})
                if a.json:
                    a.json.write_text(json.dumps(results, indent=1))
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            got[loop] = r
            results.append(r)
            if a.json:  # after each loop: a session cut short keeps what it measured
                a.json.write_text(json.dumps(results, indent=1))
            print(
                f"{shape:11s} {loop:6s} step {r['step_s']:.3f}s  {r['tokens_per_s']:,.0f} tokens/s"
                f"  MFU {r['mfu'] * 100:.1f}%  peak {r['peak_gib']:.1f} GiB  ({r['attention']}"
                f"{', Liger' if r['liger'] else ''}"
                f"{', checkpointing' if r['gradient_checkpointing'] else ''})",
                flush=True,
            )
        if "ours" in got:
            for base in ("padded", "packed"):
                if base in got:
                    speed = got["ours"]["tokens_per_s"] / got[base]["tokens_per_s"]
                    mem = got["ours"]["peak_gib"] / max(got[base]["peak_gib"], 1e-9)
                    print(
                        f"{shape:11s} ours/{base} tokens/s = {speed:.2f}x, peak memory {mem:.2f}x",
                        flush=True,
                    )
    failed = [f"{r['shape']}/{r['loop']}" for r in results if "error" in r]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
