"""Train the star-convex nuclei experiment (see star.py) on the shared DAPI data.

    python scripts/star_nuclei/train.py --max-seconds 3300 --scale 8 --out runs/star/s2

Time-based cosine schedule (lr 2e-3, 50 warm-up steps), AdamW, batch 8 of 256 px,
bfloat16 autocast, 2 CPU threads, seed 0; the weights go to OUT.safetensors
every 250 steps and at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _shared_data import nuclei_split  # noqa: E402
from star import Sampler, StarNet, star_loss  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-seconds", type=float, default=3500)
    p.add_argument("--out", default="runs/star/star")
    p.add_argument("--rays", type=int, default=32)
    p.add_argument("--scale", type=float, default=1.0, help="distances predicted in these px")
    p.add_argument("--bs", type=int, default=8)
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init", help="continue from these weights (.safetensors)")
    start.add_argument(
        "--init-unet",
        help="start the U-Net body from a class model's weights (all but its 1x1 head), "
        "e.g. runs/n7/checkpoint.safetensors",
    )
    a = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train, _ = nuclei_split()
    net = StarNet(a.rays, scale=a.scale)
    if a.init:
        net.load_state_dict(load_file(a.init))
    elif a.init_unet:
        body = {
            k: v.float() for k, v in load_file(a.init_unet).items() if not k.startswith("head.")
        }
        missing, unexpected = net.unet.load_state_dict(body, strict=False)
        if unexpected or set(missing) != {"head.weight", "head.bias"}:
            p.error(f"{a.init_unet} is not a depth-4, width-16 class U-Net's weights")
    print(sum(p.numel() for p in net.parameters()), "params", flush=True)
    sampler = Sampler(train, rng, rays=a.rays)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    net.train()
    for step in range(1, a.steps + 1):
        frac = min(1.0, max(step / a.steps, (time.time() - t0) / a.max_seconds))
        lr = a.lr * min(1, step / 50) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        x, prob, dist, valid = sampler.batch(a.bs)
        with torch.autocast("cpu", torch.bfloat16):
            out = net(x)
        loss, lp, ld = star_loss(out.float(), prob, dist, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(
                f"step {step} loss {float(loss):.4f} prob {lp:.4f} dist {ld:.3f} "
                f"lr {lr:.2e} {time.time() - t0:.0f}s",
                flush=True,
            )
        if step % 250 == 0 or frac >= 1:
            state = {k: v.contiguous() for k, v in net.state_dict().items()}
            save_file(state, a.out + ".tmp", metadata={"scale": str(a.scale)})
            os.replace(a.out + ".tmp", a.out + ".safetensors")
        if frac >= 1:
            break
    print("done", step, time.time() - t0, flush=True)


if __name__ == "__main__":
    main()
