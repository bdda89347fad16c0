#!/usr/bin/env bash
# Every CPU figure of BENCHMARKS.md, in the order they were made; outputs in benchmarks/results/.
#   bash benchmarks/run_cpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
mkdir -p "$R"
log() { echo "== $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg): $*" | tee -a "$R/suite.log"; }

log compare
python benchmarks/compare.py --repeats 2 --steps 8 --warmup 3 --threads 2 --json "$R/compare_t2.json" > "$R/compare_t2.txt" 2>&1

for t in 2 1; do
  log "ab threads $t"
  python benchmarks/ab_step.py --threads $t --backbone resnet18 --img-size 64 --batch-size 64 --mlp-dim 1024 \
      --variants official opera:channels_last=0 opera --rounds 6 --warmup 3 > "$R/ab_resnet18_t$t.txt" 2>&1
  python benchmarks/ab_step.py --threads $t --backbone resnet50 --img-size 64 --batch-size 32 --mlp-dim 1024 \
      --variants official opera:channels_last=0 opera --rounds 6 --warmup 3 > "$R/ab_resnet50_t$t.txt" 2>&1
  python benchmarks/ab_step.py --threads $t --backbone vit_tiny --patch-size 8 --img-size 64 --batch-size 64 --mlp-dim 1024 \
      --variants official opera --rounds 6 --warmup 3 > "$R/ab_vit_tiny_t$t.txt" 2>&1
done

for t in 2 1; do
  log "micro threads $t"
  for b in resnet18 resnet50; do
    python benchmarks/micro_update.py --backbone $b --threads $t --rounds 9 > "$R/micro_${b}_t$t.txt" 2>&1
  done
  python benchmarks/micro_update.py --backbone vit_tiny --patch-size 8 --threads $t --rounds 9 > "$R/micro_vit_tiny_t$t.txt" 2>&1
done

log data
D=/tmp/opera-bench-jpegs
[ -d "$D" ] || python -c "import sys; sys.path.insert(0, 'benchmarks'); from data_pipeline import make_jpeg_folder; make_jpeg_folder('$D', 128, (500, 375))"
python benchmarks/data_pipeline.py --folder "$D" --img-size 224 --batch-size 32 --batches 4 --workers 0 --json > "$R/data_w0.json" 2>&1
python benchmarks/data_pipeline.py --folder "$D" --img-size 224 --batch-size 32 --batches 4 --workers 2 --json > "$R/data_w2.json" 2>&1

log "compile"
timeout 1800 python benchmarks/ab_step.py --threads 1 --backbone vit_tiny --patch-size 8 --img-size 64 --batch-size 64 \
    --mlp-dim 1024 --variants opera opera:compile=1 --rounds 5 --warmup 3 > "$R/ab_vit_tiny_compile_t1.txt" 2>&1
log done

# after the suite: the headline table with the final code (keys after the
# online forward)
log "ab final (2 threads, a quiet spell: load ~0.3-1.7)"
python benchmarks/ab_step.py --threads 2 --backbone vit_tiny --patch-size 8 --img-size 64 --batch-size 64 --mlp-dim 1024 \
    --variants official opera --rounds 6 --warmup 3 > "$R/ab_vit_tiny_t2_final.txt" 2>&1
python benchmarks/ab_step.py --threads 2 --backbone resnet50 --img-size 64 --batch-size 32 --mlp-dim 1024 \
    --variants official opera:channels_last=0 opera --rounds 6 --warmup 3 > "$R/ab_resnet50_t2_final.txt" 2>&1
python benchmarks/ab_step.py --threads 2 --backbone resnet18 --img-size 64 --batch-size 64 --mlp-dim 1024 \
    --variants official opera:channels_last=0 opera --rounds 6 --warmup 3 > "$R/ab_resnet18_t2_final.txt" 2>&1

log "compare final"
python benchmarks/compare.py --repeats 3 --steps 8 --warmup 3 --threads 2 --json "$R/compare_t2_final.json" > "$R/compare_t2_final.txt" 2>&1
log done

# per-view backward (default), its joint counterpart, the roofline, bf16 autocast on the CPU
log "compare per view / joint"
python benchmarks/compare.py --repeats 3 --steps 8 --warmup 3 --threads 2 --json "$R/compare_t2_perview.json" > "$R/compare_t2_perview.txt" 2>&1
python benchmarks/compare.py --repeats 3 --steps 8 --warmup 3 --threads 2 --opera-args="--joint-views --no-roofline" \
    --json "$R/compare_t2_joint.json" > "$R/compare_t2_joint.txt" 2>&1
log "ab per view and bf16"
for c in "resnet18 --batch-size 64" "resnet50 --batch-size 32" "vit_tiny --patch-size 8 --batch-size 64"; do
  n=${c%% *}
  python benchmarks/ab_step.py --threads 2 --backbone $c --img-size 64 --mlp-dim 1024 \
      --variants official opera:per_view=0 opera --rounds 6 --warmup 3 > "$R/ab_${n}_t2_perview.txt" 2>&1
  python benchmarks/ab_step.py --threads 2 --backbone $c --img-size 64 --mlp-dim 1024 \
      --variants official opera opera:amp=bf16 --rounds 5 --warmup 3 > "$R/ab_${n}_t2_bf16.txt" 2>&1
done
log "peaks"
python -c "import torch; torch.set_num_threads(2); from opera.bench import compute_peak_gflops
for i in range(3): print({k: round(v, 1) for k, v in compute_peak_gflops(torch.device('cpu')).items()})" > "$R/peaks_t2.txt" 2>&1
log "device augmentation backends, end to end, digits wall time"
python benchmarks/augment_backends.py --path crops --img-size 64 --batch-size 64 --threads 1 --rounds 5 --no-per-image >> "$R/augment_backends.txt" 2>&1
python benchmarks/augment_backends.py --path sources --img-size 64 --side 96 --batch-size 64 --threads 1 --rounds 5 >> "$R/augment_backends.txt" 2>&1
[ -d /tmp/jpeg16 ] || python -m opera data make-folder /tmp/jpeg16 --n 2000
python benchmarks/e2e_compare.py --data /tmp/jpeg16 --sizes 64,112,224 --steps 10,4,2 --warmup 2 --repeats 3 \
    --json "$R/e2e_compare.json" > "$R/e2e_compare.txt" 2>&1
EPOCHS=20 REPEATS=1 bash benchmarks/digits_wall.sh > "$R/digits_wall_20ep.txt" 2>&1
log done
