"""Train the bundled ``nuclei`` model on the shared DAPI data (CPU, fixed seed).

    python scripts/train_nuclei.py --steps 2400 --out src/napari_unet/weights/nuclei.safetensors

Checkpoints go to runs/nuclei/ every 200 steps; the log prints step, loss, lr
and validation patch metrics. Evaluate with scripts/evaluate_nuclei.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from _shared_data import ROOT, nuclei_split, run_logged

from napari_unet.core.augment import AugmentConfig
from napari_unet.core.training import TrainConfig, train_iter
from napari_unet.io.files import save_model
from napari_unet.model import UNet, UNetConfig
from napari_unet.model.info import wrap_unet

CLASSES = ["background", "interior", "boundary"]


def build(args) -> tuple:
    arch = UNetConfig(
        in_channels=1, num_classes=3, depth=4, base_width=args.width, padding="same", norm="batch"
    )
    torch.manual_seed(args.seed)
    model = wrap_unet(
        UNet(arch),
        name="nuclei",
        classes=CLASSES,
        normalization={"mode": "percentile", "low": 1.0, "high": 99.8},
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
        batch_size=8,
        patch_size=256,
        warmup=args.warmup,
        border_w0=args.border_w0,
        border_sigma=5.0,
        boundary_width=args.boundary_width,
        focus=0.5,
        class_weighting=args.class_weighting,
        augment=AugmentConfig(
            intensity=0.25, shift=args.shift, noise=0.05, elastic=0.3, zoom=args.zoom
        ),
        val_every=100,
        seed=args.seed,
        device=args.device,
        checkpoint=str(Path(args.out).with_name("checkpoint.safetensors")),
    )
    return model, cfg


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--boundary-width", type=int, default=2, help="inner boundary class width (px)")
    p.add_argument("--init", help="continue from this model (bundled name or file)")
    p.add_argument("--border-w0", type=float, default=10.0, help="paper border weight w0")
    p.add_argument("--class-weighting", default="balanced", choices=["balanced", "sqrt", "none"])
    p.add_argument("--shift", type=float, help="intensity shift range (default: 0.25)")
    p.add_argument("--zoom", type=float, default=0.3, help="random zoom range")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "runs" / "nuclei" / "nuclei.safetensors"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    train, val = nuclei_split()
    print(f"train {len(train)} images, validation {len(val)}: {[n for n, *_ in val]}")
    model, cfg = build(args)
    if args.init:  # same architecture and metadata, weights of an earlier run
        from napari_unet.io import load_model

        model.net.load_state_dict(load_model(args.init).net.float().state_dict())
    gen = train_iter(
        model,
        [i for _, i, _ in train],
        [m for *_, m in train],
        "instances",
        cfg,
        val_images=[i for _, i, _ in val],
        val_labels=[m for *_, m in val],
        data_name="nuclei_dapi (BitDepth_NucSeg, Mahbod et al. 2021), "
        f"{len(train)} training images, split seed {args.seed}",
    )
    t0 = time.time()
    result = run_logged(gen)
    out = Path(args.out)
    save_model(result, out, half=True, allow_bundled=True)
    print(f"saved {out} after {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
