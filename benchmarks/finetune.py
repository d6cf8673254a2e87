"""Annotate-and-retrain benchmark: does fine-tuning on a few strokes fix a poor domain?

    python benchmarks/finetune.py [--seconds 60] [--cases shift shared20x]

A simulated user paints short strokes (``core.synthetic.strokes``: about 300 px per
class, most of them starting where the base model is wrong) on two images the
bundled ``nuclei`` model segments poorly; the model is fine-tuned on CPU for a fixed
time budget and object F1@0.5 (seeded watershed, the model's own recipe) is measured
on *other* images of the same domain. Cases:

* ``shift``: synthetic nuclei (``core.synthetic.nuclei``) imaged dim (x0.15 signal)
  with read noise and a strong illumination gradient - always available;
* ``shared20x``: the real 20x DAPI images of ``../shared/data/nuclei_dapi``, where the
  bundled model is weakest; strokes on two, scored on the other five (skipped when
  ../shared is absent).

Runs compared: the base model; batch-norm re-estimation alone (no labels);
a naive loop (Adam 3e-4, constant rate, 4 x 256^2 patches, nothing else); and the
project's recipe (``TrainConfig.finetune``) in float32 and with bfloat16 autocast
(as many more steps as it makes room for in the same budget). Prints one line per run.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from napari_unet.core import metrics, postprocess, synthetic
from napari_unet.core.augment import AugmentConfig
from napari_unet.core.targets import convention, instances_to_classes
from napari_unet.core.tiling import predict
from napari_unet.core.training import TrainConfig, train
from napari_unet.io import load_model

# the shared data beside the checkout, or where NAPARI_UNET_SHARED points (as scripts/)
SHARED = (
    Path(os.environ.get("NAPARI_UNET_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    / "data"
    / "nuclei_dapi"
)


def shifted(seed: int):
    image, labels = synthetic.nuclei(seed=seed)
    return synthetic.dim_uneven(image, seed), labels


def case_shift():
    return [shifted(200), shifted(201)], [shifted(300 + i) for i in range(4)]


def case_shared20x():
    import tifffile

    names = sorted(p.name for p in (SHARED / "images").glob("20x*"))
    strokes_on = ["20x__bone_20x_2.tif", "20x__kidney_20x_2.tif"]

    def read(n):
        return tifffile.imread(SHARED / "images" / n), tifffile.imread(SHARED / "masks" / n)

    return [read(n) for n in strokes_on], [read(n) for n in names if n not in strokes_on]


def f1(model, data) -> float:
    scores = []
    for image, truth in data:
        probs = predict(image, model, device="cpu")
        pred = postprocess.instances(probs, model.info.instances, model.info.classes)
        scores.append(metrics.object_scores(truth, pred)["f1"])
    return float(np.mean(scores))


def paint(model, data) -> list[np.ndarray]:
    """Strokes on the classes as the model draws them (its interior / boundary convention)."""
    strokes = []
    for i, (image, truth) in enumerate(data):
        classes = instances_to_classes(truth, *convention(model.info))
        wrong = predict(image, model, device="cpu").argmax(0) != classes
        strokes.append(synthetic.strokes(classes, 300, seed=i, prefer=wrong))
    return strokes


def runs(seconds: float) -> dict:
    return {
        "norm re-estimation only": TrainConfig.finetune(steps=1, lr=1e-12, device="cpu"),
        "naive (Adam 3e-4, 4x256^2)": TrainConfig(
            steps=100_000,
            lr=3e-4,
            batch_size=4,
            patch_size=256,
            warmup=0,
            schedule="constant",
            border_w0=0.0,
            focus=0.0,
            weight_decay=0.0,
            max_seconds=seconds,
            augment=AugmentConfig(intensity=0.0, noise=0.0),
            val_every=10**9,
            device="cpu",
        ),
        "napari-unet recipe, float32": TrainConfig.finetune(
            steps=100_000, max_seconds=seconds, device="cpu", bf16=False
        ),
        "napari-unet recipe, bf16": TrainConfig.finetune(
            steps=100_000, max_seconds=seconds, device="cpu", bf16=True
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    p.add_argument("--cases", nargs="+", default=["shift", "shared20x"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_model("nuclei")
    print(f"torch threads {torch.get_num_threads()}, budget {args.seconds:.0f} s")
    for name in args.cases:
        if name == "shared20x" and not SHARED.is_dir():
            print(f"[{name}] skipped: {SHARED} not found")
            continue
        painted_on, scored_on = {"shift": case_shift, "shared20x": case_shared20x}[name]()
        strokes = paint(base, painted_on)
        px = [int((s > 0).sum()) for s in strokes]
        share = sum(px) / sum(s.size for s in strokes)
        per_class = np.bincount(np.concatenate([s[s > 0] for s in strokes]), minlength=4)[1:]
        print(
            f"[{name}] strokes on {len(strokes)} images: {sum(px)} px ({share:.2%} of pixels), "
            f"per class {per_class.tolist()}; scored on {len(scored_on)} other images"
        )
        f0 = f1(base, scored_on)
        print(f"[{name}] base model                  F1@0.5 {f0:.3f}")
        unlabelled = [im for im, _ in scored_on]
        for label, cfg in runs(args.seconds).items():
            steps = []
            t0 = time.perf_counter()
            tuned = train(
                base,
                [im for im, _ in painted_on],
                strokes,
                "sparse",
                cfg,
                callback=steps.append,
                unlabelled=unlabelled if cfg.adapt_norm else (),
            )
            wall = time.perf_counter() - t0
            score = f1(tuned, scored_on)
            print(
                f"[{name}] {label:28s} F1@0.5 {score:.3f} ({score - f0:+.3f}), "
                f"{steps[-1].step} steps, {steps[-1].elapsed:.0f} s training, {wall:.0f} s wall"
            )


if __name__ == "__main__":
    main()
