"""The command line's arguments: one function per command."""

from __future__ import annotations

import argparse

MODES = ("probabilities", "labels", "instances")


TRUST_HELP = "allow a bioimage.io package's architecture code to run (only if you trust it)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="napari-unet", description="U-Net segmentation")
    sub = p.add_subparsers(dest="command", required=True)
    _add_predict(sub)
    _add_train(sub)
    _add_model_commands(sub)
    return p


def _add_predict(sub) -> None:
    pr = sub.add_parser("predict", help="segment images with overlap-tile inference")
    pr.add_argument("inputs", nargs="+", help="TIFF, PNG, NPY or zarr images")
    pr.add_argument("--model", "-m", help="bundled model name or model file (default: bundled)")
    pr.add_argument("--output", "-o", help="output file (one input) or folder (several)")
    pr.add_argument(
        "--mode",
        choices=MODES,
        default="instances",
        help="instances: one label per object; labels: the class index of each pixel, "
        "from 0 (napari's segment panel shows class k as label k + 1, as painted "
        "annotations have it); probabilities: one map per class (default: %(default)s)",
    )
    pr.add_argument(
        "--tile",
        type=_number(int, 1),
        help="network input tile size (snapped to an accepted one, at least twice the halo "
        "plus one pooling step, e.g. 208 for nuclei; larger tiles waste less on the halo)",
    )
    pr.add_argument("--batch-size", type=_number(int, 1), help="tiles per forward pass")
    pr.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda", "mps"),
        help="auto: CUDA, then Apple MPS, then the CPU (default: %(default)s)",
    )
    pr.add_argument(
        "--axes",
        help="image axes, e.g. YX, ZYX, CYX, YXC (default: as an OME or ImageJ TIFF records "
        "them, else guessed)",
    )
    pr.add_argument(
        "--threshold",
        type=_share,
        default=0.5,
        help="instances: foreground probability threshold (default: %(default)s)",
    )
    pr.add_argument(
        "--min-size",
        type=_count,
        default=0,
        help="instances: smallest object in pixels (default: %(default)s)",
    )
    pr.add_argument(
        "--min-confidence",
        type=_share,
        help="instances: drop objects whose mean foreground probability is lower "
        "(default: the model's recipe; 0 keeps all, e.g. for dim images)",
    )
    pr.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average over mirrored tiles (4x the time)",
    )
    pr.add_argument(
        "--diameter",
        help="typical object diameter in the images (px), 'auto' (estimated from a first "
        "pass) or 'off'; the images are rescaled to the model's object size. Default: "
        "'auto' for models that record an object size, else off (the bundled models record none)",
    )
    pr.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    pr.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress bar (what is written is still said)",
    )
    pr.add_argument("--trust-code", action="store_true", help=TRUST_HELP)


def _add_train(sub) -> None:
    tr = sub.add_parser("train", help="train or fine-tune a U-Net on image / label files")
    tr.add_argument("--images", nargs="+", required=True, help="training images (2D)")
    tr.add_argument("--labels", nargs="+", required=True, help="label images, same order")
    tr.add_argument(
        "--model",
        "-m",
        required=True,
        help="base model (bundled name or file) to fine-tune, or a new architecture as JSON "
        '(e.g. \'{"depth": 4, "base_width": 16, "padding": "same"}\') or a .json file',
    )
    tr.add_argument("--output", "-o", required=True, help="trained model (.safetensors)")
    tr.add_argument(
        "--label-kind",
        choices=("instances", "classes", "sparse"),
        help="instances: one id per object; classes: dense class ids from 0 (as predict "
        "--mode labels writes them); "
        "sparse: painted strokes, 0 = not annotated, k = class k-1 (default: sparse, or "
        "the kind --settings-from records)",
    )
    tr.add_argument("--classes", help="class names for a new model, comma-separated")
    tr.add_argument(
        "--finetune",
        action="store_true",
        help="few-annotation fine-tuning recipe (batch-norm re-estimation, confident "
        "pseudo-labels, anchor to the base, 60 s budget, or none when --steps is given "
        "without --seconds); the options below override it",
    )
    tr.add_argument("--steps", type=int, help="optimisation steps (default 500; finetune 400)")
    tr.add_argument(
        "--seconds",
        type=float,
        help="time budget in seconds: the steps that fit in it (at most --steps) are timed "
        "first and run, so --steps N (N: train_config steps in the result's provenance) "
        "repeats the run",
    )
    tr.add_argument(
        "--stop-after",
        type=_number(int, 1),
        help="end after this many of the --steps (repeats a stopped run: its provenance steps)",
    )
    tr.add_argument(
        "--settings-from",
        metavar="MODEL.safetensors",
        help="the training settings a model trained by napari-unet records (seed, steps "
        "planned and made, learning rate, batch, patches, augmentation, fine-tuning "
        "switches: `napari-unet info` shows them), without its time budget: with the same "
        "images, labels and --unlabelled images it repeats that run exactly, e.g. a "
        "version made in the fine-tune panel; options given as well override them",
    )
    tr.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    tr.add_argument("--patch-size", type=int, help="patch size (default 256; finetune 128)")
    tr.add_argument("--batch-size", type=int, help="batch size (default 8; finetune 4)")
    tr.add_argument(
        "--class-weights",
        choices=("balanced", "sqrt", "none"),
        help="class weights of the loss: balanced (1/frequency, the default), sqrt "
        "(1/sqrt(frequency): fewer false objects for the bundled nuclei recipe) or none; "
        "with --finetune the default is balanced for strokes and, for instance masks, the "
        "base model's own (with its weights on gaps and contacts between objects)",
    )
    tr.add_argument(
        "--contact-weight",
        type=_non_negative,
        help="instances: loss weight on pixels where two objects touch edge to edge "
        "(default 0; the bundled nuclei model used 10; with --finetune, the base model's "
        "own)",
    )
    tr.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast for the forward pass: about 2x faster on CPUs with "
        "AVX512-BF16 or AMX and on recent GPUs, emulated and several times slower "
        "elsewhere (a warning says so); float32 weights either way",
    )
    tr.add_argument(
        "--unlabelled",
        nargs="*",
        default=[],
        help="images without labels whose statistics the model adapts to (batch-norm "
        "statistics re-estimated on them and the training images before training)",
    )
    tr.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda", "mps"),
        help="auto: CUDA, then Apple MPS, then the CPU (default: %(default)s)",
    )
    tr.add_argument(
        "--workers",
        type=_number(int, 0, 256),
        help="processes that draw and augment the training patches beside the training "
        "loop (default 0: in the loop). On a GPU one CPU core cannot keep up: give about "
        "the number of free cores. With workers each batch has a seed of its own, so any "
        "number of workers repeats the same run (a different one from no workers)",
    )
    tr.add_argument(
        "--seed",
        type=_number(int, 0, 2**32 - 1),
        help="random seed of patches, augmentation and new weights: the same seed, data "
        "and steps repeat a run on the CPU (default: 0, or the one --settings-from records)",
    )
    tr.add_argument(
        "--val-images",
        nargs="*",
        default=[],
        help="held-back images to report validation loss and accuracy on (default: none)",
    )
    tr.add_argument("--val-labels", nargs="*", default=[], help="their labels, same order")
    tr.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _add_model_commands(sub) -> None:
    """``models``, ``info`` and ``export``."""
    sub.add_parser("models", help="list bundled models")
    info = sub.add_parser("info", help="print a model's card (or what made a TIFF result)")
    info.add_argument(
        "model",
        help="bundled model name, model file or bioimage.io package; or a TIFF result of "
        "predict, to print the model and settings it records",
    )
    info.add_argument("--trust-code", action="store_true", help=TRUST_HELP)

    ex = sub.add_parser("export", help="export a U-Net as a bioimage.io package")
    ex.add_argument("model", help="bundled model name or model file (.safetensors)")
    ex.add_argument("--bioimageio", required=True, metavar="OUT.zip", help="package to write")
    ex.add_argument("--cover", help="cover image (PNG/JPEG); default: input beside output")
    ex.add_argument(
        "--license",
        default=None,
        help="SPDX licence of the weights (default: the model's own, else CC-BY-4.0)",
    )
    ex.add_argument("--author", action="append", help="author name (repeat for several)")


def _number(kind, low: float, high: float | None = None):
    """An argparse type: a ``kind`` (int or float) from ``low`` to ``high`` (NaN refused)."""

    def parse(text: str):
        value = kind(text)
        if not (low <= value and (high is None or value <= high)):
            span = f"between {low:g} and {high:g}" if high is not None else f"{low:g} or more"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value

    return parse


_share, _count, _non_negative = _number(float, 0, 1), _number(int, 0), _number(float, 0)
