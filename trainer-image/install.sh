#!/bin/sh
# Install the trainer into a new virtual environment at $1, from trainer-image/requirements.lock
# (every version and hash pinned: torch, transformers, peft, bitsandbytes, datasets, TensorBoard)
# and this checkout. The Dockerfile runs exactly this; tests/test_images.py runs it into a
# temporary folder, since no image builder runs there. With $UV set, uv does the installing.
set -eu
venv="$1"
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -n "${UV:-}" ]; then
    "$UV" venv -q --python "${PYTHON:-python3}" "$venv"
    install() { VIRTUAL_ENV="$venv" "$UV" pip install -q "$@"; }
else
    "${PYTHON:-python3}" -m venv "$venv"
    install() { "$venv/bin/pip" install --no-cache-dir -q "$@"; }
fi
install --require-hashes --no-deps -r "$root/trainer-image/requirements.lock"
# The trainer's packages only: pyproject.toml declares the operator's and the client's too, so
# stubs stand in.
work="$(mktemp -d)"
cp "$root/pyproject.toml" "$root/README.md" "$work/"
mkdir -p "$work/operator/gft_operator" "$work/operator/gft_dashboard" "$work/trainer-image" \
    "$work/client/gft"
cp -r "$root/operator/gft_api" "$work/operator/"
cp -r "$root/trainer-image/gft_trainer" "$work/trainer-image/"
touch "$work/operator/gft_operator/__init__.py" "$work/operator/gft_dashboard/__init__.py" \
    "$work/client/gft/__init__.py"
install --no-deps "$work"
rm -rf "$work" "$venv/lib/python3"*/site-packages/gft_operator "$venv/bin/gft-operator" \
    "$venv/lib/python3"*/site-packages/gft_dashboard "$venv/bin/gft-dashboard" \
    "$venv/lib/python3"*/site-packages/gft "$venv/bin/kubectl-gft"
