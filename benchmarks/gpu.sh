#!/usr/bin/env bash
# GPU throughput and model-FLOPs utilisation (MFU) of opera's pretraining step.
#
#   bash benchmarks/gpu.sh                      # H100 / H200: the bf16 peak is detected
#   bash benchmarks/gpu.sh --peak-tflops 312    # any other card: its dense bf16 peak
#   bash benchmarks/gpu.sh --steps 30 --models resnet50,deit_small
#
# For ResNet-50, ViT-S/16 (deit_small) and ViT-B/16 (deit_base) at 224 px, in bf16 (the step's
# CUDA autocast), it runs opera.engine.step.train_step (both views online forward+backward, both
# through the momentum encoder, LARS or AdamW, EMA) on random images already on the GPU, and
# prints images/s, ms/step, peak GPU memory, the FLOPs of one step counted by
# torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention; forward and
# backward) and MFU = FLOPs per step / step time / peak. Finishes well within 8 minutes on one
# H100 (a hard limit of 470 s is set below). Fails at once with "no CUDA device" without a GPU.
# The Python is benchmarks/gpu_bench.py (its code paths are tested on the CPU with --device cpu).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.stderr.write("benchmarks/gpu.sh: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine\n")
    sys.exit(3)
EOF
then
    exit 3
fi

exec timeout 470 "$PYTHON" benchmarks/gpu_bench.py "$@"
