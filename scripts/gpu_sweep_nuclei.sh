#!/bin/bash
# Seven nuclei recipes trained side by side on one GPU, each for SECS seconds, then
# scored on the held-back images; one log per recipe in $OUT (default runs/sweep).
#   NAPARI_UNET_SHARED=/path/to/shared SECS=170 bash scripts/gpu_sweep_nuclei.sh
# Run from the repository root; the shared data folder travels with the command
# when ../shared is not beside the checkout (e.g. copied to an ignored .gpu/shared).
export NAPARI_UNET_SHARED=${NAPARI_UNET_SHARED:-$([ -d ../shared ] && echo "$PWD/../shared" || echo "$PWD/.gpu/shared")}
export PYTHONPATH=$PWD/src:$PWD/scripts PYTHONUNBUFFERED=1
OUT=${OUT:-runs/sweep}; mkdir -p "$OUT"
SECS=${SECS:-400}; DEV=${DEV:-cuda}; STEPS=${STEPS:-8000}
nvidia-smi -L; nproc
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available()); import napari_unet.core.training, napari_unet.io" || exit 1
COMMON="--lr 2e-3 --warmup 50 --boundary-width 1 --core-fraction 0.5 --class-weighting sqrt --shift 0.05 --contact-w0 10 --bf16 --threads 1 --device $DEV --steps $STEPS --max-seconds $SECS"
run() {
  name=$1; ev=$2; shift 2
  python3 scripts/train_nuclei.py $COMMON "$@" --out runs/$name/nuclei.safetensors > $OUT/$name.log 2>&1
  python3 scripts/evaluate_nuclei.py --model runs/$name/nuclei.safetensors --device $DEV $ev >> $OUT/$name.log 2>&1
}
run A "" &
run B "" --seed 1 &
run C "--magnification-scale" --magnification-scale &
run D "" --contact-w0 30 &
run E "" --core-fraction 0.7 &
run F "" --boundary-width 2 &
run G "--magnification-scale" --magnification-scale --seed 1 &
wait
for n in A B C D E F G; do echo "== $n"; grep -E "^step" $OUT/$n.log | tail -1; grep -E "overall|bioimage|Error|error" $OUT/$n.log; done
