"""Training pace with the patches drawn in the loop or by worker processes.

    python benchmarks/train_workers.py [--device cuda] [--workers 0 4 12] [--steps 300]

Trains the bundled nuclei recipe's network (depth 4, width 16, batch norm, batch 8 of
256 x 256 patches, its augmentation: zoom on every patch, elastic deformation on 30 %)
on eight synthetic 512 x 512 nuclei images (``core.synthetic.nuclei``: runs anywhere)
for ``--steps`` steps per setting, and prints steps per second, counted from the first
step (setup and the workers' start excluded, as the run's own clock does). The
elapsed time is read after the last step, which waits for the device.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from napari_unet.core import synthetic
from napari_unet.core.augment import AugmentConfig
from napari_unet.core.training import TrainConfig, train
from napari_unet.model import UNet, UNetConfig
from napari_unet.model.info import wrap_unet


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    data = [synthetic.nuclei((512, 512), n=60, seed=s) for s in range(8)]
    arch = UNetConfig(in_channels=1, num_classes=3, depth=4, base_width=16, padding="same")
    print(f"device {args.device}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    for workers in args.workers:
        torch.manual_seed(0)
        model = wrap_unet(UNet(arch), name="bench", classes=["bg", "interior", "boundary"])
        cfg = TrainConfig(
            steps=args.steps,
            lr=2e-3,
            batch_size=8,
            patch_size=256,
            warmup=10,
            boundary_width=1,
            core_fraction=0.5,
            contact_w0=10.0,
            class_weighting="sqrt",
            augment=AugmentConfig(intensity=0.25, shift=0.05, noise=0.05, elastic=0.3, zoom=0.3),
            val_every=0,
            device=args.device,
            bf16=args.bf16,
            workers=workers,
        )
        reports = []
        t0 = time.perf_counter()
        train(model, [i for i, _ in data], [m for _, m in data], "instances", cfg, reports.append)
        wall = time.perf_counter() - t0
        last = reports[-1]
        print(
            f"workers {workers:2d}: {last.step} steps in {last.elapsed:6.1f} s = "
            f"{last.step / last.elapsed:6.1f} steps/s (wall with setup {wall:.1f} s)"
        )


if __name__ == "__main__":
    main()
