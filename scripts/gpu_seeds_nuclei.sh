#!/bin/bash
# The bundled nuclei recipe from more training seeds, side by side on one lent GPU,
# its patches drawn by worker processes (--workers: one CPU core drew a batch in about
# 0.12 s, several times the GPU's step), after the training pace with and without
# workers (benchmarks/train_workers.py). Logs and the float16 weights go to $OUT
# (default runs/gpu); tune and score them here as the nuclei card says. On one H100
# (16 cores) two runs with 7 workers each made the 6,000 steps in 212 s and 216 s; four
# with 3 workers each reached only step 5,200 in 420 s.
#   SEEDS="10 11" WORKERS=7 LIMIT=300 bash scripts/gpu_seeds_nuclei.sh
# or variants of the recipe, each named and given its extra options (seed 0 unless given):
#   WORKERS=7 bash scripts/gpu_seeds_nuclei.sh "b16:--batch 16" "b16e:--batch 16 --elastic 1"
# Run from the repository root; the shared data folder travels with the command
# when ../shared is not beside the checkout (e.g. copied to an ignored .gpu/shared).
export NAPARI_UNET_SHARED=${NAPARI_UNET_SHARED:-$([ -d ../shared ] && echo "$PWD/../shared" || echo "$PWD/.gpu/shared")}
export PYTHONPATH=$PWD/src:$PWD/scripts PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
SEEDS=${SEEDS:-10 11}; WORKERS=${WORKERS:-7}; LIMIT=${LIMIT:-300}; DEV=${DEV:-cuda}
nvidia-smi -L; nproc --all
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())" || exit 1
[ "${BENCH_STEPS:-200}" -gt 0 ] &&
  python3 benchmarks/train_workers.py --device "$DEV" --bf16 --workers 0 12 --steps ${BENCH_STEPS:-200}
RECIPE="--steps 6000 --lr 2e-3 --warmup 50 --boundary-width 1 --core-fraction 0.5
  --class-weighting sqrt --shift 0.05 --contact-w0 10 --bf16 --device $DEV --workers $WORKERS"
if [ $# -eq 0 ]; then set -- $(for s in $SEEDS; do echo "s$s:--seed=$s"; done); fi
NAMES=()
for v in "$@"; do
  name=${v%%:*}; NAMES+=("$name")
  timeout "$LIMIT" python3 scripts/train_nuclei.py $RECIPE ${v#*:} \
    --out "runs/gpu_$name/nuclei.safetensors" > "$OUT/$name.log" 2>&1 &
done
(sleep $((LIMIT / 2)); nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; uptime) &
wait
for name in "${NAMES[@]}"; do
  echo "== $name"; grep -E "^step" "$OUT/$name.log" | tail -1; grep -E "^saved|Error" "$OUT/$name.log"
  if [ -f "runs/gpu_$name/nuclei.safetensors" ]; then
    cp "runs/gpu_$name/nuclei.safetensors" "$OUT/$name.safetensors"
  else  # stopped at the limit: its last checkpoint, named as such
    cp "runs/gpu_$name/checkpoint.safetensors" "$OUT/$name-checkpoint.safetensors"
  fi
done
