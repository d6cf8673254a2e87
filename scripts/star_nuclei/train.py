"""Train the star-convex nuclei experiment (see star.py) on the shared DAPI data.

    python scripts/star_nuclei/train.py --max-seconds 3300 --scale 8 --out runs/star/s2

Time-based cosine schedule (lr 2e-3, 50 warm-up steps), AdamW, batch 8 of 256 px,
bfloat16 autocast, 2 CPU threads, seed 0; the weights go to OUT.safetensors
every 250 steps and at the end. On a GPU (``--device cuda --workers 6``) the rays
are computed there and the patches drawn in worker processes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _dense_experiment import init_weights, start, train_loop  # noqa: E402
from star import Sampler, StarNet, star_loss  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rays", type=int, default=32)
    p.add_argument("--scale", type=float, default=1.0, help="distances predicted in these px")
    a, train, rng = start(p, out="runs/star/star", max_seconds=3500)
    net = StarNet(a.rays, width=a.width, scale=a.scale)
    init_weights(p, a, net)
    # off the CPU, the rays are computed on the device (a batch costs 0.5 s in NumPy)
    later = a.device != "cpu"
    sampler = Sampler(train, rng, rays=a.rays, rays_later=later)
    meta = {"scale": str(a.scale), "width": str(a.width), "rays": str(a.rays)}
    prep = sampler.rays_on_device if later else None
    train_loop(net, sampler, star_loss, a, meta, ("prob", "dist"), prepare=prep)


if __name__ == "__main__":
    main()
