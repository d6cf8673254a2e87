"""Train the bundled ``nuclei`` model on the shared DAPI data (CPU, fixed seed).

    python scripts/train_nuclei.py --steps 6000 --lr 2e-3 --warmup 50 \
        --boundary-width 1 --core-fraction 0.5 --class-weighting sqrt --shift 0.05 \
        --contact-w0 10 --bf16 --threads 2 --out runs/n7/nuclei.safetensors

(the bundled model's recipe, from its card docs/models/nuclei.md, which also gives
the post-processing tuning that follows and the command for CPUs without native
bfloat16. Write to runs/ and compare before replacing the bundled weights.)

Checkpoints go to runs/nuclei/ every 200 steps; the log prints step, loss, lr
and validation patch metrics. Evaluate with scripts/evaluate_nuclei.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _shared_data import (
    MAGNIFICATION_SCALE,
    ROOT,
    add_run_args,
    magnification,
    nuclei_split,
    rescaled,
    start_run,
    train_and_save,
)

from napari_unet.core.augment import AugmentConfig
from napari_unet.core.training import TrainConfig, train_iter
from napari_unet.io.bioimageio.unet2d import load_unet2d
from napari_unet.model import UNet, UNetConfig
from napari_unet.model.info import wrap_unet

CLASSES = ["background", "interior", "boundary"]


def build(args) -> tuple:
    torch.manual_seed(args.seed)
    if args.init_unet2d:  # the package's features, a new 3-class head
        net = load_unet2d(args.init_unet2d, len(CLASSES))
        # the package's preprocessing; named as the network trained from
        base = {
            "normalization": {"mode": "zscore", "eps": 1e-6},
            "source": str(Path(args.init_unet2d).parent),
        }
    else:
        arch = UNetConfig(
            in_channels=1,
            num_classes=3,
            depth=4,
            base_width=args.width,
            padding="same",
            norm="batch",
        )
        net = UNet(arch)
        base = {"normalization": {"mode": "percentile", "low": 1.0, "high": 99.8}}
    model = wrap_unet(
        net,
        name="nuclei",
        classes=CLASSES,
        **base,
        instances={
            "method": "watershed",
            "seed": 1,
            "boundary": 2,
            "seed_threshold": 0.5,
            "min_seed_size": 8,
        },
        description="fluorescence nuclei (DAPI/Hoechst): background / interior / boundary",
    )
    cfg = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch,
        patch_size=256,
        warmup=args.warmup,
        border_w0=args.border_w0,
        border_sigma=5.0,
        boundary_width=args.boundary_width,
        core_fraction=args.core_fraction,
        core_ramp=args.core_ramp,
        dice=args.dice,
        hard_fraction=args.hard_fraction,
        contact_w0=args.contact_w0,
        focus=0.5,
        draw_images=args.draw_images,
        class_weighting=args.class_weighting,
        augment=AugmentConfig(
            intensity=0.25,
            shift=args.shift,
            noise=0.05,
            elastic=args.elastic,
            zoom=args.zoom,
            gamma=args.gamma,
            blur=args.blur,
        ),
        val_every=100,
        seed=args.seed,
        device=args.device,
        workers=args.workers,
        max_seconds=args.max_seconds,
        bf16=args.bf16,
        checkpoint=str(Path(args.out).with_name("checkpoint.safetensors")),
    )
    return model, cfg


def parser() -> argparse.ArgumentParser:
    """The recipe's options (also those of scripts/flow_nuclei/train_aux.py)."""
    p = argparse.ArgumentParser()
    add_run_args(p, steps=2400, out=ROOT / "runs" / "nuclei" / "nuclei.safetensors")
    p.add_argument("--boundary-width", type=int, default=2, help="inner boundary class width (px)")
    p.add_argument("--border-w0", type=float, default=10.0, help="paper border weight w0")
    p.add_argument("--core-fraction", type=float, default=0.0, help="interior = object cores")
    p.add_argument(
        "--core-ramp", type=float, default=0.0, help="soft cores: ramp width (share of depth)"
    )
    p.add_argument("--dice", type=float, default=0.0, help="weight of a soft Dice term")
    p.add_argument(
        "--hard-fraction", type=float, default=1.0, help="bootstrapped CE: share of pixels"
    )
    p.add_argument("--contact-w0", type=float, default=0.0, help="weight where nuclei touch")
    p.add_argument("--shift", type=float, help="intensity shift range (default: 0.25)")
    p.add_argument("--zoom", type=float, default=0.3, help="random zoom range")
    p.add_argument("--elastic", type=float, default=0.3, help="share of patches deformed")
    p.add_argument("--gamma", type=float, default=0.0, help="share of patches given a gamma")
    p.add_argument("--blur", type=float, default=0.0, help="share of patches blurred")
    p.add_argument("--batch", type=int, default=8, help="patches per step")
    p.add_argument(
        "--draw-images",
        choices=("pixels", "objects"),
        default="pixels",
        help="draw each image in proportion to its pixels or its nuclei",
    )
    p.add_argument(
        "--init-unet2d",
        help="start from a bioimage.io unet2d package's TorchScript weights (weights.pt), "
        "e.g. ../shared/models/bioimageio/unet2d_nuclei_broad/weights.pt, with a new head",
    )
    p.add_argument(
        "--magnification-scale",
        action="store_true",
        help="train at one nuclear size: rescale each image by MAGNIFICATION_SCALE",
    )
    return p


def main() -> None:
    args = parser().parse_args()
    train, val = nuclei_split()
    if args.magnification_scale:
        train = [rescaled(t, MAGNIFICATION_SCALE[magnification(t[0])]) for t in train]
        val = [rescaled(t, MAGNIFICATION_SCALE[magnification(t[0])]) for t in val]
    print(f"train {len(train)} images, validation {len(val)}: {[n for n, *_ in val]}")
    model, cfg = build(args)
    if args.magnification_scale:  # segmentation rescales images to this object size
        from napari_unet.core.segment import median_diameter

        sizes = [median_diameter(m) for *_, m in train]
        model.info.object_diameter = round(float(np.median(sizes)), 1)
        print(f"object diameter (median of the images' medians): {model.info.object_diameter}")
    start_run(args, model)
    gen = train_iter(
        model,
        [i for _, i, _ in train],
        [m for *_, m in train],
        "instances",
        cfg,
        val_images=[i for _, i, _ in val],
        val_labels=[m for *_, m in val],
        data_name="nuclei_dapi (BitDepth_NucSeg, Mahbod et al. 2021), "
        f"{len(train)} training images, split seed 0, training seed {args.seed}",
    )
    train_and_save(gen, args.out)


if __name__ == "__main__":
    main()
