"""GPU throughput of the trainer on real-size Gemma shapes with random weights, beside a baseline.

For each shape (Gemma 2 2B, Gemma 3 1B, Gemma 3 4B), LoRA r=16 on all linear layers, bf16, the
same examples (random tokens with chat-like lengths: log-normal around 300 tokens, the first
third of each a prompt that is not learned) go through two loops side by side:

- ``bare``: a plain transformers + peft loop: each step's examples padded to the longest, with an
  attention mask, the model's default kernel, AdamW, grad clipping;
- ``ours``: what gft-train runs by default: the trainer's own data path (packed rows of up to
  ``--seq`` tokens flattened padding-free into one row per micro-batch), the kernel it picks,
  its ``TrainingArguments`` (fused AdamW and Liger's kernels on CUDA, gradient checkpointing
  as configured) and
  ``GemmaTrainer`` with every monitoring callback.

Both loops see the same examples in the same steps: a step is ``--batch`` packed rows for ours
and exactly those examples, padded, for bare. Reported per loop: median step time, tokens/s (real
tokens, padding not counted), MFU (model FLOPs per second over the GPU's peak; LoRA counts
4 x frozen params x tokens plus the attention products), and peak memory.

    PYTHONPATH=tests python -m benchmarks.trainer_gpu [--steps 20] [--seq 2048] [--batch 1]
        [--peak-tflops 989]   # H100/H200 SXM dense bf16
    PYTHONPATH=tests python -m benchmarks.trainer_gpu --tiny   # a smoke run on CPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gft_api.contract import DataSource, ModelSource, OutputSettings, TrainerConfig
from gft_api.training import Hyperparameters, Method, Precision
from gft_trainer import data, modeling
from gft_trainer.callbacks import LogLine, StopOnSignal, TensorBoardScalars
from gft_trainer.metrics import PrometheusMetrics
from gft_trainer.signals import StopFlag
from gft_trainer.train import GemmaTrainer, plan, training_arguments
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, PrinterCallback

from benchmarks.trainer_cpu import WARMUP, StepTimer

# Published shapes of the real models (random weights here).
SHAPES: dict[str, tuple[type, dict[str, Any], str]] = {
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


def padded(tokens: data.Tokens, first: int, last: int, device: str) -> dict[str, torch.Tensor]:
    """Examples ``first:last`` as a plain loop batches them: padded to the longest, masked."""
    one = data.TokenDataset(tokens, np.arange(len(tokens) + 1), packed=False)
    return {
        k: v.to(device) for k, v in data.Collator(0)([one[i] for i in range(first, last)]).items()
    }


class Steps(torch.utils.data.Dataset):
    """The packed rows of the chosen steps, in order, for ``GemmaTrainer``."""

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

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[self.index[i]]


def build(shape: str, tiny: bool, device: str, ours: bool) -> Any:
    cls, kwargs, default_attention = SHAPES[shape]
    cfg = cls(**(TINY if tiny else kwargs), max_position_embeddings=8192)
    cfg.use_cache = False
    model_type = cfg.model_type
    attention = default_attention
    if ours:
        attention = modeling.choose_attention("auto", model_type, modeling.Hardware.detect())
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attention)
    model.to(device)
    if ours:
        method = Method.model_validate({"type": "lora", "lora": {"r": 16, "alpha": 16}})
        return modeling.apply_method(model, method), cfg
    lora = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora), cfg


def model_flops_per_token(model: Any, cfg: Any, seq: int) -> float:
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    attn = 2 * 2 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_dim
    return 4 * params + 2 * attn  # forward + backward through activations


def run(loop: str, shape: str, a: argparse.Namespace, device: str, work: Path) -> dict:
    model, cfg = build(shape, a.tiny, device, ours=loop == "ours")
    # Enough examples to fill every step's rows (a log-normal's mean is above its median).
    n = 2 * a.batch * (a.steps + 1) * a.seq // a.mean_len + 8
    tokens = examples(n, a.seq, cfg.vocab_size, a.mean_len)
    steps = steps_of(tokens, a)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if loop == "bare":
        times = []
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        for first, last in steps:
            batch = padded(tokens, first, last, device)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    else:
        config = TrainerConfig(
            model=ModelSource(name_or_path="random"),
            dataset=DataSource(train_files=["random"]),
            training=Hyperparameters(
                max_steps=len(steps),
                batch_size=a.batch,
                gradient_accumulation_steps=1,  # a step is one micro-batch, as in bare
                learning_rate=1e-4,
                logging_every_steps=1,
                precision=Precision.BF16 if device == "cuda" else Precision.FP32,
            ),
            output=OutputSettings(dir=str(work), checkpoint_every_steps=0),
        )
        dataset = Steps(tokens, steps, a.seq)
        precision = Precision.BF16 if device == "cuda" else Precision.FP32
        # Liger's kernels as gft-train picks them by default: on wherever there is CUDA.
        liger = modeling.choose_liger(None, cfg.model_type, modeling.Hardware.detect())
        args = training_arguments(
            config, plan(config, len(dataset), 1), precision, device == "cuda", False, None, liger
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
        trainer = GemmaTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=data.Collator(0),
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.get_train_dataloader = lambda: torch.utils.data.DataLoader(  # in order, as bare
            dataset, batch_size=a.batch, collate_fn=data.Collator(0)
        )
        trainer.train()
        callbacks[0].close()
        times = timer.times
    learned = [int(tokens.offsets[last] - tokens.offsets[first]) for first, last in steps]
    step = statistics.median(times[WARMUP:])
    tokens_per_s = statistics.median(learned[WARMUP:]) / step
    flops = model_flops_per_token(model, cfg, a.mean_len) * tokens_per_s
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "step_s": step,
        "tokens_per_s": tokens_per_s,
        "mfu": flops / (a.peak_tflops * 1e12),
        "peak_gib": peak / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1, help="packed rows per step")
    parser.add_argument("--mean-len", type=int, default=300, help="typical example length")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke run")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    a = parser.parse_args()
    if a.tiny:
        a.seq, a.batch, a.steps, a.mean_len = min(a.seq, 64), min(a.batch, 2), min(a.steps, 12), 12
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not a.tiny:
        raise SystemExit("no CUDA GPU here: real-size shapes need one (use --tiny for a smoke run)")
    print(
        f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, "
        f"seq {a.seq}, batch {a.batch}, steps {a.steps} (median after {WARMUP} warm-up)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for shape in a.shapes:
            got = {
                loop: run(loop, shape, a, device, Path(tmp) / f"{shape}-{loop}")
                for loop in ("bare", "ours")
            }
            for loop, r in got.items():
                print(
                    f"{shape:11s} {loop:5s} step {r['step_s']:.3f}s  "
                    f"{r['tokens_per_s']:,.0f} tokens/s  MFU {r['mfu'] * 100:.1f}%  "
                    f"peak {r['peak_gib']:.1f} GiB"
                )
            print(
                f"{shape:11s} ours/bare tokens/s = "
                f"{got['ours']['tokens_per_s'] / got['bare']['tokens_per_s']:.2f}x, peak memory "
                f"{got['ours']['peak_gib'] / max(got['bare']['peak_gib'], 1e-9):.2f}x"
            )


if __name__ == "__main__":
    main()
