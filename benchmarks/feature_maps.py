"""Time to capture all stages of a model for a 1024 x 1024 field of view.

python benchmarks/feature_maps.py [--model nuclei] [--size 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from napari_unet.core.features import capture
from napari_unet.io import load_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="nuclei")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model = load_model(args.model)
    n = args.size
    image = (np.random.default_rng(0).random((n + 512, n + 512)) * 4000).astype(np.uint16)
    region = (256, 256 + n, 256, 256 + n)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        maps = capture(image, model, region=region, device="cpu")
        times.append(time.perf_counter() - t)
    mb = sum(m.data.nbytes for m in maps.values()) / 2**20
    print(f"{args.model}: {len(maps)} stages of a {n}x{n} field of view, {mb:.0f} MB float32")
    print(f"best {min(times):.2f} s, median {np.median(times):.2f} s over {args.repeats} runs")


if __name__ == "__main__":
    main()
