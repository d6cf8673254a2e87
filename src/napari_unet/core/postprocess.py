"""From class probabilities to class labels and to one label per object."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

_BACKGROUND = ("background", "bg")
_BOUNDARY = ("boundary", "boundaries", "border", "borders", "contour", "contours", "edge", "edges")
_FOREGROUND = ("interior", "foreground", "fg", "inside", "object", "objects", "cell", "cells")
_FOREGROUND += ("nucleus", "nuclei", "mask")
CLASS_KEYS = ("seed", "boundary", "background", "foreground")  # recipe keys naming a class


def default_recipe(classes: list[str]) -> dict:
    """Instance recipe for a model that has none in its metadata, found by class name
    wherever the classes are (imported models do not all put background first)."""
    names = [str(c).lower() for c in classes]

    def find(words, taken=()):
        return next((i for i, n in enumerate(names) if n in words and i not in taken), None)

    background, boundary = find(_BACKGROUND), find(_BOUNDARY)
    if boundary is not None and len(names) >= 3:
        seed = find(_FOREGROUND, (background, boundary))
        rest = [i for i in range(len(names)) if i not in (background, boundary, seed)]
        seed = rest.pop(0) if seed is None else seed
        background = rest[0] if background is None else background
        return {
            "method": "watershed",
            "seed": seed,
            "boundary": boundary,
            "background": background,
        }
    foreground = find(_FOREGROUND, (background,))
    if foreground is None:
        others = [i for i in range(len(names)) if i != background]
        foreground = others[-1] if others else len(names) - 1
    return {"method": "components", "foreground": foreground}


def resolve_recipe(recipe: dict, classes: list[str] | None, num_classes: int) -> dict:
    """``recipe`` with class names (``"seed": "interior"``) turned into indices, and
    every class index checked against the ``num_classes`` outputs."""
    out = dict(recipe)
    lower = [str(c).lower() for c in classes or []]
    for key in CLASS_KEYS:
        value = out.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            if value.lower() not in lower:
                raise ValueError(
                    f"instance recipe {key} {value!r} is not one of the model's classes "
                    f"{list(classes or [])}"
                )
            value = lower.index(value.lower())
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"instance recipe {key} must be a class name or index, got {value!r}")
        if not 0 <= value < num_classes:
            raise ValueError(
                f"instance recipe {key} {value} is not a class index (the model has "
                f"{num_classes} outputs)"
            )
        out[key] = int(value)
    return out


METHODS = ("watershed", "components")
# a recipe's numbers: the largest value each may take (None: no limit)
_RECIPE_NUMBERS = {
    "seed_threshold": 1.0,
    "min_confidence": 1.0,
    "seed_peaks": 1.0,
    "min_seed_size": None,
    "unseeded_min_size": None,
    "seed_split": None,
}


def check_recipe(recipe: dict, classes: list[str] | None, num_classes: int) -> None:
    """Refuse a recipe that post-processing would refuse, before any work is done (a
    model file's broken recipe failed every run only after the network had run)."""
    resolve_recipe(recipe, classes, num_classes)
    method = recipe.get("method", "components")
    if method not in METHODS:
        raise ValueError(f"instance method {method!r} is unknown; use {' or '.join(METHODS)}")
    for key, top in _RECIPE_NUMBERS.items():
        value = recipe.get(key)
        if value is None:
            continue
        number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        if not number or not np.isfinite(value) or value < 0 or (top and value > top):
            span = f"between 0 and {top:g}" if top else "a number of at least 0"
            raise ValueError(f"instance recipe {key} must be {span}, got {value!r}")


def label_dtype(num_classes: int) -> np.dtype:
    """The dtype of class indices: uint8, or uint16 from 256 classes on."""
    return np.dtype(np.uint8 if num_classes < 256 else np.uint16)


def class_labels(probs: np.ndarray, dtype=None) -> np.ndarray:
    """Arg-max class per pixel of ``(K, ..., Y, X)`` probabilities (``> 0.5`` if K == 1),
    as ``dtype`` (by default :func:`label_dtype`)."""
    if dtype is None:
        dtype = label_dtype(probs.shape[0])
    if probs.shape[0] == 1:
        return (probs[0] > 0.5).astype(dtype)
    return probs.argmax(axis=0).astype(dtype)


def instances(
    probs: np.ndarray,
    recipe: dict | None = None,
    classes: list[str] | None = None,
    threshold: float = 0.5,
    min_size: int = 0,
    min_confidence: float | None = None,
    should_stop=None,
) -> np.ndarray:
    """One label per object from ``(K, ..., Y, X)`` probabilities, plane by plane.

    Recipes (``recipe["method"]``); their class keys (``seed``, ``boundary``,
    ``background``, ``foreground``) are indices or names from ``classes``, and without
    a recipe :func:`default_recipe` finds the classes by name:

    ``watershed``
        For background / interior / boundary models: seeds are connected regions
        where the interior probability exceeds ``recipe["seed_threshold"]``
        (default ``threshold``); they grow by watershed on the interior
        probability over the foreground ``1 - p(background) > threshold``.
        Seeds under ``recipe["min_seed_size"]`` pixels (default 4) are dropped.
        With ``recipe["seed_split"]`` = h > 0 (px), a seed region shaped like
        two touching blobs is split: its seeds become the h-maxima of its
        distance transform (smoothed by a 1-px Gaussian), and the objects grow
        on that distance instead of on the interior probability.
        With ``recipe["seed_peaks"]`` = h > 0 (probability), for models trained
        on soft cores (an interior probability that peaks at each object's
        centre): each seed region's seeds are the h-maxima of the interior
        probability (smoothed by a 1-px Gaussian) inside it, so two peaks joined
        by a ridge higher than the seed threshold still make two objects; a
        region with no such peak stays one seed.
        Foreground regions no seed reaches (small objects drawn all as
        boundary) become objects of their own if they have at least
        ``recipe["unseeded_min_size"]`` pixels (default 0: dropped).
    ``components``
        Connected components of ``p(foreground class) > threshold``.

    Objects whose mean foreground probability is under
    ``recipe["min_confidence"]`` (default 0: keep all) are dropped: faint,
    uncertain blobs the network half-believes in; ``min_confidence`` overrides
    it (e.g. 0 for dim images the model is unsure about). Labels are unique across
    planes of a stack; objects under ``min_size`` pixels are removed. Returns
    int32 ``(..., Y, X)``. ``should_stop()`` returning True before a plane raises
    :class:`~napari_unet.core.cancel.Cancelled` (a stack's planes take seconds each).
    """
    recipe = _effective(recipe, classes, probs.shape[0], min_confidence)
    lead = probs.shape[1:-2]
    out = np.zeros(probs.shape[1:], np.int32)
    next_label = 0
    for idx in np.ndindex(*lead):
        if should_stop is not None and should_stop():
            from napari_unet.core.cancel import Cancelled

            raise Cancelled("cancelled")
        plane = probs[(slice(None), *idx)]
        lab = _plane_instances(plane, recipe, threshold, min_size)
        lab[lab > 0] += next_label
        next_label = max(next_label, int(lab.max()))
        out[idx] = lab
    return out


def effective_recipe(info, min_confidence: float | None = None) -> dict:
    """The instance recipe :func:`instances` applies for a model's ``info`` (its own, or
    the default for its classes; ``min_confidence`` overriding its own)."""
    return _effective(info.instances, info.classes, info.num_classes, min_confidence)


def _effective(recipe, classes, num_classes: int, min_confidence) -> dict:
    classes = classes or [str(i) for i in range(num_classes)]
    recipe = resolve_recipe(recipe or default_recipe(classes), classes, num_classes)
    if min_confidence is not None:
        recipe["min_confidence"] = float(min_confidence)
    return recipe


def _plane_instances(p: np.ndarray, recipe: dict, threshold: float, min_size: int) -> np.ndarray:
    from skimage.segmentation import relabel_sequential, watershed

    method = recipe.get("method", "components")
    if method == "watershed":
        interior = p[int(recipe.get("seed", 1))]
        seed_t = float(recipe.get("seed_threshold", threshold))
        # one float plane for both the foreground and the objects' confidence
        confidence = 1.0 - p[int(recipe.get("background", 0))]
        foreground = confidence > threshold
        seeds, _ = ndi.label((interior > seed_t) & foreground)
        seeds = _remove_small(seeds, int(recipe.get("min_seed_size", 4)))
        energy = -interior
        if float(recipe.get("seed_split", 0)) > 0:
            seeds, energy = _split_seeds(seeds > 0, float(recipe["seed_split"]))
        elif float(recipe.get("seed_peaks", 0)) > 0:
            seeds, energy = _peak_seeds(seeds, interior, float(recipe["seed_peaks"]))
        lab = watershed(energy, markers=seeds, mask=foreground)
        del energy, seeds
        lab = _add_unseeded(lab, foreground, int(recipe.get("unseeded_min_size", 0)))
        del foreground
    elif method == "components":
        confidence = p[int(recipe.get("foreground", p.shape[0] - 1))]
        lab, _ = ndi.label(confidence > threshold)
    else:
        raise ValueError(f"unknown instance method {method!r}; use {' or '.join(METHODS)}")
    lab = _remove_small(lab.astype(np.int32, copy=False), min_size)
    lab = drop_unsure(lab, confidence, float(recipe.get("min_confidence", 0.0)))
    return relabel_sequential(lab)[0].astype(np.int32)


def _split_seeds(core: np.ndarray, h: float) -> tuple[np.ndarray, np.ndarray]:
    """Seeds at the h-maxima of the core's smoothed distance map, and that map negated."""
    from skimage.morphology import h_maxima

    depth = ndi.gaussian_filter(ndi.distance_transform_edt(core), 1.0)
    regions, _ = ndi.label(core)
    # (a core without a peak of its own got no seed: its nucleus was dropped, or taken
    # by a neighbour's watershed)
    return _peaks_or_regions(regions, h_maxima(depth, h).astype(bool) & core), -depth


def _peaks_or_regions(regions: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """Seeds at the components of ``peaks``; a region without one keeps itself as its
    seed."""
    labelled, n = ndi.label(peaks)
    has_peak = np.zeros(int(regions.max()) + 1, bool)
    has_peak[np.unique(regions[labelled > 0])] = True
    has_peak[0] = True
    rest = ~has_peak[regions]  # regions with no peak of their own: one seed each
    return np.where(rest, regions + n, labelled)


def _peak_seeds(
    regions: np.ndarray, interior: np.ndarray, h: float
) -> tuple[np.ndarray, np.ndarray]:
    """Seeds at the h-maxima of the smoothed interior probability within each seed
    region (a region without one keeps itself as its seed), and that map negated."""
    from skimage.morphology import h_maxima

    smooth = ndi.gaussian_filter(interior.astype(np.float32), 1.0)
    inside = regions > 0
    peaks = h_maxima(np.where(inside, smooth, 0), h).astype(bool) & inside
    return _peaks_or_regions(regions, peaks), -smooth


def _add_unseeded(lab: np.ndarray, foreground: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 0:
        return lab
    rest, n = ndi.label(foreground & (lab == 0))
    if n == 0:
        return lab
    rest = _remove_small(rest, min_size)
    return np.where(rest > 0, rest + lab.max(), lab)


def drop_unsure(lab: np.ndarray, confidence: np.ndarray, min_confidence: float) -> np.ndarray:
    """``lab`` without the objects whose mean ``confidence`` is under ``min_confidence``."""
    if min_confidence <= 0 or lab.max() == 0:
        return lab
    sums = np.bincount(lab.ravel(), weights=confidence.ravel())
    counts = np.bincount(lab.ravel())
    unsure = sums < min_confidence * counts  # mean under the limit (absent ids: kept)
    unsure[0] = False
    return np.where(unsure[lab], 0, lab)


def remove_small(lab: np.ndarray, min_size: int) -> np.ndarray:
    """``lab`` (instances, any shape) without the objects under ``min_size`` pixels,
    numbered 1..n again (int32); as it is where ``min_size`` removes nothing."""
    from skimage.segmentation import relabel_sequential

    if min_size <= 1:
        return lab
    return relabel_sequential(_remove_small(lab, min_size))[0].astype(np.int32)


def _remove_small(lab: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 1 or lab.max() == 0:
        return lab
    sizes = np.bincount(lab.ravel())
    small = sizes < min_size
    small[0] = False
    lab = lab.copy()
    lab[small[lab]] = 0
    return lab
