"""Evaluate the flow-field nuclei experiment on the held-back DAPI images.

    python scripts/flow_nuclei/evaluate.py --model runs/flow/f1.safetensors --tune

``--tune`` picks the foreground and flow-error thresholds on every second
training image (pooled F1@0.5) before scoring the held-back images with them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _dense_experiment import add_scores, f1, print_scores  # noqa: E402
from _shared_data import magnification, nuclei_split  # noqa: E402
from flow import FlowNet, finish, predict, sink_labels  # noqa: E402

from napari_unet.core import metrics  # noqa: E402

PROBS = (-1.0, -0.5, 0.0, 0.5, 1.0)
FLOWS = (0.4, 0.6, 0.8, 1.2, None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="runs/flow/flow.safetensors")
    p.add_argument("--tune", action="store_true")
    p.add_argument("--prob", type=float, default=0.0, help="foreground logit threshold")
    p.add_argument("--flow", type=float, default=0.4, help="flow error threshold (<0: none)")
    p.add_argument("--min-size", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with safe_open(a.model, "pt") as fh:
        width = int((fh.metadata() or {}).get("width", 16))
    net = FlowNet(width)
    net.load_state_dict(load_file(a.model))
    net.eval()
    train, val = nuclei_split()

    def pool(items, probs, flows):
        res = {}
        for name, img, lab in items:
            flow, logit = predict(net, img)
            for pr in probs:
                raw = sink_labels(flow, logit, pr)
                for fl in flows:
                    sc = metrics.object_scores(lab, finish(raw, flow, fl, a.min_size))
                    add_scores(res.setdefault((pr, fl), {}), (magnification(name), "overall"), sc)
        return res

    t = time.time()
    if a.tune:
        res = pool(train[::2], PROBS, FLOWS)
        for s in sorted(res, key=lambda s: -f1(res[s]["overall"]))[:8]:
            print("train", s, round(f1(res[s]["overall"]), 4), flush=True)
        best = max(res, key=lambda s: f1(res[s]["overall"]))
    else:
        best = (a.prob, None if a.flow < 0 else a.flow)
    res = pool(val, [best[0]], [best[1]])[best]
    print_scores(res)
    print("setting", best, f"{time.time() - t:.0f}s")


if __name__ == "__main__":
    np.seterr(invalid="ignore")
    main()
