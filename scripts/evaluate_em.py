"""Evaluate an EM membrane model on the held-back ISBI 2012 slices.

    python scripts/evaluate_em.py --model em-membrane [--tta] [--json metrics.json]

ISBI pixel error: the challenge's ``1 - maximal F-score of pixel similarity``
(cell interior positive, thresholds 0.0 to 1.0 in steps of 0.1, counts pooled
over the held-back slices), the figure the U-Net paper reports. Misclassified:
fraction of pixels whose membrane / cell class (probability threshold 0.5)
differs from the label. Rand error: the ISBI 2012 foreground-restricted
``1 - V_rand``, with predicted cells as connected components of
``p(cell) > threshold`` grown over the predicted membranes.
``--figure PNG`` draws the annotated and predicted membranes (threshold above) of
the first two held-back slices' central 256 x 256 windows, enlarged twice (the
model card's figure).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from _figures import overlay, save_grid
from _shared_data import isbi_split
from scipy import ndimage as ndi

from napari_unet.core import metrics
from napari_unet.core.tiling import predict
from napari_unet.io import load_model


def cell_probability(image, model, tta: bool) -> np.ndarray:
    """p(cell) for a slice; with ``tta`` averaged over mirrored tiles (as ``--tta``)."""
    cell = model.info.classes.index("cell")
    return predict(image, model, device="cpu", tta=tta)[cell]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="em-membrane")
    p.add_argument("--tta", action="store_true")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--json")
    p.add_argument("--figure", help="write the overlay figure (PNG) here")
    args = p.parse_args()
    model = load_model(args.model)
    _, val = isbi_split()
    pix, rand, probs = [], [], []
    for name, image, labels in val:
        prob = cell_probability(image, model, args.tta)
        probs.append(prob)
        true_cells = labels > 0
        pred_cells = prob > args.threshold
        pe = metrics.pixel_error(true_cells, pred_cells)
        re = metrics.rand_error(
            ndi.label(true_cells)[0], metrics.segments_from_membranes(prob, args.threshold)
        )
        pix.append(pe)
        rand.append(re)
        print(f"{name}: misclassified {pe:.4f}  Rand error {re:.4f}")
    isbi, best_t = metrics.isbi_pixel_error([lab for *_, lab in val], probs)
    result = {
        "isbi_pixel_error": round(isbi, 4),
        "isbi_pixel_error_threshold": best_t,
        "misclassified": round(float(np.mean(pix)), 4),
        "rand_error": round(float(np.mean(rand)), 4),
        "threshold": args.threshold,
        "slices": [n for n, *_ in val],
        "tta": args.tta,
    }
    print(
        f"{len(val)} held-back slices: ISBI pixel error (1 - max F) {isbi:.4f} "
        f"(best threshold {best_t:.1f}); at threshold {args.threshold}: misclassified "
        f"{result['misclassified']:.4f}, Rand error {result['rand_error']:.4f}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.figure:
        panels = []
        for (_, image, labels), prob in list(zip(val, probs))[:2]:
            h, w = image.shape
            window = slice(h // 2 - 128, h // 2 + 128), slice(w // 2 - 128, w // 2 + 128)
            truth, pred = labels[window] == 0, prob[window] <= args.threshold
            panels.append(overlay(image[window], truth, pred, opacity=0.5))
        save_grid(panels, args.figure, columns=2, zoom=2)


if __name__ == "__main__":
    main()
