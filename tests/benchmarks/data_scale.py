"""CPU benchmark of the trainer's data pipeline at scale: examples/s and peak RSS.

Writes a chat JSONL of ``--examples`` records (varied lengths, a system turn in some; cached
under ``$GFT_CACHE/bench``), then runs the trainer's own pipeline on it in a fresh process,
twice: first with an empty tokenization cache (read, check, tokenize, pack, write the cache),
then again with the cache in place (as on a resume). Tokenized with the real Gemma 3 270M
tokenizer. Each run reports wall time, examples per second and the process's peak RSS.

    PYTHONPATH=tests .venv/bin/python -m benchmarks.data_scale [--examples 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORDS = [
    "the",
    "a",
    "model",
    "data",
    "train",
    "answer",
    "question",
    "short",
    "long",
    "kubernetes",
    "gemma",
    "token",
    "sky",
    "blue",
    "red",
    "capital",
    "city",
    "river",
    "number",
    "add",
    "plus",
    "minus",
    "seven",
    "eight",
    "nine",
    "madrid",
    "paris",
    "rome",
]


def dataset(examples: int) -> Path:
    from devcluster.gemma270m import cache_root

    path = cache_root() / "bench" / f"chat-{examples}.jsonl"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for i in range(examples):
            question = " ".join(rng.choices(WORDS, k=rng.randint(4, 40)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(2, 60)))
            turns = [{"role": "user", "content": f"{question}?"}]
            if i % 3 == 0:
                turns.insert(0, {"role": "system", "content": "Answer briefly."})
            turns.append({"role": "assistant", "content": answer})
            f.write(json.dumps({"messages": turns}) + "\n")
    tmp.rename(path)
    return path


CHILD = """
import json, resource, sys, time
from pathlib import Path
from gft_api.contract import DataShaping, DataSource
from gft_trainer import data
from transformers import AutoTokenizer

model, train_file, cache = sys.argv[1], sys.argv[2], sys.argv[3]
shaping = DataShaping(max_seq_length=2048, eval_fraction=0.01)
source = DataSource(train_files=[train_file])
tok = data.Tokenizer(AutoTokenizer.from_pretrained(model), generation=3)
t0 = time.monotonic()
prepared = data.load_prepared(tok, source, shaping, seed=0, packing=True, cache_dir=Path(cache))
seconds = time.monotonic() - t0
print(json.dumps({
    "seconds": round(seconds, 1),
    "examples": prepared.train_examples + prepared.eval_examples,
    "rows": len(prepared.train),
    "from_cache": prepared.from_cache,
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "workers": data.data_workers(prepared.train_examples) if not prepared.from_cache else 0,
    "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1_000_000)
    args = parser.parse_args()
    from devcluster.gemma270m import ensure_model

    model = ensure_model()
    path = dataset(args.examples)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "trainer-image"), str(REPO / "operator"), env.get("PYTHONPATH", "")]
    )
    with tempfile.TemporaryDirectory() as cache:
        for label in ("first run (tokenize, write the cache)", "second run (cache read)"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(model), str(path), cache],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()[-1]
            result = json.loads(out)
            rate = result["examples"] / max(result["seconds"], 1e-9)
            workers = (
                f" + {result['workers']} tokenizing workers of at most "
                f"{result['worker_peak_rss_mb']:,} MB each"
                if result["workers"] > 1
                else ""
            )
            print(
                f"{label}: {result['examples']:,} examples -> {result['rows']:,} rows in "
                f"{result['seconds']} s ({rate:,.0f} examples/s), peak RSS "
                f"{result['peak_rss_mb']:,} MB{workers}, from cache: {result['from_cache']}"
            )


if __name__ == "__main__":
    main()
