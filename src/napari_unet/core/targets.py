"""Training targets: label conventions, instance -> class masks, the paper's weight map.

Internally a target is an int64 array of class indices with ``-1`` where a
pixel is not annotated (ignored by the loss).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

IGNORE = -1
LABEL_KINDS = ("classes", "sparse", "instances")


def to_target(
    labels: np.ndarray,
    kind: str,
    num_classes: int,
    boundary_width: int = 2,
    core_fraction: float = 0.0,
):
    """Convert user labels to a target (``-1`` = ignore).

    ``kind``:
      * ``"classes"``: dense class indices ``0..K-1``;
      * ``"sparse"``: painted strokes, ``0`` = not annotated, ``k`` = class ``k - 1``;
      * ``"instances"``: dense instance ids (``0`` = background) turned into
        background / interior / boundary (``boundary_width`` px inner boundary,
        or the outer ``1 - core_fraction`` of each object's depth, see
        :func:`instances_to_classes`) for 3-class models, background / object for
        2-class models.
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "uib":
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        # -1 is the ignore value inside, but not a label a user gives: refused like -2
        raise ValueError("labels must not be negative")
    if kind == "classes":
        target = labels.astype(np.int64)
    elif kind == "sparse":
        target = labels.astype(np.int64) - 1
    elif kind == "instances" and num_classes == 2:
        target = (labels > 0).astype(np.int64)
    elif kind == "instances":
        target = instances_to_classes(labels, boundary_width, core_fraction).astype(np.int64)
    else:
        raise ValueError(f"label kind must be one of {LABEL_KINDS}, got {kind!r}")
    if target.max(initial=IGNORE) >= num_classes:
        values = np.unique(labels)
        binary = len(values) == 2 and values[0] == 0  # e.g. 0 / 255
        if binary and kind in ("sparse", "classes"):
            hint = (
                f" (a binary mask of 0 and {values[1]}? classes are numbered 0, 1, ...: write "
                f"it as 0 / 1 (mask > 0) for --label-kind classes; to separate touching "
                "objects, number each object 1, 2, ... and use --label-kind instances)"
            )
        elif kind in ("sparse", "classes"):
            hint = (
                " (are these instance masks, one id per object? then say so: label kind "
                "'instances', --label-kind instances)"
            )
        else:
            hint = ""
        raise ValueError(
            f"labels use class {int(target.max()) + (1 if kind == 'sparse' else 0)} but the "
            f"model has only {num_classes} classes{hint}"
        )
    if (target < IGNORE).any():
        raise ValueError("labels must not be negative")
    return target


def renumbered(lab: np.ndarray) -> np.ndarray:
    """int64 ids ``1..n`` in the order of the given ids, 0 staying 0, for any ids (uint64
    above 2**63 would wrap to negatives through int64; ids like 3e9 make per-id tables
    of tens of GB)."""
    ids, inverse = np.unique(np.asarray(lab), return_inverse=True)
    objects = ids != 0
    ranks = np.zeros(len(ids), np.int64)
    ranks[objects] = np.arange(1, int(objects.sum()) + 1)
    return ranks[inverse.reshape(np.shape(lab))]


def sequential_instances(lab: np.ndarray, what: str = "labels") -> np.ndarray:
    """Instance ids renumbered ``1..n`` (0 stays background) whatever their values (ids
    like 3e9 made per-id tables of tens of GB), with a warning where a single id covers
    several separate regions: a binary mask (e.g. 0/255) read as instances is one object,
    with no borders between touching ones."""
    import warnings

    lab = np.asarray(lab)
    renumber = lab.dtype.kind in "ui" and lab.size and lab.min() >= 0  # else to_target says
    ids, inverse = np.unique(lab, return_inverse=True) if renumber else (np.unique(lab), None)
    objects = ids[ids != 0]
    regions = ndi.label(lab == objects[0])[1] if len(objects) == 1 else 1
    if regions > 1:
        warnings.warn(
            f"{what} use one id ({objects[0]}) for {regions} separate "
            "regions, read as one object: instance masks give each object its own id "
            "(e.g. scipy.ndimage.label(mask > 0)); for a binary mask of classes write it as "
            "0 / 1 and use kind 'classes' (--label-kind classes)",
            UserWarning,
            stacklevel=3,
        )
    if inverse is None or (ids[0] == 0 and ids[-1] == ids.size - 1):
        return lab  # already 0..n (or refused by to_target)
    inverse = inverse.reshape(lab.shape).astype(np.int32)
    return inverse + 1 if ids[0] != 0 else inverse


def instances_to_classes(
    inst: np.ndarray, boundary_width: int = 2, core_fraction: float = 0.0
) -> np.ndarray:
    """Instance ids -> 0 background, 1 interior, 2 boundary (inner, ``boundary_width`` px).

    With ``core_fraction`` > 0 the interior is each object's *core*: the pixels
    deeper than ``core_fraction`` times the object's largest depth (distance to
    its edge, or to a touching object), and never closer than ``boundary_width``
    px to the edge. Cores of touching objects are then well apart whatever the
    objects' size, so they make clean watershed seeds; the rest of each object
    is boundary.
    """
    inst = np.asarray(inst)
    out = (inst > 0).astype(np.uint8)
    if core_fraction > 0:
        depth, share = _depth_share(inst)
        edge = (inst > 0) & ((depth < boundary_width) | (share < core_fraction))
    else:
        from skimage.segmentation import find_boundaries

        edge = find_boundaries(inst, mode="inner") & (inst > 0)
        if boundary_width > 1:
            edge = ndi.binary_dilation(edge, iterations=boundary_width - 1) & (inst > 0)
    out[edge] = 2
    return out


def core_share(
    inst: np.ndarray, boundary_width: int, core_fraction: float, ramp: float
) -> np.ndarray:
    """Soft interior targets: each object pixel's share of *interior* (the rest is boundary).

    The hard split of :func:`instances_to_classes` (interior where the depth is at
    least ``core_fraction`` of the object's largest depth) becomes a linear ramp
    from 0 at ``core_fraction - ramp / 2`` to 1 at ``core_fraction + ramp / 2``
    of the largest depth (0 closer than ``boundary_width`` px to the edge). A
    network trained on it predicts an interior probability that rises toward
    each object's centre and dips where touching objects meet, so its peaks
    separate objects whose hard cores would merge. Returns float32, ``-1`` on
    background (no soft target there).
    """
    inst = np.asarray(inst)
    depth, share = _depth_share(inst)
    ramp = max(float(ramp), 1e-6)
    q = np.clip((share - (core_fraction - ramp / 2)) / ramp, 0.0, 1.0)
    q[depth < boundary_width] = 0.0
    return np.where(inst > 0, q, -1.0).astype(np.float32)


def _depth_share(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per object pixel: depth (px to the object's edge or to a touching object, 0 on
    its inner boundary) and depth / the object's largest depth. Both 0 on background."""
    from skimage.segmentation import find_boundaries

    fg = inst > 0
    edge = find_boundaries(inst, mode="inner") & fg
    depth = ndi.distance_transform_edt(~edge & fg) if edge.any() else np.zeros(inst.shape)
    ids = np.arange(int(inst.max(initial=0)) + 1)
    deepest = np.zeros(len(ids))
    if len(ids) > 1:
        deepest[1:] = ndi.maximum(depth, inst, ids[1:])
    largest = deepest[np.clip(inst, 0, None)]
    share = np.divide(depth, largest, out=np.zeros(inst.shape), where=largest > 0)
    return depth, share


DEFAULT_CONVENTION = (2, 0.0)  # (boundary_width, core_fraction) of models with no record


def convention(info) -> tuple[int, float]:
    """``(boundary_width, core_fraction)`` that turned instance labels into the classes
    a model was trained on (its provenance), else :data:`DEFAULT_CONVENTION`.

    Training on instance labels from a base model, and fine-tuning with instance
    masks, must draw interior and boundary the way the base model learnt them: the
    bundled ``nuclei`` model's interior is each nucleus's core, and its boundary the
    rest of the nucleus.
    """
    cfg = _train_config(info)
    width, core = cfg.get("boundary_width"), cfg.get("core_fraction")
    return (
        DEFAULT_CONVENTION[0] if width is None else int(width),
        DEFAULT_CONVENTION[1] if core is None else float(core),
    )


def recorded_core_ramp(info) -> float:
    """The soft-core ramp a model was trained with (its provenance), else 0 (hard)."""
    return float(_train_config(info).get("core_ramp") or 0.0)


def _train_config(info) -> dict:
    return info.provenance.get("train_config") or {}


def contact_weights(inst: np.ndarray, w0: float = 10.0) -> np.ndarray:
    """``w0`` on object pixels next to *another* object (touching nuclei), else 0.

    The paper's separation term lives on the background gap between objects;
    objects annotated edge to edge have no gap, and the pixels that separate
    them are these. Returns float32.
    """
    inst = np.asarray(inst).astype(np.int64, copy=False)  # max() + 1 must not wrap around
    highest = ndi.grey_dilation(inst, size=(3, 3))  # background (0) never wins
    lowest = ndi.grey_erosion(np.where(inst > 0, inst, inst.max() + 1), size=(3, 3))
    touching = (inst > 0) & ((highest > inst) | (lowest < inst))
    return np.where(touching, np.float32(w0), np.float32(0))


def border_weights(inst: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """The paper's separation term ``w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` on background.

    ``d1``, ``d2`` are the distances to the nearest and second-nearest object;
    the term is large in thin gaps between touching objects. Returns float32
    (0 inside objects and where fewer than two objects are near).
    """
    # ids 1..n: find_objects keeps one entry per id up to the largest (3e9: MemoryError)
    inst = renumbered(inst)
    ids = np.unique(inst[inst > 0])
    shape = inst.shape
    d1 = np.full(shape, np.inf, np.float32)
    d2 = np.full(shape, np.inf, np.float32)
    reach = int(3 * sigma) + 2
    slices = ndi.find_objects(inst.astype(np.int64))
    for obj in ids:
        sl = slices[obj - 1]
        if sl is None:
            continue
        box = tuple(
            slice(max(0, s.start - reach), min(n, s.stop + reach)) for s, n in zip(sl, shape)
        )
        d = ndi.distance_transform_edt(inst[box] != obj).astype(np.float32)
        a, b = d1[box], d2[box]
        b[...] = np.where(d < a, a, np.minimum(b, d))
        a[...] = np.minimum(a, d)
    w = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
    w[inst > 0] = 0
    w[~np.isfinite(w)] = 0
    return w.astype(np.float32)


def class_weights(targets: list[np.ndarray], num_classes: int, power: float = 1.0) -> np.ndarray:
    """Inverse-frequency weights balancing the classes (mean 1 over annotated pixels).

    ``power`` softens them: weights go as ``1 / frequency ** power`` (1: fully
    balanced, 0.5: the square root, 0: all ones).
    """
    counts = np.zeros(num_classes)
    for t in targets:
        counts += np.bincount(t[t >= 0].ravel(), minlength=num_classes)[:num_classes]
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = (counts[present].sum() / counts[present]) ** power
    weights *= counts.sum() / (weights * counts).sum()
    return weights.astype(np.float32)
