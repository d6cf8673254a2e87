"""``napari-unet predict``: segment image files with overlap-tile inference."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from napari_unet.cli._inputs import model_input
from napari_unet.cli._models import model_by_name, model_failure


def cmd_predict(args) -> int:
    from napari_unet.io import outputs
    from napari_unet.io.image_metadata import image_axes, image_calibration
    from napari_unet.io.images import check_readable, read_image

    missing = [src for src in args.inputs if not Path(src).exists()]
    if missing:
        raise ValueError(f"no such file: {', '.join(missing)} (nothing was processed)")
    targets = outputs.targets(args.inputs, args.output, args.mode)
    # before the model runs and any result is written, not after the first ones
    for src, dst in targets:
        check_readable(src)
        _check_target(dst, args)
    model = model_by_name(args.model, getattr(args, "trust_code", False))
    for src, _ in targets:  # opened lazily: an input the model cannot take stops the batch
        image, axes, _, _ = model_input(read_image(src), args.axes or image_axes(src), model)
        _check_input(image, axes, model, src)
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
    for i, (src, dst) in enumerate(targets):
        # axes as the file records them (OME, ImageJ), else guessed
        image, axes, note, planes = model_input(
            read_image(src), args.axes or image_axes(src), model
        )
        if note:
            print(f"{src}: {note}", file=sys.stderr)
        try:
            cal = image_calibration(src)  # pixel size and spacing, kept by a TIFF result
            with _named_warnings(Path(src).name):
                _predict_one(image, model, dst, args, Path(src).name, axes, cal, planes)
        except Exception as err:  # noqa: BLE001 - named below, or raised as it was
            raise _named(err, src, i) from None
        print(f"{src} -> {dst}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _named_warnings(name: str):
    """The warnings of one image's run, said after it with its name (a batch's second
    blank image was said as the first one's warning, once, and the third not at all)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = str(w.message)
        text = text if text.startswith(f"{name}:") else f"{name}: {text}"
        warnings.warn_explicit(text, w.category, w.filename, w.lineno)


def _named(err: Exception, src, i: int) -> Exception:
    """``err`` as a batch reports it: naming the input (of many) it came from."""
    from napari_unet.io.images import corrupt_data

    if corrupt_data(err):  # read lazily, tile by tile: a corrupt tile shows here
        return ValueError(f"{src}: its image data is corrupt ({err}){_done(i)}")
    if isinstance(err, (ValueError, OSError, RuntimeError)):
        if str(src) in str(err):
            return err
        kind = next(k for k in (OSError, RuntimeError, ValueError) if isinstance(err, k))
        return kind(f"{src}: {err}{_done(i)}")
    failure = model_failure(err)
    return err if failure is None else RuntimeError(f"{src}: {failure}{_done(i)}")


def _done(i: int) -> str:
    """What a batch stopped at its input ``i`` has written."""
    return f" (the {i} input(s) before it were written)" if i else " (nothing was written)"


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


def _predict_one(
    image,
    model,
    dst: Path,
    args,
    label: str,
    axes: str | None = None,
    calibration=None,
    planes: str = "",
) -> None:
    """Segment one image into ``dst`` (checked by :func:`_check_target`; a TIFF keeps
    the image's ``calibration``; the axis ``planes``, its channels, is written as C)."""
    from napari_unet.core.axes import resolve_axes
    from napari_unet.core.segment import SegmentOptions, run_record, segment_iter
    from napari_unet.io.images import write_image

    ax = resolve_axes(tuple(image.shape), axes, model.info.in_channels)
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
        diameter=_diameter(args.diameter, model.info),
    )
    lead = "".join(ax.axes[i] for i in ax.leading)  # the image's planes, then Y, X
    if planes and args.mode != "probabilities":  # (there C is the classes)
        lead = lead.replace(planes, "C")
    axes = ("C" if args.mode == "probabilities" else "") + lead + "YX"
    if dst.suffix.lower() == ".zarr":  # streamed at the image's own scale
        options = replace(options, diameter=None)
        # what the result is, in its attributes (a .zarr result carried none)
        attrs = {"axes": axes, "calibration": calibration, "model": model.info.name}
        _predict_to_zarr(image, model, ax, dst, options, label, args, attrs)
        return
    record = run_record(model, options)  # what made the result, written into its TIFF
    result = _with_bar(segment_iter(image, model, options), label, args.quiet, record)
    write_image(dst, result, axes, calibration, about=json.dumps(record, default=str))


def _predict_to_zarr(image, model, ax, dst: Path, options, label: str, args, attrs) -> None:
    """Class maps or labels streamed into a zarr store, which appears only when done;
    ``attrs`` (axes, calibration, model) go into its attributes, under ``napari_unet``."""
    from napari_unet.core.segment import engine_kwargs
    from napari_unet.core.tiling import output_dtype, predict_iter
    from napari_unet.io.images import ZarrOutput

    engine = engine_kwargs(options)
    shape = (*ax.leading_shape, *ax.yx)
    if engine["output"] == "probabilities":
        shape = (model.info.num_classes, *shape)
    dtype = output_dtype(engine["output"], model.info.num_classes).name
    attrs = {**attrs, "mode": args.mode}
    sink = ZarrOutput(dst, shape, dtype, attrs={"napari_unet": attrs})
    try:
        _with_bar(predict_iter(image, model, **engine, out=sink.array), label, args.quiet)
    except BaseException:
        sink.discard()
        raise
    sink.commit()


def _with_bar(gen, label: str, quiet: bool, record: dict | None = None):
    """Run a tiling generator to its end under a progress bar of tiles; its result.
    What a pass found (the objects' size: progress ``detail``) is said and put in ``record``."""
    from tqdm import tqdm

    from napari_unet.core.tiling import run_to_end

    def show(progress) -> None:
        if "tile" in progress.message:  # tiles of a pass (a rescaled image makes two)
            bar.total, bar.n = progress.total, progress.done
            bar.refresh()
        else:  # a phase between passes ("finding objects"), said beside the tiles
            bar.set_postfix_str(progress.message)
        if progress.detail and record is not None:
            record.update(progress.detail)
        if progress.detail and not quiet:
            bar.write(f"{label}: {progress.message}", file=sys.stderr)

    with tqdm(desc=label, unit="tile", disable=quiet, file=sys.stderr) as bar:
        return run_to_end(gen, show)


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
