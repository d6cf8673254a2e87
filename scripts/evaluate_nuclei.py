"""Evaluate a nuclei model on the held-back DAPI images, per magnification.

    python scripts/evaluate_nuclei.py --model nuclei [--tta] [--figure PNG]

Prints object F1 at IoU 0.5 (one-to-one matching), mean matched IoU and pixel
IoU of the foreground, per magnification and overall (objects pooled), and a
bootstrap interval of the overall F1 over the held-back images (how much it
depends on which images were held back).
``--figure`` draws, per magnification, the held-back image with the most annotated
nuclei (its busiest 192 x 192 window, enlarged twice) with the annotated and the
predicted outlines (the model card's figure).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
from _figures import busiest_window, instance_overlay, save_grid
from _shared_data import MAGNIFICATION_SCALE, SHARED, magnification, nuclei_split

from napari_unet.core import metrics
from napari_unet.core.segment import SegmentOptions, segment_iter
from napari_unet.core.tiling import run_to_end
from napari_unet.io import load_model


def segment(image, model, tta: bool, device: str = "cpu", diameter=None, **kw):
    """Instances as the command line makes them (``diameter``: see SegmentOptions)."""
    options = SegmentOptions(device=device, tta=tta, diameter=diameter, **kw)
    return run_to_end(segment_iter(image, model, options))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="nuclei")
    p.add_argument("--tta", action="store_true")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--min-size", type=int, default=0)
    p.add_argument("--json", help="write the metrics here")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--magnification-scale",
        action="store_true",
        help="give each image the diameter its magnification implies (MAGNIFICATION_SCALE)",
    )
    p.add_argument("--diameter", help="'auto' or pixels for every image (default: off)")
    p.add_argument("--figure", help="write the overlay figure (PNG) here")
    args = p.parse_args()
    model = load_model(args.model)
    if (args.magnification_scale or args.diameter == "auto") and not model.info.object_diameter:
        raise SystemExit(
            f"{args.model} records no object diameter: --magnification-scale and "
            "--diameter auto need one (a model trained with --magnification-scale)"
        )
    _, val = nuclei_split()
    per = defaultdict(lambda: {"tp": 0, "fp": 0, "fn": 0, "iou_sum": 0.0, "inter": 0, "union": 0})
    shown: dict[str, tuple] = {}  # per magnification: the image with the most nuclei
    counts, groups = [], []  # per image, for the bootstrap interval
    for name, image, mask in val:
        diameter = args.diameter
        if args.magnification_scale:
            diameter = model.info.object_diameter / MAGNIFICATION_SCALE[magnification(name)]
        inst = segment(
            image,
            model,
            args.tta,
            args.device,
            diameter,
            threshold=args.threshold,
            min_size=args.min_size,
        )
        s = metrics.object_scores(mask, inst)
        group = magnification(name)
        counts.append((s["tp"], s["fp"], s["fn"]))
        groups.append(group)
        if group not in shown or mask.max() > shown[group][2].max():
            shown[group] = (name, image, mask, inst)
        for key in (group, "overall"):
            d = per[key]
            d["tp"] += s["tp"]
            d["fp"] += s["fp"]
            d["fn"] += s["fn"]
            d["iou_sum"] += s["sum_matched_iou"]
            d["inter"] += int(np.count_nonzero((mask > 0) & (inst > 0)))
            d["union"] += int(np.count_nonzero((mask > 0) | (inst > 0)))
        print(f"{name}: F1@0.5 {s['f1']:.3f} ({s['tp']} tp, {s['fp']} fp, {s['fn']} fn)")
    table = {}
    for key, d in sorted(per.items()):
        f1 = 2 * d["tp"] / max(1, 2 * d["tp"] + d["fp"] + d["fn"])
        table[key] = {
            "f1@0.5": round(f1, 4),
            "mean_matched_iou": round(d["iou_sum"] / max(1, d["tp"]), 4),
            "pixel_iou": round(d["inter"] / max(1, d["union"]), 4),
            "objects": d["tp"] + d["fn"],
        }
        print(
            f"{key:>8}: F1@0.5 {f1:.3f}  mean matched IoU {table[key]['mean_matched_iou']:.3f}"
            f"  pixel IoU {table[key]['pixel_iou']:.3f}  ({table[key]['objects']} nuclei)"
        )
    lo, hi = metrics.pooled_f1_interval(counts, strata=groups)
    table["overall"]["f1@0.5_95%_interval"] = [round(lo, 4), round(hi, 4)]
    print(
        f"overall F1@0.5 95 % bootstrap interval over the held-back images (resampled "
        f"within each magnification, 2,000 draws): {lo:.3f} - {hi:.3f}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(table, fh, indent=1)
    if args.figure:
        save_figure(shown, args.figure)
    bio = SHARED / "models" / "bioimageio" / "unet2d_nuclei_broad" / "test_input.npy"
    if bio.exists():
        image = np.load(bio)[0, 0]
        inst = segment(image, model, args.tta, args.device, args.diameter)
        print(f"bioimage.io unet2d_nuclei_broad test_input: {inst.max()} nuclei found")


def save_figure(shown: dict[str, tuple], path: str) -> None:
    """The card's overlay: one busiest window per magnification, in name order."""
    panels = []
    for group in sorted(shown):
        name, image, mask, inst = shown[group]
        window = busiest_window(mask, 192)
        print(
            f"panel {len(panels) + 1}: {name} rows {window[0].start}-{window[0].stop}, "
            f"columns {window[1].start}-{window[1].stop}"
        )
        panels.append(instance_overlay(image[window], mask[window], inst[window]))
    save_grid(panels, path, columns=2, zoom=2)


if __name__ == "__main__":
    main()
