#!/usr/bin/env bash
# Wall time of the default digits run (cpu_digits recipe: OPERA self,full, resnet_tiny, batch 128),
# with data.augment_on=workers (the per-image PretrainTransform in the main process) and with
# data.augment_on=device (digits on the device once, the batched two-crop; the default), alternating.  EPOCHS=20 is the README's full run; REPEATS alternations.
#   EPOCHS=3 REPEATS=2 bash benchmarks/digits_wall.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS="${EPOCHS:-20}"; REPEATS="${REPEATS:-2}"; OUT="$(mktemp -d)"
for r in $(seq "$REPEATS"); do
  for mode in workers device; do
    t0=$(date +%s.%N)
    python -m opera run pretrain --epochs "$EPOCHS" --set data.augment_on=$mode --output "$OUT/$mode-$r" > "$OUT/$mode-$r.log" 2>&1
    t1=$(date +%s.%N)
    knn=$(grep -o 'knn_top1=[0-9.]*' "$OUT/$mode-$r.log" | tail -1 || true)
    echo "repeat $r augment_on=$mode epochs=$EPOCHS wall_s=$(echo "$t1 - $t0" | bc) $knn load=$(cut -d' ' -f1-3 /proc/loadavg)"
  done
done
rm -rf "$OUT"
