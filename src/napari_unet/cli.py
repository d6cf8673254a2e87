"""Command line: ``napari-unet predict | train | models | info | export``.

Errors print one line (``napari-unet: error: ...``) and exit with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import zlib
from pathlib import Path

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
    pr.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
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
        default="sparse",
        help="instances: one id per object; classes: dense class ids from 0 (as predict "
        "--mode labels writes them); "
        "sparse: painted strokes, 0 = not annotated, k = class k-1 (default: %(default)s)",
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
    tr.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    tr.add_argument("--patch-size", type=int, help="patch size (default 256; finetune 128)")
    tr.add_argument("--batch-size", type=int, help="batch size (default 8; finetune 4)")
    tr.add_argument(
        "--class-weights",
        choices=("balanced", "sqrt", "none"),
        help="class weights of the loss: balanced (1/frequency, the default), sqrt "
        "(1/sqrt(frequency): fewer false objects for the bundled nuclei recipe) or none",
    )
    tr.add_argument(
        "--contact-weight",
        type=_non_negative,
        help="instances: loss weight on pixels where two objects touch edge to edge "
        "(default 0; the bundled nuclei model used 10)",
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
        "--seed",
        type=_number(int, 0, 2**32 - 1),
        default=0,
        help="random seed of patches, augmentation and new weights: the same seed, data "
        "and steps repeat a run on the CPU (default: %(default)s)",
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
    info = sub.add_parser("info", help="print a model's card")
    info.add_argument("model", help="bundled model name, model file or bioimage.io package")
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``napari-unet`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("napari-unet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `napari-unet models | head -1`: the reader has enough
        _quiet_stdout()
        return 141  # as a tool killed by SIGPIPE, and without a message
    except (ValueError, OSError, MemoryError, RuntimeError) as err:
        print(f"napari-unet: error: {err}", file=sys.stderr)
        return 1


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises nothing more."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file behind stdout (tests)
        pass


def _model(name: str | None, trust_code: bool = False):
    from napari_unet.io import load_model, registry

    if name is not None and not name.strip():
        raise ValueError("the model name is empty: give a bundled name or a file")
    name = name or registry.default_model()
    if name is None:
        raise ValueError("no bundled model is installed; pass --model FILE")
    return load_model(name, trust_code=trust_code)


def cmd_models(args) -> int:
    from napari_unet.io import load_model, registry

    models = registry.bundled_models()
    if not models:
        print("no bundled models installed")
    for name in models:
        info = load_model(name).info
        default = " (default)" if name == registry.default_model() else ""
        print(f"{name}{default}: {info.description or ', '.join(info.classes)}")
    return 0


def cmd_info(args) -> int:
    print(_model(args.model, getattr(args, "trust_code", False)).info.card())
    return 0


def cmd_export(args) -> int:
    from napari_unet.io import outputs
    from napari_unet.io.bioimageio import export_package

    outputs.check_writable(Path(args.bioimageio), [args.model])
    model = _model(args.model)
    out = export_package(
        model, args.bioimageio, cover=args.cover, license=args.license, authors=args.author
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_predict(args) -> int:
    from napari_unet.io import outputs
    from napari_unet.io.images import check_readable, image_axes, read_image

    missing = [src for src in args.inputs if not Path(src).exists()]
    if missing:
        raise ValueError(f"no such file: {', '.join(missing)} (nothing was processed)")
    targets = outputs.targets(args.inputs, args.output, args.mode)
    # before the model runs and any result is written, not after the first ones
    for src, dst in targets:
        check_readable(src)
        _check_target(dst, args)
    model = _model(args.model, getattr(args, "trust_code", False))
    for src, _ in targets:  # opened lazily: an input the model cannot take stops the batch
        _check_input(read_image(src), args.axes or image_axes(src), model, src)
    for folder in sorted({dst.parent for _, dst in targets}):
        outputs.check_folder(folder)
    if (
        args.diameter is None
        and model.info.object_diameter
        and any(dst.suffix.lower() == ".zarr" for _, dst in targets)
    ):
        print(
            f"warning: {model.info.name} records an object size, but a .zarr result is "
            "segmented at the image's own scale (write .tif or .npy to rescale; "
            "--diameter off says so and silences this)",
            file=sys.stderr,
        )
    for src, dst in targets:
        image = read_image(src)
        axes = args.axes or image_axes(src)  # as the file records them (OME, ImageJ)
        try:
            _predict_one(image, model, dst, args, label=Path(src).name, axes=axes)
        except zlib.error as err:  # read lazily, tile by tile: a corrupt tile shows here
            raise ValueError(f"{src}: its image data is corrupt ({err})") from None
        print(f"{src} -> {dst}", file=sys.stderr)
    return 0


def _check_input(image, axes, model, src) -> None:
    """Axes and dtype of an input, checked before the first image is segmented."""
    from napari_unet.core.axes import resolve_axes
    from napari_unet.core.normalize import check_dtype

    try:
        resolve_axes(tuple(image.shape), axes, model.info.in_channels)
        check_dtype(image.dtype)
    except ValueError as err:
        raise ValueError(f"{src}: {err} (nothing was processed)") from None


def _check_target(dst: Path, args) -> None:
    """Outputs the command cannot write, refused by their name before any work."""
    from napari_unet.io.images import WRITE_SUFFIXES

    if dst.suffix.lower() not in WRITE_SUFFIXES:
        raise ValueError(f"{dst.name}: write .tif, .npy or .zarr")
    if dst.suffix.lower() == ".zarr":
        if args.mode == "instances":
            raise ValueError("instances are written as TIFF; use --mode labels for zarr output")
        if args.diameter is not None and args.diameter.lower() not in ("off", "none"):
            raise ValueError("--diameter rescales the image: write .tif or .npy for it")


def _predict_one(image, model, dst: Path, args, label: str, axes: str | None = None) -> None:
    from tqdm import tqdm

    from napari_unet.core.axes import resolve_axes
    from napari_unet.core.segment import SegmentOptions, segment_iter
    from napari_unet.core.tiling import predict_iter
    from napari_unet.io.images import WRITE_SUFFIXES, ZarrOutput, write_image

    if dst.suffix.lower() not in WRITE_SUFFIXES:
        raise ValueError(f"{dst.name}: write .tif, .npy or .zarr")
    info = model.info
    ax = resolve_axes(tuple(image.shape), axes, info.in_channels)
    engine_out = "labels" if args.mode == "labels" else "probabilities"
    sink = None
    diameter = _diameter(args.diameter, info)
    if dst.suffix.lower() == ".zarr":  # streamed at the image's own scale
        if args.diameter is not None and diameter is not None:
            raise ValueError("--diameter rescales the image: write .tif or .npy for it")
        diameter = None
        if args.mode == "instances":
            raise ValueError("instances are written as TIFF; use --mode labels for zarr output")
        shape = (*ax.leading_shape, *ax.yx)
        if engine_out == "probabilities":
            shape = (info.num_classes, *shape)
        sink = ZarrOutput(dst, shape, "float32" if engine_out == "probabilities" else "uint8")
    if sink:  # streamed into the zarr store, class maps or labels
        gen = predict_iter(
            image,
            model,
            axes=ax.axes,
            tile=args.tile,
            batch_size=args.batch_size,
            device=args.device,
            amp=not args.no_amp,
            tta=args.tta,
            output=engine_out,
            out=sink.array,
        )
    else:
        options = SegmentOptions(
            mode=args.mode,
            axes=ax.axes,
            tile=args.tile,
            batch_size=args.batch_size,
            device=args.device,
            amp=not args.no_amp,
            threshold=args.threshold,
            min_size=args.min_size,
            min_confidence=args.min_confidence,
            tta=args.tta,
            diameter=diameter,
        )
        gen = segment_iter(image, model, options)
    bar = tqdm(desc=label, unit="tile", disable=args.quiet, file=sys.stderr)
    try:
        while True:
            try:
                progress = next(gen)
            except StopIteration as stop:
                result = stop.value
                break
            bar.total = progress.total
            bar.n = progress.done
            bar.refresh()
    except BaseException:
        if sink:
            sink.discard()
        raise
    finally:
        bar.close()
    if sink:
        sink.commit()
        return
    write_image(dst, result)


def _diameter(value: str | None, info) -> str | None:
    """``--diameter``: None (off), "auto", or the pixels as given (SegmentOptions
    checks them); unset: auto for models that record an object size."""
    if value is None:
        return "auto" if info.object_diameter else None
    if value.lower() in ("off", "none"):
        return None
    if value.lower() != "auto":
        try:
            float(value)
        except ValueError:
            raise ValueError(f"--diameter takes pixels, 'auto' or 'off', got {value!r}") from None
    return value.lower()


def _base_model(spec: str, classes: str | None):
    import json

    from napari_unet.io import load_model
    from napari_unet.model import UNet, UNetConfig
    from napari_unet.model.info import wrap_unet

    text = spec.strip()
    if text.endswith(".json") and Path(text).exists():
        text = Path(text).read_text()
    if not text.startswith("{"):
        if classes:
            raise ValueError(
                "--classes names the classes of a new network (-m as JSON); "
                f"{spec} keeps its own: {', '.join(load_model(spec).info.classes)}"
            )
        return load_model(spec)
    try:
        arch = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--model is not valid JSON: {err}") from None
    names = [c.strip() for c in classes.split(",")] if classes else None
    if names and (not all(names) or len(set(names)) != len(names)):
        raise ValueError(f"--classes needs distinct, non-empty names, got {classes!r}")
    if names:
        arch.setdefault("num_classes", len(names))
    config = UNetConfig.from_dict(arch)
    if names and len(names) != config.num_classes:
        raise ValueError(f"{len(names)} class names for {config.num_classes} classes")
    return wrap_unet(
        UNet(config), name=Path(spec).stem if spec.endswith(".json") else "unet", classes=names
    )


def cmd_train(args) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from napari_unet.core.training import TrainConfig, train_iter
    from napari_unet.io import outputs
    from napari_unet.io.files import save_model
    from napari_unet.io.images import read_image

    if len(args.images) != len(args.labels):
        raise ValueError(f"{len(args.images)} images but {len(args.labels)} label files")
    if Path(args.output).suffix != ".safetensors":  # (".safetensors" alone has none)
        raise ValueError("--output must be a file name ending in .safetensors")
    # before training, not after it; the base model, images and labels are never replaced
    outputs.check_writable(Path(args.output), [args.model, *args.images, *args.labels])
    torch.manual_seed(args.seed)  # a new network's initial weights too
    classes = args.classes
    new = classes is None and args.label_kind == "instances" and not _is_model(args.model)
    if new and _num_classes(args.model.strip()) == 3:
        # instance masks become these three classes: a new network says so, and its
        # instances come from the watershed of them (class2 was taken as the objects)
        classes = "background,interior,boundary"
    model = _base_model(args.model, classes)

    def load(paths):
        return [np.asarray(read_image(p)) for p in paths]

    given = {
        "steps": args.steps,
        "max_seconds": args.seconds,
        "stop_after": args.stop_after,
        "lr": args.lr,
        "patch_size": args.patch_size,
        "batch_size": args.batch_size,
        "class_weighting": args.class_weights,
        "contact_w0": args.contact_weight,
        "bf16": args.bf16 or None,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if args.finetune and args.steps is not None and args.seconds is None:
        # --steps N repeats a run exactly: the recipe's 60 s budget would time the steps
        # again on this machine, and plan fewer where it is slower
        given["max_seconds"] = None
    if args.unlabelled:  # they are only used to adapt the batch-norm statistics
        given["adapt_norm"] = True
    make = TrainConfig.finetune if args.finetune else TrainConfig
    cfg = make(**given, device=args.device, seed=args.seed)
    stop = threading.Event()
    gen = train_iter(
        model,
        load(args.images),
        load(args.labels),
        args.label_kind,
        cfg,
        val_images=load(args.val_images),
        val_labels=load(args.val_labels),
        data_name=", ".join(Path(p).name for p in args.images),
        unlabelled=load(args.unlabelled),
        should_stop=stop.is_set,
    )
    bar = tqdm(total=None, unit="step", disable=args.quiet, file=sys.stderr)
    try:
        with _first_interrupt_stops(stop):
            while True:
                try:
                    step = next(gen)
                except StopIteration as end:
                    result = end.value
                    break
                bar.total = step.steps  # as planned (a time budget plans them first)
                bar.update(1)
                bar.set_postfix(loss=f"{step.loss:.4f}", **step.metrics)
    finally:
        bar.close()
    # named after its file: it is no longer the model it was trained from
    save_model(result.with_info(name=Path(args.output).stem), args.output)
    made = result.info.provenance.get("steps")
    planned = (result.info.provenance.get("train_config") or {}).get("steps", made)
    done = f"stopped at step {made}, " if stop.is_set() else ""
    print(f"{done}saved {args.output}", file=sys.stderr)
    if made != planned or args.seconds is not None or args.finetune:
        print(
            f"{made} of {planned} planned steps; to repeat this run exactly: --seed "
            f"{args.seed} --steps {planned}"
            + (f" --stop-after {made}" if made != planned else ""),
            file=sys.stderr,
        )
    return 0


def _is_model(spec: str) -> bool:
    """Whether ``--model`` names a model (bundled or a file), not a new network's JSON."""
    text = spec.strip()
    return not (text.startswith("{") or (text.endswith(".json") and Path(text).exists()))


def _num_classes(text: str):
    import json

    try:
        arch = json.loads(Path(text).read_text() if text.endswith(".json") else text)
    except (OSError, ValueError):
        return None  # said by _base_model
    return arch.get("num_classes", 2) if isinstance(arch, dict) else None  # (UNetConfig's)


@contextlib.contextmanager
def _first_interrupt_stops(stop: threading.Event):
    """Ctrl-C once: training ends after the current step and its result is saved;
    twice: abort without saving."""

    # Python runs a handler once for presses that come while one torch operation runs
    # (a step of seconds): the wakeup pipe gets a byte per press, so they are counted
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)

    def handler(signum, frame):
        try:
            presses = os.read(read_end, 64).count(bytes([signal.SIGINT]))
        except BlockingIOError:
            presses = 0
        if stop.is_set() or presses > 1:
            raise KeyboardInterrupt
        stop.set()
        print(
            "\nnapari-unet: stopping after this step and saving (Ctrl-C again to abort)",
            file=sys.stderr,
        )

    try:
        previous = signal.signal(signal.SIGINT, handler)
        previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
        os.close(read_end)
        os.close(write_end)
        yield
        return
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, previous)
        os.close(read_end)
        os.close(write_end)


COMMANDS = {
    "predict": cmd_predict,
    "models": cmd_models,
    "info": cmd_info,
    "train": cmd_train,
    "export": cmd_export,
}


if __name__ == "__main__":  # python -m napari_unet.cli ... (as napari-unet ...)
    sys.exit(main())
