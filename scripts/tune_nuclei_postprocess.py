"""Choose the nuclei model's instance post-processing on *training* images.

    python scripts/tune_nuclei_postprocess.py --model runs/nuclei/nuclei.safetensors

Predicts probabilities once for every training image (never the held-back
validation images), then tries seed thresholds, the smallest seed size, the
smallest mean foreground probability of an object, whether unseeded
foreground regions count and whether seeds are split by their shape
(``seed_split``), and prints the recipe with the best pooled object
F1@0.5. Writes it into the model file with --write.
"""

from __future__ import annotations

import argparse
import itertools

from _shared_data import nuclei_split

from napari_unet.core import metrics, postprocess
from napari_unet.core.tiling import predict
from napari_unet.io.files import load_model, save_model


def pooled_f1(pairs, recipe, threshold) -> float:
    tp = fp = fn = 0
    for probs, mask in pairs:
        s = metrics.object_scores(mask, postprocess.instances(probs, recipe, None, threshold))
        tp, fp, fn = tp + s["tp"], fp + s["fp"], fn + s["fn"]
    return 2 * tp / max(1, 2 * tp + fp + fn)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--write", action="store_true", help="store the best recipe in the model")
    p.add_argument("--every", type=int, default=3, help="use every n-th training image")
    args = p.parse_args()
    model = load_model(args.model)
    train, _ = nuclei_split()
    train = train[:: args.every]
    pairs = [(predict(image, model, device="cpu"), mask) for _, image, mask in train]
    base = dict(model.info.instances or {"method": "watershed", "seed": 1, "boundary": 2})
    best = (-1.0, None, None)
    fg_t = 0.5  # the foreground threshold users see (CLI --threshold, panel)
    grid = itertools.product(
        (0.5, 0.6, 0.7), (8, 16), (0.0, 0.7, 0.75, 0.8), (0, 20), (0.0, 1.0, 2.0)
    )
    for seed_t, min_seed, min_conf, unseeded, split in grid:
        recipe = {
            **base,
            "seed_threshold": seed_t,
            "min_seed_size": min_seed,
            "min_confidence": min_conf,
            "unseeded_min_size": unseeded,
            "seed_split": split,
        }
        f1 = pooled_f1(pairs, recipe, fg_t)
        if f1 > best[0]:
            best = (f1, recipe, fg_t)
    f1, recipe, fg_t = best
    print(
        f"best on {len(pairs)} training images: F1@0.5 {f1:.3f} with {recipe}, "
        f"foreground threshold {fg_t}"
    )
    if args.write:
        model.info.instances = recipe
        save_model(model, args.model, half=True, allow_bundled=True)
        print(f"wrote the recipe into {args.model}")


if __name__ == "__main__":
    main()
