"""Choose the nuclei model's instance post-processing on *training* images.

    python scripts/tune_nuclei_postprocess.py --model runs/nuclei/nuclei.safetensors

Predicts probabilities once for every training image (never the held-back
validation images), then tries seed thresholds, the smallest seed size, the
smallest mean foreground probability of an object, whether unseeded
foreground regions count and whether seeds are split by their shape
(``seed_split``) or at the peaks of the interior probability (``seed_peaks``,
for models trained on soft cores), and prints the recipe with the best pooled object
F1@0.5. Writes it into the model file with --write.
"""

from __future__ import annotations

import argparse
import itertools
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from _shared_data import MAGNIFICATION_SCALE, magnification, nuclei_split, rescaled

from napari_unet.core import metrics, postprocess
from napari_unet.core.tiling import predict
from napari_unet.io.files import load_model, save_model

PAIRS: list = []  # (probabilities, mask) per training image, shared with forked workers
FG_T = 0.5  # the foreground threshold users see (CLI --threshold, panel)


MIN_CONFIDENCE = (0.0, 0.7, 0.75, 0.8, 0.85)


def pooled_f1(recipe, limits=MIN_CONFIDENCE) -> list[float]:
    """Pooled F1@0.5 of ``recipe`` with each smallest mean confidence of ``limits``
    (segmented once: the confidence filter only drops whole objects, so it runs on the
    same labels)."""
    counts = np.zeros((len(limits), 3))
    for probs, mask in PAIRS:
        lab = postprocess.instances(probs, {**recipe, "min_confidence": 0.0}, None, FG_T)
        for k, limit in enumerate(limits):
            kept = postprocess.drop_unsure(lab, 1.0 - probs[0], limit)
            s = metrics.object_scores(mask, kept)
            counts[k] += s["tp"], s["fp"], s["fn"]
    tp, fp, fn = counts.T
    return list(2 * tp / np.maximum(1, 2 * tp + fp + fn))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--write", action="store_true", help="store the best recipe in the model")
    p.add_argument("--every", type=int, default=3, help="use every n-th training image")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--magnification-scale",
        action="store_true",
        help="tune on images rescaled by MAGNIFICATION_SCALE (models trained so)",
    )
    p.add_argument(
        "--seed-peaks",
        action="store_true",
        help="also try seeds at interior-probability peaks (models trained on soft cores)",
    )
    args = p.parse_args()
    model = load_model(args.model)
    train, _ = nuclei_split()
    train = train[:: args.every]
    if args.magnification_scale:
        train = [rescaled(t, MAGNIFICATION_SCALE[magnification(t[0])]) for t in train]
    PAIRS.extend((predict(image, model, device="cpu"), mask) for _, image, mask in train)
    base = dict(model.info.instances or {"method": "watershed", "seed": 1, "boundary": 2})
    base.pop("seed_peaks", None)  # each grid point sets its own seed splitting
    splits = [{"seed_split": h} for h in (0.0, 1.0, 2.0, 3.0)]
    if args.seed_peaks:
        splits += [{"seed_split": 0.0, "seed_peaks": h} for h in (0.05, 0.1, 0.2, 0.3)]
    grid = itertools.product((0.4, 0.5, 0.6, 0.7), (8, 16), (0, 20), splits)
    shapes = [
        {
            **base,
            "seed_threshold": seed_t,
            "min_seed_size": min_seed,
            "unseeded_min_size": unseeded,
            **split,
        }
        for seed_t, min_seed, unseeded, split in grid
    ]
    with ProcessPoolExecutor(max(1, args.workers)) as pool:  # forked: workers see PAIRS
        per_shape = list(pool.map(pooled_f1, shapes, chunksize=2))
    recipes = [{**r, "min_confidence": c} for r in shapes for c in MIN_CONFIDENCE]
    scores = [f for fs in per_shape for f in fs]
    f1 = max(scores)
    recipe = recipes[scores.index(f1)]  # the first of equals
    print(
        f"best on {len(PAIRS)} training images: F1@0.5 {f1:.3f} with {recipe}, "
        f"foreground threshold {FG_T}"
    )
    if model.info.instances:  # what the model's own recipe scores there, to compare
        stored = model.info.instances
        f1_stored = pooled_f1(stored, (float(stored.get("min_confidence", 0.0)),))[0]
        print(f"the model's stored recipe there: F1@0.5 {f1_stored:.3f}")
    if args.write:
        model.info.instances = recipe
        save_model(model, args.model, half=True, allow_bundled=True)
        print(f"wrote the recipe into {args.model}")


if __name__ == "__main__":
    main()
