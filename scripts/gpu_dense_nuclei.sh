#!/bin/bash
# The star-convex and flow-field nuclei experiments trained side by side on one lent
# GPU for SECS seconds each (patches drawn in worker processes, star rays computed on
# the GPU): star (width 16, rays in units of 8 px), flow width 16, flow width 32.
# Logs and float16 copies of the weights go to $OUT (default runs/gpu); score them
# with scripts/star_nuclei/evaluate.py and scripts/flow_nuclei/evaluate.py.
#   SECS=450 bash scripts/gpu_dense_nuclei.sh
# Run from the repository root; the shared data folder travels with the command
# when ../shared is not beside the checkout (e.g. copied to an ignored .gpu/shared).
export NAPARI_UNET_SHARED=${NAPARI_UNET_SHARED:-$([ -d ../shared ] && echo "$PWD/../shared" || echo "$PWD/.gpu/shared")}
export PYTHONPATH=$PWD/src:$PWD/scripts PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT" runs/gpu
SECS=${SECS:-450}; DEV=${DEV:-cuda}
nvidia-smi -L; nproc --all
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())" || exit 1
COMMON="--device $DEV --max-seconds $SECS"
python3 scripts/star_nuclei/train.py $COMMON --workers 6 --scale 8 --out runs/gpu/star > "$OUT/star.log" 2>&1 &
python3 scripts/flow_nuclei/train.py $COMMON --workers 4 --out runs/gpu/flow16 > "$OUT/flow16.log" 2>&1 &
python3 scripts/flow_nuclei/train.py $COMMON --workers 4 --width 32 --out runs/gpu/flow32 > "$OUT/flow32.log" 2>&1 &
(sleep $((SECS / 2)); nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; uptime) &
wait
python3 - "$OUT" <<'PY'
import sys
from safetensors.torch import load_file, save_file
from safetensors import safe_open
for n in ("star", "flow16", "flow32"):
    f = f"runs/gpu/{n}.safetensors"
    try:
        with safe_open(f, "pt") as fh:
            meta = fh.metadata()
        save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()},
                  f"{sys.argv[1]}/{n}.safetensors", metadata=meta)
    except Exception as e:
        print(n, "no weights:", e)
PY
for n in star flow16 flow32; do echo "== $n"; grep -E "^step" "$OUT/$n.log" | tail -2; grep -E "^done|Error|error" "$OUT/$n.log" | tail -3; done
