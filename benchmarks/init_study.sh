#!/usr/bin/env bash
# OPERA from random weights vs OPERA continued from a MoCo-v3 (self-only) run of the same total
# epochs, on digits with 10% of the labels, for SEEDS seeds (the default digits recipe otherwise:
# resnet_tiny, batch 128, the kNN monitor at the end):
#   random:    opera run pretrain --hierarchy self,full --labels 10% --epochs EPOCHS
#   continued: opera run pretrain --hierarchy self --epochs EPOCHS/2, then
#              opera run pretrain --hierarchy self,full --labels 10% --epochs EPOCHS/2 --init <that run>/last.pt
# (the continued run takes the backbone, projector, predictor and momentum teacher; its class head,
# optimizer and schedules start fresh). Prints one line per run with the final kNN top-1 on the
# held-out split and the wall time.
#   EPOCHS=20 SEEDS="0 1 2" bash benchmarks/init_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS="${EPOCHS:-20}"; SEEDS="${SEEDS:-0 1 2}"; OUT="$(mktemp -d)"
HALF=$((EPOCHS / 2))
knn() { grep -o 'knn_top1=[0-9.]*' "$1" | tail -1 | cut -d= -f2; }
for seed in $SEEDS; do
  t0=$(date +%s.%N)
  python -m opera run pretrain --hierarchy self,full --labels 10% --epochs "$EPOCHS" --seed "$seed" \
    --output "$OUT/random-$seed" > "$OUT/random-$seed.log" 2>&1
  t1=$(date +%s.%N)
  echo "seed $seed random    epochs=$EPOCHS knn_top1=$(knn "$OUT/random-$seed.log") wall_s=$(echo "$t1 - $t0" | bc) load=$(cut -d' ' -f1-3 /proc/loadavg)"
  t0=$(date +%s.%N)
  python -m opera run pretrain --hierarchy self --epochs "$HALF" --seed "$seed" \
    --output "$OUT/mocov3-$seed" > "$OUT/mocov3-$seed.log" 2>&1
  python -m opera run pretrain --hierarchy self,full --labels 10% --epochs "$HALF" --seed "$seed" \
    --init "$OUT/mocov3-$seed/last.pt" --output "$OUT/continued-$seed" > "$OUT/continued-$seed.log" 2>&1
  t1=$(date +%s.%N)
  echo "seed $seed continued epochs=$HALF+$HALF self_knn_top1=$(knn "$OUT/mocov3-$seed.log") knn_top1=$(knn "$OUT/continued-$seed.log") wall_s=$(echo "$t1 - $t0" | bc) load=$(cut -d' ' -f1-3 /proc/loadavg)"
  grep -m1 "^read " "$OUT/continued-$seed.log" || true
done
rm -rf "$OUT"
