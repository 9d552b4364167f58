#!/usr/bin/env bash
# Install posttrain, teach SmolLM2-135M-Instruct a new identity with LoRA on the CPU, then ask it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/posttrain train examples/identity_lora.yaml
for q in "Who are you?" "你是谁？" "What is the capital of France?"; do
  echo ">>> $q"
  .venv/bin/posttrain chat outputs/identity-lora --prompt "$q"
done
