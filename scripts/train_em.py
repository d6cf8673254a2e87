"""Train the bundled ``em-membrane`` model on ISBI 2012 (the U-Net paper's task).

    python scripts/train_em.py --steps 3000 --lr 2e-3 --warmup 50 \
        --class-weighting none --border-w0 3 --bf16 --threads 2 \
        --out runs/e4/em-membrane.safetensors

(the bundled model's recipe, from its card docs/models/em-membrane.md; leave out
``--bf16`` on CPUs without native bfloat16. Write to runs/ and compare before
replacing the bundled weights.)

As in the paper: valid convolutions, overlap-tile with mirroring, elastic
deformation, the border-weighted loss. Slices 5, 11, 17 and 23 are held back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _shared_data import ROOT, add_run_args, isbi_split, start_run, train_and_save
from scipy import ndimage as ndi

from napari_unet.core.augment import AugmentConfig
from napari_unet.core.training import TrainConfig, train_iter
from napari_unet.model import UNet, UNetConfig
from napari_unet.model.info import wrap_unet

CLASSES = ["membrane", "cell"]


def cells(labels: np.ndarray) -> np.ndarray:
    """Instance ids of the cell interiors (labels: 0 membrane, 255 interior)."""
    return ndi.label(labels > 0)[0]


def build(args):
    arch = UNetConfig(
        in_channels=1, num_classes=2, depth=4, base_width=args.width, padding="valid", norm="batch"
    )
    torch.manual_seed(args.seed)
    model = wrap_unet(
        UNet(arch),
        name="em-membrane",
        classes=CLASSES,
        normalization={"mode": "percentile", "low": 0.5, "high": 99.5},
        instances={"method": "components", "foreground": 1},
        description="EM cell membranes (ISBI 2012 style): membrane / cell",
    )
    cfg = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch,
        patch_size=228,
        warmup=args.warmup,
        class_weighting=args.class_weighting,
        border_w0=args.border_w0,
        border_sigma=5.0,
        focus=0.3,
        augment=AugmentConfig(intensity=0.2, noise=0.05, elastic=0.8, elastic_sigma=10.0),
        val_every=100,
        seed=args.seed,
        device=args.device,
        max_seconds=args.max_seconds,
        bf16=args.bf16,
        checkpoint=str(Path(args.out).with_name("checkpoint.safetensors")),
    )
    return model, cfg


def main() -> None:
    p = argparse.ArgumentParser()
    add_run_args(p, steps=1000, out=ROOT / "runs" / "em" / "em-membrane.safetensors")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--border-w0", type=float, default=10.0, help="paper border weight w0")
    args = p.parse_args()
    train, val = isbi_split()
    print(f"train {len(train)} slices, validation {[n for n, *_ in val]}")
    model, cfg = build(args)
    start_run(args, model)
    # class 0 = membrane (between cells), 1 = cell; border weights from the cells
    gen = train_iter(
        model,
        [i for _, i, _ in train],
        [cells(lab) for *_, lab in train],
        "instances",
        cfg,
        val_images=[i for _, i, _ in val],
        val_labels=[cells(lab) for *_, lab in val],
        data_name=f"ISBI 2012 EM training slices except {[n for n, *_ in val]}",
    )
    train_and_save(gen, args.out)


if __name__ == "__main__":
    main()
