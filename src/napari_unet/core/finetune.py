"""The annotate-and-retrain loop without Qt: the run.

The paint becomes 2D training planes in :mod:`napari_unet.core.painted`; the
versions a session makes are kept by :class:`napari_unet.core.versions.ModelVersions`.
A run is :func:`finetune_iter`: :func:`napari_unet.core.training.train_iter`
(with :meth:`TrainConfig.finetune <napari_unet.core.training.TrainConfig.finetune>`)
framed by the painted-pixel accuracy before and after, with live previews.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from napari_unet.core.painted import PaintedPlane, collect_planes
from napari_unet.model.info import LoadedModel


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
    """A live prediction (class index + 1) of the preview plane by the network in training;
    ``labels`` None: the plane cannot be segmented (``note`` says why), and the run goes
    on without previews."""

    step: int
    labels: np.ndarray | None
    note: str = ""


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
    from napari_unet.core.segment import SegmentOptions
    from napari_unet.core.training import STOPPED_EARLY, Phase, check_trainable, train_iter

    check_trainable(model)  # before the seconds of predicting the painted pixels
    scales: tuple[float, ...] = ()
    preview_scale = 1.0
    if diameter is not None and model.info.object_diameter:
        yield Phase("measuring the object size")
        sizing = SegmentOptions(
            device=cfg.device, diameter=diameter, should_stop=_either(should_stop, should_cancel)
        )
        try:
            scales = tuple(_scale(model, p.image, None, sizing) for p in planes)
            if preview is not None:
                preview_scale = _scale(model, preview[0], preview[1], sizing)
        except Cancelled:  # (a whole segmentation of every painted plane: seconds)
            raise Cancelled(STOPPED_EARLY) from None
        planes = [rescaled_plane(p, f) for p, f in zip(planes, scales)]
        typical = float(np.exp(np.mean(np.log(scales))))
        unpainted = [_resize(u, typical) for u in unpainted]
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
        objects=[p.objects for p in planes],
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
                if shown.labels is None:
                    preview = None  # (the same plane again would fail again)
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
    except ValueError as err:  # the plane in view (NaN padding...): not the training's
        return Preview(step.step, None, f"no preview of the plane in view: {err}")
    return Preview(step.step, labels.astype(np.uint8) + 1)


def finetune_pairs_iter(model: LoadedModel, pairs: Sequence[tuple], cfg, **kwargs):
    """:func:`finetune_iter` on the pairs of :func:`~napari_unet.core.painted.painted_planes`
    (``(image, annotation, name, kind, axes, offset)``, the last three optional): the planes are
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
    from napari_unet.core.resize import resize_labels

    image = _resize(plane.image, factor)
    size = image.shape[-2:]
    objects = None if plane.objects is None else resize_labels(plane.objects, size)
    return PaintedPlane(image, resize_labels(plane.annotation, size), plane.source, objects)


def _resize(image: np.ndarray, factor: float) -> np.ndarray:
    from napari_unet.core.resize import resize_image

    return resize_image(image, _plane_axes(image), factor)


def _plane_axes(image: np.ndarray) -> str:
    """Axes of a painted plane's image: ``(Y, X)`` or ``(C, Y, X)``."""
    return "YX" if image.ndim == 2 else "CYX"


def _scale(model, image, axes, options) -> float:
    """The factor segmentation with ``options`` (its ``diameter``) would rescale
    ``image`` by."""
    from napari_unet.core.segment import scale_factor_iter
    from napari_unet.core.tiling import run_to_end

    options = replace(options, axes=axes or _plane_axes(image))
    return run_to_end(scale_factor_iter(image, model, options))[0]
