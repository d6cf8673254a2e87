"""Calibrate the EM model's membrane / cell decision on the *training* slices.

    python scripts/calibrate_em.py runs/em/em-membrane.safetensors --write

Class-balanced training draws membranes thicker than the labels. This predicts
the training slices (never the held-back ones), picks the p(cell) threshold
with the lowest pixel error and folds it into the output bias
(:func:`napari_unet.core.adaptation.calibrate_threshold`), so labels, instances
and probabilities of the saved model all use it.
"""

from __future__ import annotations

import argparse

import numpy as np
from _shared_data import isbi_split

from napari_unet.core import metrics
from napari_unet.core.adaptation import calibrate_threshold
from napari_unet.core.tiling import predict
from napari_unet.io.files import load_model, save_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--write", action="store_true", help="save the calibrated model over MODEL")
    args = p.parse_args()
    model = load_model(args.model)
    cell = model.info.classes.index("cell")
    train, _ = isbi_split()
    probs = [(predict(image, model, device="cpu")[cell], labels > 0) for _, image, labels in train]
    best = None
    for t in np.round(np.arange(0.05, 0.96, 0.05), 2):
        error = float(np.mean([metrics.pixel_error(truth, prob > t) for prob, truth in probs]))
        print(f"threshold {t:.2f}: training pixel error {error:.4f}")
        if best is None or error < best[1]:
            best = (float(t), error)
    t, error = best
    print(f"best threshold on {len(probs)} training slices: {t:.2f} (pixel error {error:.4f})")
    if args.write:
        save_model(calibrate_threshold(model, cell, t), args.model, half=True, allow_bundled=True)
        print(f"wrote the calibrated model to {args.model}")


if __name__ == "__main__":
    main()
