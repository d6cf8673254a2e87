"""The annotate-and-retrain loop without Qt: painted planes, checks, the run.

A user paints sparse strokes (``0`` = not annotated, ``k`` = class ``k - 1``)
on one or more planes of one or more images. :func:`painted_planes` turns
image / annotation pairs of any dimension into the 2D planes that carry paint,
:func:`check_annotations` refuses what cannot train (nothing painted, a single
class, paint outside the image); the versions a session makes are kept by
:class:`napari_unet.core.versions.ModelVersions`.
A run is :func:`finetune_iter`: :func:`napari_unet.core.training.train_iter`
(with :meth:`TrainConfig.finetune <napari_unet.core.training.TrainConfig.finetune>`)
framed by the painted-pixel accuracy before and after, with live previews.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import numpy as np

from napari_unet.core.axes import resolve_axes
from napari_unet.core.targets import DEFAULT_CONVENTION, renumbered, to_target
from napari_unet.model.info import LoadedModel


@dataclass
class PaintedPlane:
    """One 2D plane with paint: ``image`` is ``(Y, X)`` or ``(C, Y, X)``."""

    image: np.ndarray
    annotation: np.ndarray
    source: str  # e.g. "nuclei [t=3]"


def painted_planes(
    pairs: Sequence[tuple],
    in_channels: int,
    axes: str | None = None,
    num_classes: int = 3,
    convention: tuple[int, float] = DEFAULT_CONVENTION,
) -> tuple[list[PaintedPlane], list[np.ndarray]]:
    """Split ``(image, annotation, name[, kind[, axes]])`` pairs into painted 2D planes.

    The annotation has the image's shape without its channel axis. A pair's ``axes``
    (e.g. ``"CZYX"``) override ``axes`` (default: guessed from the shape). ``kind`` is
    ``"sparse"`` (default: ``0`` = not annotated, ``k`` = class ``k - 1``) or
    ``"instances"`` (a dense instance mask, ``0`` = background: its non-empty planes
    become background / interior / boundary paint covering the whole plane, drawn
    with ``convention`` = ``(boundary_width, core_fraction)``, the base model's
    own: :func:`napari_unet.core.targets.convention`).
    Returns the painted planes and the unpainted planes of the same images (at
    most 16), which the fine-tuning uses to re-estimate normalisation statistics.
    """

    planes, unpainted = [], []
    for pair in pairs:
        image, annotation, name, kind, ax = _checked_pair(pair, axes, in_channels)
        spatial_axes = [a for a in ax.axes if a != "C"]
        full = (slice(None), slice(None))
        for lead in np.ndindex(*ax.leading_shape):
            paint = _paint(annotation, lead, spatial_axes, kind, num_classes, convention)
            if paint.any() or len(unpainted) < 16:
                plane = ax.read(image, lead, *full)
                plane = plane[0] if plane.shape[0] == 1 else plane
            source = f"{name} {list(lead)}" if lead else name
            if paint.any():
                if not _finite(plane):  # (said later, it named no image of several)
                    raise ValueError(
                        f"{source}: the image contains NaN or infinite values; fix or mask "
                        "them first"
                    )
                planes.append(PaintedPlane(plane, paint, source))
            elif len(unpainted) < 16 and _finite(plane):  # (for statistics only)
                unpainted.append(plane)
    return planes, unpainted


def _finite(plane: np.ndarray) -> bool:
    return plane.dtype.kind != "f" or bool(np.isfinite(plane).all())


def _checked_pair(pair: tuple, axes: str | None, in_channels: int):
    """``(image, annotation, name, kind, axes)`` of a pair, its annotation checked."""
    image, annotation, name = pair[:3]
    kind = pair[3] if len(pair) > 3 else "sparse"
    if kind not in ("sparse", "instances"):
        raise ValueError(f"annotation kind must be 'sparse' or 'instances', got {kind!r}")
    # a lazy image (dask, zarr) stays lazy: only the painted planes and a few unpainted
    # ones are read (np.asarray read a whole 150-plane stack for one painted plane)
    image = image if hasattr(image, "shape") and hasattr(image, "dtype") else np.asarray(image)
    annotation = np.asarray(annotation)
    ax = resolve_axes(image.shape, pair[4] if len(pair) > 4 else axes, in_channels)
    spatial = tuple(s for s, a in zip(image.shape, ax.axes) if a != "C")
    if annotation.shape != spatial:
        raise ValueError(
            f"annotations of {name!r} have shape {annotation.shape} but the image's "
            f"pixels are {spatial}: paint on a layer made for this image"
        )
    if annotation.dtype.kind not in "uib":
        raise ValueError(f"annotations must be integer labels, got {annotation.dtype}")
    if annotation.size and annotation.min() < 0:
        raise ValueError(f"annotations of {name!r} contain negative labels")
    return image, annotation, name, kind, ax


def _paint(annotation, lead: tuple, spatial_axes: list, kind: str, num_classes: int, convention):
    """The ``(Y, X)`` paint of one plane (``0`` = not painted, ``k`` = class ``k - 1``)."""
    it = iter(lead)
    index = tuple(slice(None) if a in "YX" else next(it) for a in spatial_axes)
    paint = np.asarray(annotation[index])
    if spatial_axes.index("X") < spatial_axes.index("Y"):
        paint = paint.T
    if kind == "instances" and paint.any():
        # ids renumbered 1..n first, as training does (ids like 3e9 made per-id
        # tables of tens of GB; above 2**63 they failed)
        paint = to_target(renumbered(paint), "instances", num_classes, *convention) + 1
        paint = paint.astype(np.uint8)
    return paint


def check_annotations(planes: Sequence[PaintedPlane], classes: Sequence[str]) -> dict:
    """Refuse annotations that cannot train; return painted pixels per class name."""
    if not planes:
        raise ValueError(
            "nothing is painted yet: paint a few strokes of each class on the annotation layer"
        )
    k = len(classes)
    if k < 2:
        raise ValueError(
            f"this model has {k} output class{'es' if k != 1 else ''} "
            f"({', '.join(classes) or 'none'}); fine-tuning paints and trains at least two "
            "(e.g. background and foreground): load a model with two or more classes"
        )
    counts = np.zeros(k + 1, np.int64)
    for p in planes:
        top = int(p.annotation.max())
        if top > k:
            raise ValueError(
                f"label {top} is painted on {p.source} but the model has {k} classes "
                f"(labels 1..{k}: {', '.join(classes)}); a mask with one value per object "
                "trains as instance masks (fine-tune panel: 'as instance masks')"
            )
        counts += np.bincount(p.annotation.ravel().astype(np.int64), minlength=k + 1)
    painted = {classes[i]: int(counts[i + 1]) for i in range(k) if counts[i + 1]}
    if len(painted) < 2:
        only = next(iter(painted))
        raise ValueError(
            f"only {only!r} is painted: paint at least two classes (e.g. some "
            f"{[c for c in classes if c != only][0]!r} too), or the model learns one answer"
        )
    return painted


def painted_accuracy(
    model: LoadedModel, planes: Sequence[PaintedPlane], device="cpu", should_stop=None
) -> float:
    """Share of painted pixels whose predicted class is the painted one
    (``should_stop``: see :func:`~napari_unet.core.tiling.predict_iter`)."""
    from napari_unet.core.tiling import predict

    right = total = 0
    for p in planes:
        painted = p.annotation > 0
        if not painted.any():
            continue
        # only the box around the paint (with the whole plane's context and statistics,
        # so the same answer): a few strokes on a 2048^2 plane took 11 s per pass
        ys, xs = np.nonzero(painted)
        box = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
        pred = predict(
            p.image,
            model,
            axes=_plane_axes(p.image),
            device=device,
            region=box,
            should_stop=should_stop,
        ).argmax(0)
        inside = painted[box[0] : box[1], box[2] : box[3]]
        truth = p.annotation[box[0] : box[1], box[2] : box[3]][inside].astype(np.int64) - 1
        right += int((pred[inside] == truth).sum())
        total += int(inside.sum())
    return right / total if total else float("nan")


# the most time live previews take, as a share of the training time
PREVIEW_SHARE = 0.5


@dataclass
class Preview:
    """A live prediction (class index + 1) of the preview plane by the network in training."""

    step: int
    labels: np.ndarray


@dataclass
class Finished:
    """What a fine-tuning run returns."""

    model: LoadedModel
    accuracy_before: float
    accuracy_after: float
    steps: int
    seconds: float
    stopped: bool
    scales: tuple[float, ...] = ()  # the painted planes' rescaling factors (diameter)
    planned: int = 0  # the steps planned (fewer were made when the time budget ran out)


def finetune_iter(
    model: LoadedModel,
    planes: Sequence[PaintedPlane],
    unpainted: Sequence[np.ndarray],
    cfg,
    *,
    preview: tuple | None = None,
    preview_every: int = 0,
    should_stop: Callable[[], bool] | None = None,
    data_name: str = "painted planes",
    diameter: float | str | None = None,
    skip_preview: Callable[[], bool] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Generator[object, None, Finished]:
    """Fine-tune a copy of ``model`` on painted planes; yields a
    :class:`~napari_unet.core.training.Phase` before each setup stage (checking the
    paint, normalisation, pseudo-labels, ...), each
    :class:`~napari_unet.core.training.TrainStep` and, every ``preview_every``
    steps, a :class:`Preview` of ``preview = (data, axes, region)``; returns
    :class:`Finished` (closing the generator discards the run).

    ``diameter`` (pixels or ``"auto"``, for models that record an
    ``object_diameter``): the planes are rescaled to the model's object size, as
    segmentation with that diameter does, so that the network learns at the
    scale it will be used at.

    ``skip_preview()`` returning True during a preview drops it (the run goes on): a
    caller's Pause is not kept waiting for a whole-plane prediction. Previews take at
    most about :data:`PREVIEW_SHARE` of the training time: a due preview is skipped
    while they took more (a time budget's run lasts at most 1.5x the budget and one
    preview).

    ``should_cancel()`` returning True cuts the last check of the painted pixels short
    (it can take seconds on large planes; a Stop, which ends only the steps, must not):
    the result then has no accuracy after (NaN), and the caller is dropping it anyway."""
    from napari_unet.core.cancel import Cancelled
    from napari_unet.core.training import STOPPED_EARLY, Phase, check_trainable, train_iter

    check_trainable(model)  # before the seconds of predicting the painted pixels
    scales: tuple[float, ...] = ()
    preview_scale = 1.0
    if diameter is not None and model.info.object_diameter:
        scales = tuple(_scale(model, p.image, None, diameter, cfg.device) for p in planes)
        planes = [rescaled_plane(p, f) for p, f in zip(planes, scales)]
        typical = float(np.exp(np.mean(np.log(scales))))
        unpainted = [_resize(u, typical) for u in unpainted]
        if preview is not None:
            preview_scale = _scale(model, preview[0], preview[1], diameter, cfg.device)
    stops_preview = _either(should_stop, skip_preview)
    yield Phase("checking the painted pixels")
    try:
        before = painted_accuracy(model, planes, device=cfg.device, should_stop=should_stop)
    except Cancelled:
        raise Cancelled(STOPPED_EARLY) from None
    gen = train_iter(
        model,
        [p.image for p in planes],
        [p.annotation for p in planes],
        "sparse",
        cfg,
        data_name=data_name,
        unlabelled=unpainted,
        should_stop=should_stop,
        phases=True,
    )
    step = None
    previewing = 0.0  # seconds spent on previews
    while True:
        try:
            report = next(gen)
        except StopIteration as done:
            result = done.value
            break
        yield report
        if isinstance(report, Phase):
            continue
        step = report
        due = preview is not None and preview_every and step.step % preview_every == 0
        # previews are not training time: the budget's steps ran, and whole-plane previews
        # made a 12 s run on a 2048^2 view take 104 s; so a due preview is skipped while
        # the previews so far took more than PREVIEW_SHARE of the training time
        if due and previewing <= PREVIEW_SHARE * step.elapsed:
            began = time.perf_counter()
            shown = _preview(step, preview, preview_scale, cfg.device, stops_preview)
            previewing += time.perf_counter() - began
            if shown is not None:
                yield shown
    if any(f != 1.0 for f in scales):  # what repeating the run needs (train does not)
        provenance = {**result.info.provenance, "rescaled": [round(f, 6) for f in scales]}
        result = result.with_info(provenance=provenance)
    yield Phase("checking the result on the painted pixels")
    try:
        after = painted_accuracy(result, planes, device=cfg.device, should_stop=should_cancel)
    except Cancelled:
        after = float("nan")
    # ended early by Stop (a Stop after the last step ended nothing)
    stopped = should_stop is not None and should_stop()
    if step is None:
        return Finished(result, before, after, 0, 0.0, stopped, scales, 0)
    stopped = stopped and step.step < step.steps
    return Finished(result, before, after, step.step, step.elapsed, stopped, scales, step.steps)


def _preview(step, preview: tuple, scale: float, device, should_stop) -> Preview | None:
    """The labels of ``preview = (data, axes, region)`` by the network at ``step``
    (None when ``should_stop()``: Stop, Cancel or Pause during a preview)."""
    from napari_unet.core.cancel import Cancelled
    from napari_unet.core.segment import SegmentOptions, segment_at_iter
    from napari_unet.core.tiling import run_to_end

    data, axes, region = preview
    options = SegmentOptions(
        "labels", axes=axes, region=region, device=device, should_stop=should_stop
    )
    try:
        labels = run_to_end(segment_at_iter(data, step.snapshot(), options, scale))
    except Cancelled:
        return None
    return Preview(step.step, labels.astype(np.uint8) + 1)


@dataclass
class Collected:
    """The annotations a fine-tuning run found (the first thing it reports)."""

    planes: int
    painted: dict  # painted pixels per class name
    data_name: str  # what the provenance calls the training data

    @property
    def what(self) -> str:
        """``"120 px background, 80 px interior"``."""
        return ", ".join(f"{v} px {k}" for k, v in self.painted.items())


def collect_planes(model: LoadedModel, pairs: Sequence[tuple]):
    """Painted planes, unpainted planes, painted pixels per class and a description of
    ``(image, annotation, name, kind)`` pairs, checked as fine-tuning ``model`` needs."""
    from napari_unet.core.targets import convention

    planes, unpainted = painted_planes(
        pairs,
        model.info.in_channels,
        num_classes=model.info.num_classes,
        convention=convention(model.info),
    )
    collected = Collected(len(planes), check_annotations(planes, model.info.classes), "")
    sources = "; ".join(sorted({p.source for p in planes}))
    collected.data_name = f"{len(planes)} painted plane(s) ({collected.what}): {sources}"
    return planes, unpainted, collected


def finetune_pairs_iter(model: LoadedModel, pairs: Sequence[tuple], cfg, **kwargs):
    """:func:`finetune_iter` on ``(image, annotation, name, kind)`` pairs: the planes are
    cut and checked first, inside the generator (so in a GUI's worker thread: lazy stacks
    are read and instance masks turned into classes there, not in the event loop), and
    reported as a :class:`Collected` before the first step."""
    planes, unpainted, collected = collect_planes(model, pairs)
    yield collected
    return (
        yield from finetune_iter(
            model, planes, unpainted, cfg, data_name=collected.data_name, **kwargs
        )
    )


def _either(*asks):
    """A ``should_stop`` that is true when any of ``asks`` (None: never) is."""
    asks = [a for a in asks if a is not None]
    return (lambda: any(a() for a in asks)) if asks else None


def rescaled_plane(plane: PaintedPlane, factor: float) -> PaintedPlane:
    """``plane`` resized by ``factor`` in Y and X (image linear, paint nearest)."""
    if factor == 1.0:
        return plane
    from napari_unet.core.segment import resize_labels

    image = _resize(plane.image, factor)
    return PaintedPlane(image, resize_labels(plane.annotation, image.shape[-2:]), plane.source)


def _resize(image: np.ndarray, factor: float) -> np.ndarray:
    from napari_unet.core.segment import resize_image

    return resize_image(image, _plane_axes(image), factor)


def _plane_axes(image: np.ndarray) -> str:
    """Axes of a painted plane's image: ``(Y, X)`` or ``(C, Y, X)``."""
    return "YX" if image.ndim == 2 else "CYX"


def _scale(model, image, axes, diameter, device) -> float:
    """The factor segmentation with ``diameter`` would rescale ``image`` by."""
    from napari_unet.core.segment import SegmentOptions, scale_factor_iter
    from napari_unet.core.tiling import run_to_end

    options = SegmentOptions(axes=axes or _plane_axes(image), device=device, diameter=diameter)
    return run_to_end(scale_factor_iter(image, model, options))[0]
