#!/usr/bin/env bash
# Create .venv (if missing) and install posttrain with its pinned stack. torch==2.13.0 is pinned in
# pyproject.toml beside everything that depends on it, so pip never pulls a CUDA build by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".${extra:+[$extra]}"
