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
# backward) and MFU = FLOPs per step / step time / peak. Then the end-to-end comparison of
# benchmarks/gpu_e2e.py (device vs worker augmentation). Hard limits of 250 s + 300 s are set
# below. Fails at once with "no CUDA device" without a GPU. The Python is benchmarks/gpu_bench.py
# and benchmarks/gpu_e2e.py (their code paths are tested on the CPU with --device cpu).
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

# 1) the step alone: img/s, MFU (arguments go to gpu_bench.py)
timeout 250 "$PYTHON" benchmarks/gpu_bench.py "$@"
# 2) end to end: the training loop's feed with the two-crop augmentation on the GPU vs in
#    the DataLoader workers, ResNet-50 and ViT-B/16 at 224 px, bf16 (channels_last for the CNN), on
#    1500 JPEGs cut from scikit-learn's photographs (shorter side 300-500 px); GPU_E2E_ARGS adds options.
timeout 300 "$PYTHON" benchmarks/gpu_e2e.py ${GPU_E2E_ARGS:-}
