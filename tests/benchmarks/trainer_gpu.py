"""GPU throughput of the trainer on real-size Gemma shapes with random weights, beside a baseline.

For each shape (Gemma 2 2B, Gemma 3 1B), LoRA r=16 on all linear layers, bf16, the same rows of
random tokens (full sequences, no packing) and the same attention kernel (eager for Gemma 2, whose
soft-capping needs it; sdpa for Gemma 3), two loops run side by side:

- ``bare``: a plain transformers + peft loop (AdamW, grad clipping),
- ``ours``: ``GemmaTrainer`` with every monitoring callback gft-train runs with.

Reported per loop: median step time, tokens/s, MFU (model FLOPs per second over the GPU's peak;
LoRA counts 4 x params x tokens — forward plus the backward through the activations, as the frozen
weights get no gradient — plus the attention score/value products), and peak memory.

    PYTHONPATH=tests python -m benchmarks.trainer_gpu [--steps 20] [--seq 2048] [--batch 4]
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

import torch
from gft_trainer.callbacks import LogLine, StopOnSignal, TensorBoardScalars
from gft_trainer.metrics import PrometheusMetrics
from gft_trainer.signals import StopFlag
from gft_trainer.train import GemmaTrainer
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    PrinterCallback,
    TrainingArguments,
)

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


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def build(shape: str, tiny: bool, device: str) -> Any:
    cls, kwargs, attention = SHAPES[shape]
    cfg = cls(**(TINY if tiny else kwargs), max_position_embeddings=8192)
    cfg.use_cache = False
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attention)
    model.to(device)
    lora = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora), cfg


def model_flops_per_token(model: Any, cfg: Any, seq: int) -> float:
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    attn = 2 * 2 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_dim
    return 4 * params + 2 * attn  # forward + backward through activations


def run(loop: str, shape: str, a: argparse.Namespace, device: str, work: Path) -> dict:
    model, cfg = build(shape, a.tiny, device)
    rows = Rows(a.batch * (a.steps + 1), a.seq, cfg.vocab_size)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if loop == "bare":
        times = []
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        loader = torch.utils.data.DataLoader(rows, batch_size=a.batch)
        for batch in list(loader)[: a.steps]:
            batch = {k: v.to(device) for k, v in batch.items()}
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
        args = TrainingArguments(
            output_dir=str(work / "out"),
            max_steps=a.steps,
            per_device_train_batch_size=a.batch,
            learning_rate=1e-4,
            max_grad_norm=1.0,
            bf16=device == "cuda",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=device != "cuda",
            remove_unused_columns=False,
            prediction_loss_only=True,
            lr_scheduler_type="constant",
        )
        timer = StepTimer()
        prometheus = PrometheusMetrics("bench")
        callbacks = [
            TensorBoardScalars(work / "tb"),
            prometheus,
            LogLine(),
            StopOnSignal(StopFlag()),
            timer,
        ]
        trainer = GemmaTrainer(model=model, args=args, train_dataset=rows, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        callbacks[0].close()
        times = timer.times
    step = statistics.median(times[WARMUP:])
    tokens_per_s = a.batch * a.seq / step
    flops = model_flops_per_token(model, cfg, a.seq) * tokens_per_s
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
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke run")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    a = parser.parse_args()
    if a.tiny:
        a.seq, a.batch, a.steps = min(a.seq, 64), min(a.batch, 2), min(a.steps, 4)
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
                f"{shape:11s} ours/bare step time = "
                f"{got['ours']['step_s'] / got['bare']['step_s']:.3f}x"
            )


if __name__ == "__main__":
    main()
