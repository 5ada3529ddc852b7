#!/bin/sh
# Install the operator into a new virtual environment at $1, from operator/requirements.lock
# (every version and hash pinned) and this checkout. The Dockerfile runs exactly this;
# tests/test_images.py runs it into a temporary folder, since no image builder runs there.
# With $UV set (a uv binary), uv does the installing (the same lock, a shared cache).
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
install --require-hashes --no-deps -r "$root/operator/requirements.lock"
# The operator's packages only: pyproject.toml declares the trainer's and the client's too, so
# stubs stand in.
work="$(mktemp -d)"
cp "$root/pyproject.toml" "$root/README.md" "$work/"
mkdir -p "$work/operator" "$work/trainer-image/gft_trainer" "$work/client/gft"
cp -r "$root/operator/gft_api" "$root/operator/gft_operator" "$root/operator/gft_dashboard" "$work/operator/"
touch "$work/trainer-image/gft_trainer/__init__.py" "$work/client/gft/__init__.py"
install --no-deps "$work"
rm -rf "$work" "$venv/lib/python3"*/site-packages/gft_trainer "$venv/bin/gft-train" \
    "$venv/bin/gft-try" "$venv/lib/python3"*/site-packages/gft "$venv/bin/kubectl-gft"
