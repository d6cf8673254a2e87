"""Evaluate the star-convex nuclei experiment on the held-back DAPI images.

    python scripts/star_nuclei/evaluate.py --model runs/star/s2.safetensors --scale 8 \
        --grid 2 --tune --overlap min

``--tune`` picks the probability and NMS thresholds on every second training
image (pooled F1@0.5) before scoring the held-back images with them.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _dense_experiment import add_scores, f1, print_scores  # noqa: E402
from _shared_data import magnification, nuclei_split  # noqa: E402
from star import StarNet, instances, predict  # noqa: E402

from napari_unet.core import metrics  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="runs/star/star.safetensors")
    p.add_argument("--tune", action="store_true")
    p.add_argument("--grid", type=int, default=1, help="candidate polygons every GRID px")
    p.add_argument("--prob", type=float, default=0.5)
    p.add_argument("--nms", type=float, default=0.4)
    p.add_argument("--overlap", default="iou", choices=["iou", "min"])
    p.add_argument("--scale", type=float, help="ray unit (default: the file's, else 1)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with safe_open(a.model, "pt") as fh:
        meta = fh.metadata() or {}
    scale = a.scale or float(meta.get("scale", 1.0))
    net = StarNet(int(meta.get("rays", 32)), width=int(meta.get("width", 16)), scale=scale)
    net.load_state_dict(load_file(a.model))
    net.eval()
    train, val = nuclei_split()

    def pool(items, settings):
        res = {s: {} for s in settings}
        for name, img, lab in items:
            pr, d = predict(net, img)
            for s in settings:
                sc = metrics.object_scores(lab, instances(pr, d, s[0], s[1], a.grid, s[2]))
                add_scores(res[s], (magnification(name), "overall"), sc)
        return res

    t = time.time()
    if a.tune:
        settings = list(itertools.product([0.2, 0.3, 0.4, 0.5, 0.6], [0.3, 0.4, 0.5], [a.overlap]))
        res = pool(train[::2], settings)
        for s in sorted(settings, key=lambda s: -f1(res[s]["overall"])):
            print("train", s, round(f1(res[s]["overall"]), 4))
        best = max(settings, key=lambda s: f1(res[s]["overall"]))
    else:
        best = (a.prob, a.nms, a.overlap)
    res = pool(val, [best])[best]
    print_scores(res)
    print("setting", best, f"{time.time() - t:.0f}s")


if __name__ == "__main__":
    main()
