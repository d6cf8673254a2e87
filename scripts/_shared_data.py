"""Loading the shared training data (read at training / benchmark time only)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# the shared data beside the checkout, or where NAPARI_UNET_SHARED points
SHARED = Path(os.environ.get("NAPARI_UNET_SHARED", ROOT.parent / "shared"))


def nuclei_split(data: Path | None = None, val_fraction: float = 0.2, seed: int = 0):
    """DAPI nuclei: (train, val) lists of (name, image, instance mask), stratified."""
    import tifffile
    from skimage.segmentation import relabel_sequential

    data = data or SHARED / "data" / "nuclei_dapi"
    names = sorted(p.name for p in (data / "images").glob("*.tif"))
    if not names:
        raise SystemExit(f"no images in {data / 'images'} (is ../shared there?)")
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(magnification(n), []).append(n)
    rng = np.random.default_rng(seed)
    val_names = set()
    for group in groups.values():
        k = max(2, round(val_fraction * len(group)))
        val_names.update(rng.permutation(group)[:k].tolist())
    train, val = [], []
    for n in names:
        image = tifffile.imread(data / "images" / n)
        mask = relabel_sequential(tifffile.imread(data / "masks" / n).astype(np.int64))[0]
        (val if n in val_names else train).append((n, image, mask.astype(np.int32)))
    return train, val


def magnification(name: str) -> str:
    return name.split("__")[0]


# Rescaling each magnification to the nuclear size seen at 40x (objective ratio; the
# data set gives no pixel sizes): --magnification-scale in train/evaluate_nuclei.py
MAGNIFICATION_SCALE = {"20x": 2.0, "40x_air": 1.0, "40x_oil": 1.0, "63x_oil": 40 / 63}


def rescaled(item, factor: float):
    """(name, image, mask) with image (linear) and mask (nearest) rescaled by ``factor``."""
    from skimage.transform import rescale

    name, image, mask = item
    if factor == 1:
        return item
    image = rescale(image.astype(np.float32), factor, order=1, anti_aliasing=factor < 1)
    mask = rescale(mask, factor, order=0, anti_aliasing=False, preserve_range=True)
    return name, image, mask.astype(np.int32)


def isbi_split(data: Path | None = None, val_slices=(5, 11, 17, 23)):
    """ISBI 2012 EM: (train, val) lists of (name, image uint8, labels uint8: 0 membrane)."""
    from skimage.io import imread

    data = data or SHARED / "data" / "isbi2012_em"
    names = sorted(p.name for p in (data / "images").glob("*.png"))
    if not names:
        raise SystemExit(f"no images in {data / 'images'} (is ../shared there?)")
    train, val = [], []
    for i, n in enumerate(names):
        item = (n, imread(data / "images" / n), imread(data / "labels" / n))
        (val if i in val_slices else train).append(item)
    return train, val


def add_run_args(p, steps: int, out: Path) -> None:
    """Options every training script shares (schedule, continuation, CPU threads, output)."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-weighting", default="balanced", choices=["balanced", "sqrt", "none"])
    p.add_argument("--init", help="continue from this model (bundled name or file)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--workers", type=int, default=0, help="processes drawing patches (0: in the loop)"
    )
    p.add_argument("--max-seconds", type=float, help="wall-time budget; the schedule follows it")
    p.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast (2x faster on AVX512-BF16 CPUs)"
    )
    p.add_argument("--out", default=str(out))


def start_run(args, model) -> None:
    """Apply ``--threads`` and ``--init`` (same architecture and metadata, weights of an
    earlier run) and create the output folder."""
    import torch

    from napari_unet.io import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.init:
        model.net.load_state_dict(load_model(args.init).net.float().state_dict())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)


def train_and_save(gen, out: str) -> None:
    """Drive the training generator with logging and save the result (float16)."""
    import sys
    import time

    from napari_unet.io.files import save_model

    t0 = time.time()
    result = run_logged(gen)
    save_model(result, Path(out), half=True, allow_bundled=True)
    print(f"saved {out} after {time.time() - t0:.0f}s", file=sys.stderr)


def run_logged(gen, every: int = 20):
    """Drive a training generator, printing step, loss, lr and validation metrics."""
    import time

    from napari_unet.core.tiling import run_to_end

    t0 = time.time()

    def log(s):
        if s.step % every == 0 or s.metrics:
            print(
                f"step {s.step}/{s.steps} loss {s.loss:.4f} lr {s.lr:.2e} "
                f"{time.time() - t0:.0f}s {s.metrics}",
                flush=True,
            )

    return run_to_end(gen, log)
