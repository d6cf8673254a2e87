"""One call from an image to what a user asked for: probabilities, class labels
or instances. Shared by the command line and the napari widgets."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, fields, replace

import numpy as np

from napari_unet.core import postprocess
from napari_unet.core.axes import resolve_axes
from napari_unet.core.resize import (
    ResizedView,
    resize_image,
    resize_yx,
    sample_axis,
    small_span,
)
from napari_unet.core.tiling import Progress, predict_iter, run_to_end

MODES = ("probabilities", "labels", "instances")


@dataclass(frozen=True)
class SegmentOptions:
    """What to compute and how (defaults: automatic tiles, instances)."""

    mode: str = "instances"
    axes: str | None = None
    tile: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    amp: bool = True
    threshold: float = 0.5
    min_size: int = 0
    min_confidence: float | None = None  # None: the model's instance recipe
    region: tuple[int, int, int, int] | None = None
    tta: bool = False  # average over mirrored tiles (4x the time)
    # typical object diameter in the image (px), or "auto" (estimated from a first
    # pass); the image is rescaled so objects have the model's ``object_diameter``,
    # by at most MAX_SCALE either way (a warning says when that is not enough).
    # None: segment at the image's own scale
    diameter: float | str | None = None
    # checked before every layer of the network: once true, the run raises
    # core.cancel.Cancelled within moments instead of finishing its tile (napari's Cancel)
    should_stop: Callable[[], bool] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("threshold", "min_confidence"):
            value = getattr(self, name)
            if value is None and name == "min_confidence":
                continue
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number from 0 to 1, got {value!r}")
            if not 0 <= value <= 1:  # (NaN fails too)
                raise ValueError(f"{name} must be from 0 to 1 (a probability), got {value!r}")
        for name, least in (("min_size", 0), ("tile", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if value is None and name != "min_size":
                continue
            whole = isinstance(value, numbers.Real) and float(value).is_integer()
            if isinstance(value, (bool, np.bool_)) or not whole:
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            if value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")


# rescaling by less than this factor (either way) is skipped
SCALE_TOLERANCE = 1.1
# nor more than this one (4x larger is 16x the pixels)
MAX_SCALE = 4.0


def lazy_gray(data):
    """Luminance of an RGB(A) image ``(..., Y, X, 3 or 4)`` (ITU-R 601), float32, computed
    block by block when read: describing or choosing an image costs nothing, and the
    panels' GUI thread converts nothing (the worker converts the tiles it reads)."""
    import dask.array as da

    if not hasattr(data, "dask"):
        # tile-sized chunks of one plane: reading a tile converts only its chunks (whole
        # planes made every tile of a 6000^2 image cost 4 s)
        # read through indexing only, without a name: dask copies a numpy array whole
        # and hashes it for a name (2.1 s on the GUI thread for 40 x 2048^2 RGB, at every
        # description of the layer)
        chunks = (1,) * (data.ndim - 3) + (512, 512, data.shape[-1])
        data = da.from_array(_Indexed(data), chunks=chunks, name=False, meta=data[:0])
    elif len(data.chunks[-1]) > 1:
        data = data.rechunk({data.ndim - 1: -1})  # the colours of a pixel in one block
    # one blockwise step: dask's astype, product and sum built a task per block and
    # step, 0.33 s for 200 x 8192^2 RGB, at every description of the layer (each camera
    # event of 'Visible region only')
    meta = np.empty((0,) * (data.ndim - 1), np.float32)
    return da.map_blocks(_gray, data, drop_axis=data.ndim - 1, dtype=np.float32, meta=meta)


_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601


def _gray(block: np.ndarray) -> np.ndarray:
    """Luminance of an RGB(A) block ``(..., 3 or 4)``, float32 (see :func:`lazy_gray`)."""
    return (block[..., :3].astype(np.float32) * _GRAY_WEIGHTS).sum(axis=-1)


class _Indexed:
    """An array seen only through indexing (dask's ``from_array`` copies what has a
    ``copy`` method)."""

    def __init__(self, array) -> None:
        self.array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, index):
        return self.array[index]


def segment(image, model, options: SegmentOptions | None = None, **kwargs) -> np.ndarray:
    """Segment ``image`` in one call, as ``napari-unet predict`` does: instances by default.

    ``segment(image, load_model("nuclei"))`` or, e.g., ``segment(image, model,
    mode="labels", axes="ZYX")``: the keywords are :class:`SegmentOptions` fields.
    """
    if options is not None and kwargs:
        raise TypeError("give SegmentOptions or keywords, not both")
    return run_to_end(segment_iter(image, model, options or SegmentOptions(**kwargs)))


def run_record(model, options: SegmentOptions) -> dict:
    """What makes a result, to record with it: the model, the settings as they took
    effect (the device run on, mixed precision only on CUDA, the instance recipe with
    its smallest confidence) and the version (the object size an "auto" run measures
    is added by its progress: ``detail``)."""
    from napari_unet import __version__
    from napari_unet.core.device import amp_applies, resolve_device

    record = {"model": model.info.name, "model_source": str(model.info.source or "")}
    for f in fields(options):
        value = getattr(options, f.name)
        if f.name != "should_stop":
            record[f.name] = list(value) if isinstance(value, tuple) else value
    device = resolve_device(options.device)
    record.update(device=str(device), amp=amp_applies(options.amp, device))
    if options.mode == "instances":
        recipe = postprocess.effective_recipe(model.info, options.min_confidence)
        record.update(min_confidence=recipe.get("min_confidence", 0.0), instance_recipe=recipe)
    return {**record, "napari_unet": __version__}


def segment_iter(image, model, options: SegmentOptions) -> Generator[Progress, None, np.ndarray]:
    """Yield progress, return the result for ``options.mode``.

    ``probabilities``: float32 ``(K, *leading, Y, X)``; ``labels``: uint8 class
    indices; ``instances``: int32 object labels ``(*leading, Y, X)``. With
    ``options.diameter`` the network sees the image rescaled so that its objects
    have the size the model was trained on; results come back at the image's size.
    """
    if not hasattr(image, "shape"):  # a nested list, say
        image = np.asarray(image)
    if options.diameter is None:
        return (yield from segment_at_iter(image, model, options, 1.0))
    factor, first = yield from scale_factor_iter(image, model, options)
    # (a region's size is measured on the whole plane: its first pass is not the region's)
    if factor == 1.0 and first is not None and options.mode == "instances" and not options.region:
        return first
    if factor != 1.0:
        yield Progress(0, 1, f"segmenting the image resized by {factor:.3g}")
    return (yield from segment_at_iter(image, model, options, factor))


def scale_factor_iter(image, model, options: SegmentOptions):
    """The factor that gives ``image``'s objects the model's ``object_diameter``
    (from ``options.diameter``: pixels, or ``"auto"``: measured on a first pass over the
    planes segmented, whole or, for a region of a large plane, around it: see
    :data:`MEASURE_AREA`).

    Returns ``(factor, first)``: factors within :data:`SCALE_TOLERANCE` of 1 are 1;
    ``first`` is the first pass's instances (None without one)."""
    target = model.info.object_diameter
    if not target:
        raise ValueError(
            f"model {model.info.name!r} records no object diameter, so images cannot be "
            "rescaled to it: leave the diameter unset"
        )
    first = None
    if options.diameter == "auto":
        yield Progress(0, 1, "estimating the object size")
        yx = resolve_axes(tuple(image.shape), options.axes, model.info.in_channels).yx
        window = _measured_region(yx, options.region)
        measure = replace(options, mode="instances", region=window)
        first = yield from segment_at_iter(image, model, measure, 1.0)
        found = median_diameter(_whole_objects(first, window, yx))
        factor = 1.0 if found is None else target / found  # nothing found: own scale
        measured = "measured"
    else:
        try:
            diameter = float(options.diameter)
        except (TypeError, ValueError):
            raise ValueError(
                f"diameter must be a number of pixels or 'auto', not {options.diameter!r}"
            ) from None
        if not 0 < diameter < float("inf"):
            raise ValueError(f"diameter must be a positive number, not {options.diameter!r}")
        factor, found, measured = target / diameter, diameter, "given"
    used = float(np.clip(factor, 1 / MAX_SCALE, MAX_SCALE))
    if used != factor:
        warnings.warn(
            f"objects of {target / factor:.1f} px would need the image resized by "
            f"{factor:.3g} to match the model's {target:.1f} px; resized by {used:.3g} "
            f"(the limit), so the network sees them at {target * used / factor:.1f} px",
            stacklevel=2,
        )
    used = 1.0 if max(used, 1 / used) < SCALE_TOLERANCE else used
    yield _sized(found, measured, target, used)
    return used, first


def _sized(found: float | None, how: str, target: float, factor: float) -> Progress:
    """What the sizing found, said and (``detail``) recorded with the result: the
    objects' diameter ``how`` ("measured" or "given"; None: none found) and the factor."""
    if found is None:
        said = "no objects found to measure their size: segmented at the image's own scale"
    else:
        resized = f"image resized by {factor:.3g}" if factor != 1.0 else "image not resized"
        said = f"objects {how} at {found:.1f} px, model's {target:.1f} px: {resized}"
    # unrounded: the diameter recorded, given again, gives the same factor
    found = None if found is None else float(found)
    return Progress(1, 1, said, detail={"object_diameter": found, "resized_by": float(factor)})


# "auto" measures objects on the whole plane up to this many pixels (a region asked for
# gets the whole plane's size, so that it equals the same pixels of a whole-plane
# result); beyond, on this many pixels around the region
MEASURE_AREA = 2048 * 2048


def _measured_region(yx: tuple[int, int], region) -> tuple[int, int, int, int] | None:
    """Where "auto" measures the object size for ``region`` of a ``yx`` plane: the whole
    plane (None), or a window of :data:`MEASURE_AREA` pixels centred on the region (at
    least the region) where the plane is larger."""
    h, w = yx
    if region is None or h * w <= MEASURE_AREA:
        return None
    y0, y1, x0, x1 = region
    side = int(MEASURE_AREA**0.5)
    return (*_window(y0, y1, side, h), *_window(x0, x1, side, w))


def _window(lo: int, hi: int, side: int, n: int) -> tuple[int, int]:
    """At least ``side`` pixels (and at least ``lo:hi``) of ``0:n`` around ``lo:hi``; a
    window of ``side`` starts on a grid of ``side / 4``, so that panning by less keeps it."""
    size = min(n, max(side, hi - lo))
    start = (lo + hi - size) // 2
    if size == side:
        step = max(1, side // 4)
        start = min(max(round(start / step) * step, hi - size), lo)  # (holds lo:hi)
    start = min(max(0, start), n - size)
    return start, start + size


def _whole_objects(labels, window, yx: tuple[int, int]):
    """``labels`` without the objects a measuring ``window`` of a ``yx`` plane cuts
    (those touching its sides inside the plane): cut objects look smaller than they are."""
    if window is None:
        return labels
    h, w = yx
    y0, y1, x0, x1 = window
    labels = np.array(labels)
    cut = [labels[..., 0, :]] if y0 > 0 else []
    cut += [labels[..., -1, :]] if y1 < h else []
    cut += [labels[..., :, 0]] if x0 > 0 else []
    cut += [labels[..., :, -1]] if x1 < w else []
    if cut:
        edge = np.unique(np.concatenate([c.ravel() for c in cut]))
        labels[np.isin(labels, edge[edge > 0])] = 0
    return labels


def median_diameter(labels: np.ndarray, min_area: int = 10) -> float | None:
    """Median equivalent diameter (px) of the objects of ``(..., Y, X)`` ``labels``,
    counted plane by plane; None when there is no object of ``min_area`` pixels."""
    lab = np.asarray(labels)
    planes = lab.reshape(-1, *lab.shape[-2:]) if lab.ndim > 2 else lab[None]
    # np.unique, not bincount: a stack's labels run high (unique across planes), and a
    # bincount per plane as long as the highest label grew with the square of the planes
    areas = [np.unique(p[p > 0], return_counts=True)[1] for p in planes if p.any()]
    areas = np.concatenate(areas) if areas else np.zeros(0)
    areas = areas[areas >= min_area]
    if not len(areas):
        return None
    return float(np.median(np.sqrt(4 * areas / np.pi)))


def segment_at_iter(image, model, options: SegmentOptions, factor: float):
    """Segment ``image`` resized by ``factor`` in Y and X (``options.diameter`` is not
    used); results at the image's size, ``options.min_size`` in the image's pixels."""
    if factor == 1.0:
        return (yield from _segment(image, model, options))
    ax = resolve_axes(tuple(image.shape), options.axes, model.info.in_channels)
    # the small image has the same axes (guessing them again from its shape can differ)
    options = replace(options, axes=ax.axes)
    order = 1 if options.mode == "probabilities" else 0
    # objects are measured at the image's size, after resampling (rounded into the small
    # image's pixels, min_size 30 kept a 29 px object)
    least, options = options.min_size, replace(options, min_size=0)
    if options.region is None:
        result = yield from _segment(resize_image(image, ax.axes, factor), model, options)
        return _at_least(resize_yx(result, ax.yx, order), options.mode, least)
    # a region: the pixels of the small image that the region's pixels are sampled from
    # (plus one for interpolation), sampled back exactly as a whole-image result would be;
    # the small image is resized where the tiles (and the normalisation's sample) read it
    small = ResizedView(image, ax.axes, factor)
    n = (small.shape[ax.axes.index("Y")], small.shape[ax.axes.index("X")])
    y0, y1, x0, x1 = options.region
    ys, xs = small_span(y0, y1, ax.yx[0], n[0]), small_span(x0, x1, ax.yx[1], n[1])
    options = replace(options, region=(*ys, *xs))
    result = yield from _segment(small, model, options)
    result = sample_axis(result, -2, y0, y1, ax.yx[0], n[0], ys[0], order)
    return _at_least(
        sample_axis(result, -1, x0, x1, ax.yx[1], n[1], xs[0], order), options.mode, least
    )


def _at_least(result: np.ndarray, mode: str, min_size: int) -> np.ndarray:
    """Instances without the objects under ``min_size`` pixels, numbered anew."""
    return postprocess.remove_small(result, min_size) if mode == "instances" else result


def engine_kwargs(options: SegmentOptions) -> dict:
    """The keywords of :func:`~napari_unet.core.tiling.predict_iter` for ``options``
    (class labels, or the probabilities instances are found in)."""
    return dict(
        axes=options.axes,
        tile=options.tile,
        batch_size=options.batch_size,
        device=options.device,
        amp=options.amp,
        output="labels" if options.mode == "labels" else "probabilities",
        region=options.region,
        tta=options.tta,
        should_stop=options.should_stop,
    )


def _segment(image, model, options: SegmentOptions):
    result = yield from predict_iter(image, model, **engine_kwargs(options))
    if options.mode == "instances":
        yield Progress(1, 1, "finding objects")
        info = model.info
        result = postprocess.instances(
            result,
            info.instances,
            info.classes,
            options.threshold,
            options.min_size,
            options.min_confidence,
            options.should_stop,
        )
    return result
