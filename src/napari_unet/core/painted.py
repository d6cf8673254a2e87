"""The user's paint as training planes: image / annotation pairs of any dimension cut
into the 2D planes that carry paint, and checked for what cannot train.

A user paints sparse strokes (``0`` = not annotated, ``k`` = class ``k - 1``)
on one or more planes of one or more images (or pairs instance masks with them).
:func:`painted_planes` cuts the planes, :func:`check_annotations` refuses nothing
painted, a single class or labels the model has no class for, and
:func:`collect_planes` does both for a fine-tuning run.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    source: str  # e.g. "nuclei, plane 3"
    # the objects of a plane drawn from instance masks (ids, 0 = none), which give the
    # annotation the separation and contact weights of instance labels; else None
    objects: np.ndarray | None = None


def painted_planes(
    pairs: Sequence[tuple],
    in_channels: int,
    axes: str | None = None,
    num_classes: int = 3,
    convention: tuple[int, float] = DEFAULT_CONVENTION,
) -> tuple[list[PaintedPlane], list[np.ndarray]]:
    """Split ``(image, annotation, name[, kind[, axes[, offset]]])`` pairs into painted
    2D planes.

    The annotation has the image's shape without its channel axis, or covers part of the
    image from ``offset`` on (the image pixel under its first pixel, on each axis but
    the channels): the rest of the image is then not annotated. A pair's ``axes``
    (e.g. ``"CZYX"``) override ``axes`` (default: guessed from the shape). ``kind`` is
    ``"sparse"`` (default: ``0`` = not annotated, ``k`` = class ``k - 1``) or
    ``"instances"`` (a dense instance mask, ``0`` = background: its non-empty planes
    become background / interior / boundary paint covering the whole plane, or, for a
    mask of part of the image, all of its planes within that part (but the objects
    that its sides cut), drawn
    with ``convention`` = ``(boundary_width, core_fraction)``, the base model's
    own: :func:`napari_unet.core.targets.convention`).
    Returns the painted planes and the unpainted planes of the same images (at
    most 16), which the fine-tuning uses to re-estimate normalisation statistics.
    """

    planes, unpainted = [], []
    for pair in pairs:
        image, annotation, name, kind, ax, offset = _checked_pair(pair, axes, in_channels)
        spatial_axes = [a for a in ax.axes if a != "C"]
        full = (slice(None), slice(None))
        # (a mask of part of the image annotates all of that part, see _Box.paint)
        spatial = tuple(n for n, a in zip(image.shape, ax.axes) if a != "C")
        part = any(offset) or annotation.shape != spatial
        box = _Box(annotation, spatial_axes, offset, part, ax.yx)
        for lead in np.ndindex(*ax.leading_shape):
            paint, objects = box.paint(lead, kind, num_classes, convention)
            if paint.any() or len(unpainted) < 16:
                plane = ax.read(image, lead, *full)
                plane = plane[0] if plane.shape[0] == 1 else plane
            # ("name [2]" read as napari's name for a copy of a layer)
            source = f"{name}, plane {', '.join(map(str, lead))}" if lead else name
            if paint.any():
                if not _finite(plane):  # (said later, it named no image of several)
                    raise ValueError(
                        f"{source}: the image contains NaN or infinite values; fix or mask "
                        "them first"
                    )
                planes.append(PaintedPlane(plane, paint, source, objects))
            elif len(unpainted) < 16 and _finite(plane):  # (for statistics only)
                unpainted.append(plane)
    return planes, unpainted


def _finite(plane: np.ndarray) -> bool:
    return plane.dtype.kind != "f" or bool(np.isfinite(plane).all())


def _checked_pair(pair: tuple, axes: str | None, in_channels: int):
    """``(image, annotation, name, kind, axes, offset)`` of a pair, its annotation
    checked."""
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
    # (without an offset, the annotation must cover the whole image: a smaller one is
    # more likely a mistake than the top-left corner)
    given = len(pair) > 5 and pair[5] is not None
    offset = tuple(pair[5]) if given else (0,) * len(spatial)
    if len(offset) != len(spatial) or any(o != int(o) for o in offset):
        raise ValueError(
            f"the offset of {name!r}'s annotations, {offset}, must give a whole pixel on "
            f"each of the image's {len(spatial)} axes but its channels"
        )
    offset = tuple(int(o) for o in offset)
    end = np.add(offset, annotation.shape) if annotation.ndim == len(offset) else None
    if (
        end is None
        or min(offset, default=0) < 0
        or (end > spatial).any()
        or (not given and annotation.shape != spatial)
    ):
        where = f" from pixel {offset} on" if any(offset) else ""
        raise ValueError(
            f"annotations of {name!r} have shape {annotation.shape}{where} but the image's "
            f"pixels are {spatial}: paint on a layer made for this image"
        )
    if annotation.dtype.kind not in "uib":
        raise ValueError(f"annotations must be integer labels, got {annotation.dtype}")
    if annotation.size and annotation.min() < 0:
        raise ValueError(f"annotations of {name!r} contain negative labels")
    return image, annotation, name, kind, ax, offset


@dataclass
class _Box:
    """An annotation that covers the image's pixels from ``offset`` on."""

    annotation: np.ndarray
    spatial_axes: list  # the image's axes but C, e.g. ["Z", "Y", "X"]
    offset: tuple
    part: bool  # it covers part of the image (not all of it)
    yx: tuple  # the image's plane size

    def paint(self, lead: tuple, kind: str, num_classes: int, convention) -> tuple:
        """The ``(Y, X)`` paint of the image's plane ``lead`` (``0`` = not painted,
        ``k`` = class ``k - 1``), and its objects (instance masks, which become classes
        within the box only; else None)."""
        it, index = iter(lead), []
        for a, start, n in zip(self.spatial_axes, self.offset, self.annotation.shape):
            if a in "YX":
                index.append(slice(None))
                continue
            i = next(it) - start
            if not 0 <= i < n:  # a plane the annotation does not reach
                return np.zeros(self.yx, np.uint8), None
            index.append(i)
        # a copy: the layer's paint may go on changing while the run trains on it
        paint = np.array(self.annotation[tuple(index)])
        if self.spatial_axes.index("X") < self.spatial_axes.index("Y"):
            paint = paint.T
        y, x = (self.offset[self.spatial_axes.index(a)] for a in "YX")
        # a mask of part of the image annotates all of that part: a box without objects
        # is background (a 'Visible region only' result whose false positives were all
        # deleted); a whole-image mask, only its planes with objects
        ids = None
        if kind == "instances" and (paint.any() or self.part):
            # ids renumbered 1..n first, as training does (ids like 3e9 made per-id
            # tables of tens of GB; above 2**63 they failed)
            ids = renumbered(paint)
            paint = to_target(ids, "instances", num_classes, *convention) + 1
            paint = paint.astype(np.uint8)
            # an object that the box cuts (where the image goes on) has an extent the
            # box does not know, nor so its boundary and core: not annotated
            cut = _cut_objects(ids, (y, x), self.yx)
            paint[np.isin(ids, cut)] = 0
        objects = None if ids is None else _placed(ids, (y, x), self.yx)
        return _placed(paint, (y, x), self.yx), objects


def _placed(box: np.ndarray, start: tuple, yx: tuple) -> np.ndarray:
    """``box`` in a plane of ``yx`` zeros, from ``start`` on."""
    if box.shape == tuple(yx):
        return box
    (y, x), (h, w) = start, box.shape
    whole = np.zeros(yx, box.dtype)
    whole[y : y + h, x : x + w] = box
    return whole


def _cut_objects(ids: np.ndarray, start: tuple, yx: tuple) -> np.ndarray:
    """The ids of ``ids`` (a box of a ``yx`` plane from ``start`` on) on the box's sides
    that lie inside the plane."""
    (y, x), (h, w) = start, ids.shape
    sides = []
    if y > 0:
        sides.append(ids[0])
    if y + h < yx[0]:
        sides.append(ids[-1])
    if x > 0:
        sides.append(ids[:, 0])
    if x + w < yx[1]:
        sides.append(ids[:, -1])
    cut = np.unique(np.concatenate(sides)) if sides else np.zeros(0, ids.dtype)
    return cut[cut > 0]


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
                f"(labels 1..{k}: {', '.join(classes)}): erase label {top}, or, if the "
                "layer is a mask with one value per object, pair it 'as instance masks'"
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
