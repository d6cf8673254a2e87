"""Train the bundled ``em-membrane`` model on ISBI 2012 (the U-Net paper's task).

    python scripts/train_em.py --steps 1000 --out src/napari_unet/weights/em-membrane.safetensors

As in the paper: valid convolutions, overlap-tile with mirroring, elastic
deformation, the border-weighted loss. Slices 5, 11, 17 and 23 are held back.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _shared_data import ROOT, isbi_split, run_logged
from scipy import ndimage as ndi

from napari_unet.core.augment import AugmentConfig
from napari_unet.core.training import TrainConfig, train_iter
from napari_unet.io.files import save_model
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
        border_w0=10.0,
        border_sigma=5.0,
        focus=0.3,
        augment=AugmentConfig(intensity=0.2, noise=0.05, elastic=0.8, elastic_sigma=10.0),
        val_every=100,
        seed=args.seed,
        device=args.device,
        checkpoint=str(Path(args.out).with_name("checkpoint.safetensors")),
    )
    return model, cfg


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-weighting", default="balanced", choices=["balanced", "sqrt", "none"])
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--init", help="continue from this model (bundled name or file)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--out", default=str(ROOT / "runs" / "em" / "em-membrane.safetensors"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val = isbi_split()
    print(f"train {len(train)} slices, validation {[n for n, *_ in val]}")
    model, cfg = build(args)
    if args.init:  # same architecture and metadata, weights of an earlier run
        from napari_unet.io import load_model

        model.net.load_state_dict(load_model(args.init).net.float().state_dict())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
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
    t0 = time.time()
    result = run_logged(gen)
    out = Path(args.out)
    save_model(result, out, half=True, allow_bundled=True)
    print(f"saved {out} after {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
