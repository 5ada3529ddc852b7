#!/usr/bin/env bash
# One session on a lent GPU machine, in one call: install the kit over the machine's torch, say
# what the machine is, run the throughput table and the gpu-marked tests, and leave everything in
# $OUT. Such a machine has no registry, its own Python 3.12 and torch, and about 15 minutes; this
# stays within 8: the steps' time limits add up to 480 s (a step that fails or runs out is
# recorded, and the next one runs). With --tiny (a CPU, where the limits only catch hangs) they
# are longer.
#
#   make gpu-kit                                   # first, on a machine with a registry: .whl/
#   bash tests/benchmarks/gpu_session.sh           # there, from the checkout's root, OUT set
#   bash tests/benchmarks/gpu_session.sh --tiny    # the same steps, tiny, on any machine (CPU)
#
# Environment: OUT (default ./gpu-session-out), PYTHON (default python3), GFT_KIT (default
# .whl). Files in $OUT: env.txt, throughput.txt, throughput.json, gpu-tests.txt,
# gpu-tests.xml, steps.txt (each step's exit code and seconds).
set -uo pipefail

tiny=0
[ "${1:-}" = "--tiny" ] && tiny=1
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
OUT="${OUT:-$root/gpu-session-out}"
PYTHON="${PYTHON:-python3}"
kit="${GFT_KIT:-$root/.whl}"
mkdir -p "$OUT"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, record its exit code and time
    local name="$1" limit="$2"
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$OUT/steps.txt"
    return 0
}

: > "$OUT/steps.txt"

# 1. The kit: its wheels unpacked into a folder that goes first on PYTHONPATH (the machine's
# own packages stay; the kit's shadow them: transformers, peft, Liger, pydantic, pytest...).
step kit 40 "$PYTHON" tests/benchmarks/gpu_kit.py install "$kit" "$work/kit"
export PYTHONPATH="$work/kit:$root:$root/tests:$root/operator:$root/trainer-image"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

# 2. The machine: GPU, driver, compiler, versions, and whether Triton can build its launcher.
env_report() {
    echo "== date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(uname -srm)"
    echo "== nvidia-smi"
    nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv 2>&1 \
        || echo "(no nvidia-smi)"
    echo "== compiler: CC=${CC:-} gcc=$(command -v gcc || echo none) cc=$(command -v cc || echo none)"
    (gcc --version 2>/dev/null || cc --version 2>/dev/null) | head -1
    echo "== python and packages (the kit's where it has them)"
    "$PYTHON" - "$kit" <<'EOF'
import importlib.metadata as m
import pathlib
import sys

print(sys.version.replace("\n", " "))
names = ["torch", "triton", "transformers", "peft", "accelerate", "liger-kernel", "tokenizers",
         "safetensors", "pydantic", "numpy", "pytest", "flash-attn", "bitsandbytes"]
kit = pathlib.Path(sys.argv[1])
names += sorted({w.name.split("-")[0].replace("_", "-") for w in kit.glob("*.whl")} - set(names))
for name in names:
    try:
        dist = m.distribution(name)
        print(f"{name} {dist.version} ({pathlib.Path(str(dist.locate_file(''))).name})")
    except m.PackageNotFoundError:
        print(f"{name}: not installed")
try:
    import torch
    print("torch CUDA", torch.version.cuda, "available", torch.cuda.is_available(),
          "devices", torch.cuda.device_count())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("GPU", p.name, f"{p.total_memory / 2**30:.1f} GiB", "capability", p.major, p.minor,
              "bf16", torch.cuda.is_bf16_supported())
except Exception as e:
    print("torch:", type(e).__name__, e)
EOF
    echo "== Triton's compiler probe (python -m gft_trainer.toolchain)"
    "$PYTHON" -m gft_trainer.toolchain
}
export -f env_report
export kit PYTHON
step env 40 bash -c env_report > "$OUT/env.txt" 2>&1
tail -n 3 "$OUT/env.txt"

# 3. The throughput table: Gemma 3 1B, Gemma 2 2B, Gemma 3 4B shapes, random weights, one
# process per shape and loop (padded, packed, ours).
if [ "$tiny" = 1 ]; then
    bench=(--tiny --shapes gemma-3-1b) bench_limit=900 tests_limit=600
else
    bench=(--steps 10 --seq 2048 --batch 1) bench_limit=280 tests_limit=120
fi
step throughput "$bench_limit" "$PYTHON" -m benchmarks.trainer_gpu "${bench[@]}" \
    --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt"

# 4. The gpu-marked tests (on a machine without a GPU they are all skipped, with the reason).
# A test module that cannot be imported here (a package the kit leaves out) is reported and the
# others still run.
step gpu-tests "$tests_limit" "$PYTHON" -m pytest -m gpu tests/trainer -q -rs -p no:cacheprovider \
    --continue-on-collection-errors -o timeout=100 --junitxml "$OUT/gpu-tests.xml" 2>&1 \
    | tee "$OUT/gpu-tests.txt"

echo "== $OUT"
cat "$OUT/steps.txt"
