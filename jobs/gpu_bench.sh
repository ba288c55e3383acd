#!/bin/bash
# The GPU performance check of issue 8, in one run on any CUDA machine (6 minutes on an H200 with
# LK_BENCH_COMPILE=1, 2026-12-04):
#   bash jobs/gpu_bench.sh                 # results in bench-gpu/gpu_bench.jsonl (+ nvidia-smi.txt, logs)
#   LK_BENCH_OUT=/somewhere LK_BENCH_COMPILE=1 bash jobs/gpu_bench.sh
# 1. synthesizes LK_BENCH_N images at 224 px and packs them (stored at the training size: the loader
#    decodes 224 px JPEGs and never resizes), 1 shard per 500 images so 16 workers each stream several;
# 2. `bench step resnet18`: the model alone, fp32 vs bf16/fp16 autocast, channels_last (batch 256, 224 px);
# 3. `bench aug`: each preset beside a resnet18 step (batch 256, 224 px);
# 4. `bench e2e resnet18`: the real loop, bf16 + channels_last + derm preset + 16 loader workers, beside
#    the step of the same model/batch in the same run (goal: e2e >= 0.9x step, >= 8,000 images/s on an H100),
#    with a torch.profiler table of one pass (e2e_profile.txt); again without augmentation (the loader alone)
#    and with the JPEGs decoded on the GPU (`--decode device`: the workers only read bytes);
# 5. `bench loader`: the shard stream from disk and over HTTP with the same workers, and the CPU ms per image
#    of read + decode + collate at 224 px with the loader cores the measured e2e rate needs (issue 16);
#    and the stream with `decode=device` (workers read bytes, nvJPEG decodes each batch on the GPU), with
#    the largest pixel difference between nvJPEG and the CPU decode of the same images (issue 21);
# 6. optional, LK_BENCH_COMPILE=1: `bench step` again with torch.compile rows (compiling takes minutes);
# 7. optional part `threads`: the e2e loop again with torch's one thread per core in the training process
#    (train's auto gives it 1 on a GPU: its CPU-side augmentation parameter math contended with the workers
#    for the cores), with its profile (e2e_threads_profile.txt), and with 2 fewer loader workers.
# LK_BENCH_PARTS picks the parts, in order (default "step aug e2e loader", + "compile" with LK_BENCH_COMPILE=1):
#   LK_BENCH_PARTS="e2e threads" bash jobs/gpu_bench.sh  # the e2e loop and its variants only (~4 min)
# Every benchmark appends one JSON line (host, torch, device name, all parameters) to the same file.
# A failing step is logged and the next one still runs (GPU time is scarce: one broken case must not cost
# the others); the script exits 1 naming the failed steps.
# LK_BENCH_DEVICE=cpu LK_BENCH_N=600 LK_BENCH_BATCH=8 LK_BENCH_SIZE=64 LK_BENCH_WORKERS=2 runs the same
# steps on a CPU in a few minutes (LK_BENCH_PRECISION=fp32: faster there): a rehearsal of the plumbing before
# a GPU lease (its figures mean nothing).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
LK=${LK_BENCH_LESIONKIT:-$REPO/.venv/bin/lesionkit}
[ -x "$LK" ] || LK=$(command -v lesionkit) || { echo "no lesionkit executable (set LK_BENCH_LESIONKIT)" >&2; exit 2; }
OUT=${LK_BENCH_OUT:-$REPO/bench-gpu}
N=${LK_BENCH_N:-16000}           # 62 batches of 256: 40-step passes never run short, several seconds each
WORKERS=${LK_BENCH_WORKERS:-16}
DEVICE=${LK_BENCH_DEVICE:-cuda}
BATCH=${LK_BENCH_BATCH:-256}
SIZE=${LK_BENCH_SIZE:-224}
PRECISION=${LK_BENCH_PRECISION:-bf16}  # of the e2e runs
DATA=${LK_BENCH_DATA:-$OUT/data}
PARTS=" ${LK_BENCH_PARTS:-step aug e2e loader$([ "${LK_BENCH_COMPILE:-0}" = 1 ] && echo ' compile')} "
RESULTS=$OUT/gpu_bench.jsonl
mkdir -p "$OUT"

log() { echo "[gpu_bench $(date +%H:%M:%S)] $*"; }
PY=$(dirname "$LK")/python
[ "$DEVICE" = cpu ] || "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_bench: no CUDA device visible to torch ($PY)" >&2; exit 2; }
FAILED=()
# step NAME LOG CMD...: run one benchmark, its output also in $OUT/LOG; a failure is remembered, not fatal
step() {
  local name=$1 logfile=$OUT/$2; shift 2
  log "$name"
  "$@" 2>&1 | tee "$logfile" || { log "FAILED: $name (exit ${PIPESTATUS[0]}), see $logfile"; FAILED+=("$name"); }
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
log "device: $(head -12 "$OUT/nvidia-smi.txt" | grep -m1 -o 'NVIDIA [A-Za-z0-9 -]*' || echo unknown); results -> $RESULTS"

if [ ! -f "$DATA/shards/manifest.json" ]; then
  log "synthesizing $N images at $SIZE px and packing them"
  "$LK" synth "$DATA/synth" --n-train "$N" --n-val 0 --size "$SIZE" --workers "$WORKERS" --force
  "$LK" pack --images "$DATA/synth/ISIC-2017_Training_Data" \
    --labels "$DATA/synth/ISIC-2017_Training_Part3_GroundTruth.csv" \
    --out "$DATA/shards" --size "$SIZE" --shard-size 500 --workers "$WORKERS" --force
fi

want() { [[ $PARTS == *" $1 "* ]]; }

want step && step "bench step resnet18" step.log "$LK" bench step resnet18 --device "$DEVICE" --batch-size "$BATCH" \
  --image-size "$SIZE" --steps 20 --repeats 5 --no-compile --out "$RESULTS"

want aug && step "bench aug" aug.log "$LK" bench aug --device "$DEVICE" --batch-size "$BATCH" --image-size "$SIZE" \
  --workers "$WORKERS" --repeats 5 --placement-batches 10 --out "$RESULTS"

E2E=(bench e2e resnet18 --data "$DATA/shards" --device "$DEVICE" --batch-size "$BATCH" --image-size "$SIZE"
  --steps 40 --repeats 3 --workers "$WORKERS" --precision "$PRECISION" --channels-last --out "$RESULTS")
if want e2e; then
  step "bench e2e resnet18" e2e.log "$LK" "${E2E[@]}" --preset derm --profile "$OUT/e2e_profile.txt"
  step "bench e2e resnet18, no augmentation" e2e_none.log "$LK" "${E2E[@]}" --preset none
  step "bench e2e resnet18, JPEGs decoded on the device" e2e_device.log "$LK" "${E2E[@]}" --preset derm --decode device
fi

if want threads; then
  # the training process's torch threads: auto (1 on a GPU, the e2e part's rows) vs torch's one per core
  # the CPUs this process may use (not `nproc`: it answers OMP_NUM_THREADS when that is set)
  CORES=$("$PY" -c "import os; print(len(os.sched_getaffinity(0)))") FEWER=$((WORKERS > 2 ? WORKERS - 2 : 1))
  step "bench e2e resnet18, $CORES torch threads" e2e_threads.log "$LK" "${E2E[@]}" --preset derm \
    --threads "$CORES" --profile "$OUT/e2e_threads_profile.txt"
  step "bench e2e resnet18, $FEWER workers" e2e_fewer.log "$LK" "${E2E[@]}" --preset derm --workers "$FEWER"
fi

if want loader; then
  # the loader's cores are sized for the e2e rate with augmentation (the part e2e's first row)
  rate=$("$PY" - "$RESULTS" <<'PY' || echo 8000
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
e2e = [r for r in rows if r.get("bench") == "e2e" and r["params"]["preset"] != "none" and r["params"]["decode"] == "workers"]
print(round(e2e[0]["cases"]["e2e"]["items_per_s"]) if e2e else 8000)
PY
)
  step "bench loader (GPU rate $rate images/s)" loader.log "$LK" bench loader "$DATA/shards" \
    --workers "$WORKERS" --batch-size "$BATCH" --repeats 1 --gpu-rate "$rate" --device "$DEVICE" --out "$RESULTS"
fi

want compile && step "bench step resnet18 with torch.compile" step_compile.log "$LK" bench step resnet18 \
  --device "$DEVICE" --batch-size "$BATCH" --image-size "$SIZE" --steps 20 --repeats 3 --compile --out "$RESULTS"
log "done: $(wc -l < "$RESULTS" 2>/dev/null || echo 0) JSON lines in $RESULTS"
[ ${#FAILED[@]} -eq 0 ] || { log "failed: ${FAILED[*]}"; exit 1; }
