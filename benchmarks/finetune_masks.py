"""Fine-tuning on exact instance masks: does the fine-tune recipe keep what it is shown?

    python benchmarks/finetune_masks.py [--steps 80] [--images N]

A user who has ground-truth masks for part of an image pairs them in the fine-tune
panel ('as instance masks'). Here, for each image that the bundled ``nuclei`` model
never saw in training (the held-back split of ``../shared/data/nuclei_dapi``), the
model is fine-tuned on the exact masks of the image's left half (a mask that covers
part of the image, as a corrected 'Visible region only' result does), through the
panel's own path (``core.finetune.finetune_pairs_iter``, ``TrainConfig.finetune``
with a fixed number of steps), and object F1@0.5 is measured on the right half,
pooled over the images. Runs compared: the base model; the recipe with balanced
class weights and no weights on the gaps and contacts between objects (the panel's
recipe before 2026-11-28); and the recipe's ``auto`` weighting (the base model's own
for instance masks). Prints one line per image and the pooled figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_unet.core.finetune import finetune_pairs_iter
from napari_unet.core.metrics import object_scores
from napari_unet.core.segment import SegmentOptions, segment
from napari_unet.core.tiling import run_to_end
from napari_unet.core.training import TrainConfig
from napari_unet.io import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _shared_data import nuclei_split  # noqa: E402 - the scripts' split and data path

RUNS = {
    "balanced, no separation weights": dict(
        class_weighting="balanced", border_w0=0.0, contact_w0=0.0
    ),
    "auto (the base model's own for masks)": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--images", type=int, default=0, help="only the first N (0: all)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    _, held_back = nuclei_split()
    held_back = held_back[: args.images or None]
    base = load_model("nuclei")
    pooled = {name: np.zeros(3, int) for name in ["base", *RUNS]}
    began = time.perf_counter()
    for name, image, mask in held_back:
        half = image.shape[1] // 2
        line = [name]
        for run, model in [("base", base), *[(r, None) for r in RUNS]]:
            if model is None:
                cfg = TrainConfig.finetune(
                    steps=args.steps, max_seconds=None, device="cpu", seed=0, **RUNS[run]
                )
                pairs = [(image, mask[:, :half], name, "instances", "YX", (0, 0))]
                model = run_to_end(finetune_pairs_iter(base, pairs, cfg)).model
            counts, f1 = _score(model, image, mask, half)
            pooled[run] += counts
            line.append(f"{run}: {f1:.3f}")
        print(" | ".join(line), flush=True)
    print(
        f"pooled F1@0.5 on the right halves of {len(held_back)} held-back images "
        f"({args.steps} steps on each left half; {time.perf_counter() - began:.0f} s):"
    )
    for run, (tp, fp, fn) in pooled.items():
        print(f"  {run}: {2 * tp / max(1, 2 * tp + fp + fn):.3f} (tp {tp}, fp {fp}, fn {fn})")


def _score(model, image, mask, half: int):
    """``(tp, fp, fn)`` and F1@0.5 of the model's nuclei on the image's right half."""
    found = segment(image, model, SegmentOptions(mode="instances", device="cpu"))
    s = object_scores(mask[:, half:], found[:, half:])
    return np.array([s["tp"], s["fp"], s["fn"]]), s["f1"]


if __name__ == "__main__":
    main()
