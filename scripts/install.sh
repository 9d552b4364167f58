#!/usr/bin/env bash
# Create .venv (if missing) and install posttrain with its pinned stack. torch==2.13.0 is pinned in
# pyproject.toml beside everything that depends on it, so pip never pulls a CUDA build by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
base=$(echo ",$extra," | sed 's/,deepspeed,/,/g; s/^,*//; s/,*$//')  # deepspeed: below, not through pip's isolation
.venv/bin/python -m pip install -q -e ".${base:+[$base]}"
# DeepSpeed (the `deepspeed` extra; the test extra too, so the ZeRO tests run in CI) is an sdist whose setup.py
# imports torch: built against this venv's torch (no build isolation) without its compiled ops (DS_BUILD_OPS=0;
# ZeRO on a CPU needs none, and train/engines/zero.py keeps DeepSpeed from JIT-compiling its shm op). ~20 s.
if [[ ",$extra," == *,test,* || ",$extra," == *,deepspeed,* ]]; then
    pin=$(.venv/bin/python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["deepspeed"][0])')
    DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation "$pin"
fi
