#!/usr/bin/env bash
# Issue 15's GPU check: bf16 LoRA and full SFT of SmolLM2-135M-Instruct under every engine on the GPUs of
# this machine (torchrun, one process per GPU), then a table of tokens/s, MFU against the GPU's bf16 peak and
# peak CUDA memory per process. Exits non-zero when a run fails or its losses leave the ddp run's
# (bf16 rounding allowed: 2% per logged step).
#   scripts/gpu_check.sh                        # all GPUs; PEAK_TFLOPS=989 (H100/H200 SXM dense bf16) by default
#   NPROC=2 PEAK_TFLOPS=312 scripts/gpu_check.sh   # an A100: 312 TFLOPS dense bf16
# Needs: pip install -e '.[deepspeed]' (or DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8).
# A smoke run of the script itself on a CPU (gloo; MFU and CUDA memory are then meaningless):
#   NPROC=2 STEPS=3 MODEL=tiny-random EXTRA="data.max_length=128 train.micro_batch_size=2" scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
STEPS=${STEPS:-30}
OUT=${OUT:-/tmp/posttrain-gpu-check}
MODEL=${MODEL:-smollm2-135m-instruct}
EXTRA=${EXTRA:-}  # more key=value overrides, after the script's own
rm -rf "$OUT" && mkdir -p "$OUT"
declare -A ENGINE=([ddp]="train.distributed=ddp" [fsdp]="train.distributed=fsdp"
                   [zero2]="train.distributed=deepspeed train.deepspeed.zero_stage=2"
                   [zero3]="train.distributed=deepspeed train.deepspeed.zero_stage=3")
status=0
for method in lora full; do
  for engine in ddp fsdp zero2 zero3; do
    echo "== $method $engine ($NPROC processes)"
    # shellcheck disable=SC2086
    if ! $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m posttrain.cli train \
        examples/identity_lora.yaml method.type=$method ${ENGINE[$engine]} train.precision=bf16 \
        train.gradient_checkpointing=true train.max_steps="$STEPS" train.micro_batch_size=8 train.grad_accum=1 \
        data.max_length=1024 model.name_or_path="$MODEL" $EXTRA output.dir="$OUT/$method-$engine" \
        > "$OUT/$method-$engine.log" 2>&1; then
      echo "FAILED: see $OUT/$method-$engine.log"; tail -5 "$OUT/$method-$engine.log"; status=1
    fi
  done
done
$PY scripts/gpu_check_report.py "$OUT" --processes "$NPROC" --peak-tflops "$PEAK_TFLOPS" || status=1
exit $status
