"""What a packed micro-batch costs in attention: one flattened row against one row per packed row.

The collator used to join a micro-batch's packed rows into one row. With eager or SDPA attention
transformers then builds one dense block-diagonal mask over the whole batch, so attention costs
(rows x length)^2; kept as rows, each row gets its own mask and attention costs rows x length^2.
``flattened`` is that old layout (``Collator(flatten=True)``, which gft-train now uses only for
FlashAttention-2's varlen path), ``rows`` the layout gft-train uses for every other kernel.

A small random Gemma (LoRA r=16 on all linear layers, fp32, CPU) trains on ``--batch`` packed
rows of ``--seq`` tokens (random tokens, examples of chat-like lengths around 300 tokens) with
each layout. Every (layout, round) is a fresh process, the rounds alternate the layouts, and each
process reports its median step time (after a warm-up step) and its peak memory: the growth of
the process's resident set from just before the first step to its high-water mark.

    PYTHONPATH=tests .venv/bin/python -m benchmarks.packed_attention [--rounds 3] [--steps 3]
        [--batch 8] [--seq 1024] [--family gemma3_text|gemma2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

LAYOUTS = ("flattened", "rows")
# Attention kernel per family, as gft-train picks it on a machine without flash-attn.
KERNELS = {"gemma3_text": "sdpa", "gemma2": "eager"}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(layout: str, a: argparse.Namespace) -> dict[str, float]:
    """One layout in this process: median seconds per step and peak memory growth."""
    import torch
    from gft_api.training import Method
    from gft_trainer import data, modeling
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {"layer_types": ["sliding_attention", "full_attention"] * 2}
    if a.family == "gemma2":
        extra = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    cfg = AutoConfig.for_model(
        a.family,
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=a.seq,
        sliding_window=512,
        **extra,
    )
    cfg.use_cache = False
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=KERNELS[a.family])
    method = Method.model_validate({"type": "lora", "lora": {"r": 16, "alpha": 16}})
    model = modeling.apply_method(model, method)
    model.train()
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(300), 0.8, 40 * a.batch).astype(int), 16, a.seq)
    examples = []
    for n in lengths:
        ids = [2, *rng.integers(3, 1024, n - 1).tolist()]
        examples.append(data.Example(ids, ids))
    rows = data.pack(examples, a.seq)
    collate = data.Collator(0, flatten=layout == "flattened")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    before = rss_bytes()
    for step in range(a.steps + 1):
        batch = collate(rows[step * a.batch : (step + 1) * a.batch])
        t = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step is a warm-up
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    tokens = sum(len(r["input_ids"]) for r in rows[a.batch : (a.steps + 1) * a.batch])
    return {"step_s": statistics.median(times), "peak_bytes": peak, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--batch", type=int, default=8, help="packed rows per micro-batch")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per packed row")
    parser.add_argument("--family", choices=sorted(KERNELS), default="gemma3_text")
    parser.add_argument("--one", choices=LAYOUTS, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a)))
        return
    print(
        f"{a.family} ({KERNELS[a.family]} attention), batch {a.batch} x {a.seq}, "
        f"{a.steps} timed steps per process, {a.rounds} rounds",
        flush=True,
    )
    got: dict[str, list[dict[str, float]]] = {layout: [] for layout in LAYOUTS}
    base = [sys.executable, "-m", "benchmarks.packed_attention", *sys.argv[1:]]
    for r in range(a.rounds):
        for layout in LAYOUTS:
            done = subprocess.run([*base, "--one", layout], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{layout}: exit {done.returncode}\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            got[layout].append(result)
            print(
                f"round {r} {layout:9s} median step {result['step_s']:.3f}s, "
                f"peak +{result['peak_bytes'] / 2**20:,.0f} MiB",
                flush=True,
            )
    med = {
        layout: (
            statistics.median(x["step_s"] for x in runs),
            statistics.median(x["peak_bytes"] for x in runs),
        )
        for layout, runs in got.items()
    }
    for layout, (step, peak) in med.items():
        print(f"{layout:9s} median step {step:.3f}s, median peak +{peak / 2**20:,.0f} MiB")
    (fs, fp), (rs, rp) = med["flattened"], med["rows"]
    print(f"rows / flattened: step time {rs / fs:.3f}x, peak memory {rp / fp:.3f}x")


if __name__ == "__main__":
    main()
