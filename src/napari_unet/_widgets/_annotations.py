"""Annotation layers of the fine-tune panel: made, paired, followed and filled.

An annotation layer is a napari Labels layer whose metadata names the image it
annotates (``ANNOTATION_KEY``) and how it is read (``KIND_KEY``): painted classes
(0 = not annotated, k = class k - 1) or instance masks.
"""

from __future__ import annotations

import re

import numpy as np

from napari_unet._widgets._layers import transformed
from napari_unet._widgets._results import ANNOTATION_KEY, RESULT_KEY

KIND_KEY = "napari_unet_kind"  # layer.metadata: "sparse" (painted classes) or "instances"
CLASS_COLORS = ["#4a90d9", "#3cb44b", "#e6194b", "#ffe119", "#f58231", "#911eb4", "#46f0f0"]
UNKNOWN_COLOR = "#ffffff"  # a label beyond the model's classes

# the most pixels a fill writes through napari's undo history, which costs the GUI thread
# 0.13 s per million pixels and 25 MB (1400^2 took 0.31 s); larger fills are written
# directly, not undoable (4096^2 in 0.08 s)
UNDOABLE_FILL = 1 << 20


def annotation_colormap(classes, hidden: str | None = None):
    """Class k + 1 in its own colour, 0 (not annotated) transparent, and a label beyond
    the classes white: Train refuses such strokes (napari's label +1 key paints them),
    so they must be seen to be erased. The class named ``hidden`` is transparent too
    (a preview's background, which hid the image under it)."""
    from napari.utils.colormaps import DirectLabelColormap

    colors = {0: "transparent", None: UNKNOWN_COLOR}
    for k, name in enumerate(classes):
        shown = hidden is None or str(name).lower() != hidden
        colors[k + 1] = CLASS_COLORS[k % len(CLASS_COLORS)] if shown else "transparent"
    return DirectLabelColormap(color_dict=colors)


def annotation_layers(viewer, image_name: str | None = None, kind: str | None = None):
    """The viewer's annotation layers (of one image, of one kind)."""
    from napari.layers import Labels

    return [
        layer
        for layer in viewer.layers
        if isinstance(layer, Labels)
        and layer.metadata.get(ANNOTATION_KEY)
        and (image_name is None or layer.metadata[ANNOTATION_KEY] == image_name)
        and (kind is None or layer.metadata.get(KIND_KEY, "sparse") == kind)
    ]


def add_annotation_layer(viewer, image_name: str, job, classes):
    """A new, empty annotation layer over ``job``'s image, in paint mode;
    returns it and the message that says what to paint."""
    name = f"{image_name} annotations"
    n = 1
    while name in viewer.layers:
        n += 1
        name = f"{image_name} annotations {n}"
    labels = viewer.add_labels(
        np.zeros(job.output_shape(), np.uint8),
        name=name,
        **job.placement(),
        features={"class": ["not annotated", *classes]},
        colormap=annotation_colormap(classes),
        metadata={ANNOTATION_KEY: image_name},
        opacity=0.8,
    )
    labels.mode = "paint"
    labels.brush_size = 3
    labels.selected_label = min(2, len(classes))
    legend = ", ".join(f"{k + 1} = {c}" for k, c in enumerate(classes))
    return labels, f"Paint on '{name}': {legend} (0 = not annotated)."


def pair_labels(labels, image_name: str, kind: str, part: str = "") -> str:
    """Make the user's Labels layer annotate ``image_name`` as ``kind``; says how.
    ``part``: the :func:`covered_part` of the image it annotates."""
    labels.metadata[ANNOTATION_KEY] = image_name
    labels.metadata[KIND_KEY] = kind
    if kind != "instances":
        what = "painted classes (0 = not annotated, k = class k - 1)"
    elif part:
        what = "instance masks (0 = background; all of it is used, but objects its sides cut)"
    else:
        what = "instance masks (0 = background; every plane with objects is used in full)"
    return f"'{labels.name}' annotates '{image_name}' as {what}.{part}"


def pixel_offset(labels, job, image_name: str) -> tuple[tuple[int, ...] | None, str]:
    """Where ``labels`` lies on ``job``'s image: ``(offset, "")``, the image pixel under
    its first pixel on each axis but the channels, or ``(None, why)`` when it does not
    lie on the image's pixels. Its pixel (i, j) is trained against the image's pixel
    under it on screen, so a layer that covers part of the image (a 'Current plane only'
    or 'Visible region only' result, a crop of the user's) annotates that part. napari
    lines layers up by their last axes; a layer of the user's may lack the one-plane
    channel axis of the image's outputs."""
    own = tuple(np.shape(job.collapse(labels.data)))
    pixels = tuple(n for n, a in zip(np.shape(job.data), job.axes) if a != "C")
    if len(own) != len(pixels):
        return None, (
            f"'{labels.name}' has {len(own)} axes {_numbers(own)} but its image "
            f"'{image_name}' {len(pixels)} {_numbers(pixels)}: paint on a new annotation "
            "layer for it"
        )
    scale, translate = list(job.scale), list(job.translate)
    own_scale, own_translate = list(labels.scale), list(labels.translate)
    units = list(job.units) if job.units is not None else None
    own_units = getattr(labels, "units", None)
    own_units = list(own_units) if own_units is not None else None
    if job.channel_at is not None:  # (on the image's axes: the channel's place says nothing)
        del scale[job.channel_at], translate[job.channel_at]
        if units is not None:
            del units[job.channel_at]
        if len(own_scale) > len(own):
            del own_scale[job.channel_at], own_translate[job.channel_at]
            if own_units is not None:
                del own_units[job.channel_at]
    n = len(own)
    scale = np.asarray(scale[-n:], float)
    # napari shows a layer in nm beside one in um at its size: compare in the image's units
    factor = _unit_factors(own_units, units, n)
    mine = np.asarray(own_scale[-n:], float) * factor
    start = (np.asarray(own_translate[-n:], float) * factor - translate[-n:]) / scale
    offset = np.round(start).astype(int)
    moved = transformed(labels)
    on_grid = np.allclose(mine, scale, rtol=1e-6, atol=0) and np.allclose(start, offset, atol=0.01)
    if on_grid and not moved:
        if (offset >= 0).all() and (offset + own <= pixels).all():
            return tuple(int(o) for o in offset), ""
        return None, (
            f"'{labels.name}' reaches beyond '{image_name}' (its {_numbers(own)} pixels "
            f"from image pixel {_numbers(offset)} on, the image has {_numbers(pixels)}): "
            "paint on a new annotation layer for it"
        )
    differ = units is not None and own_units is not None and not np.allclose(factor, 1)
    in_units = f" in {_unit_names(units, n)}" if differ else ""
    how = (
        f"it is {' and '.join(moved)}"
        if moved
        else f"scale {_numbers(mine)} against {_numbers(scale)}, translate "
        f"{_numbers(np.asarray(own_translate[-n:]) * factor)} against "
        f"{_numbers(translate[-n:])}{in_units}"
    )
    if differ and not moved:
        how += f"; its own scale {_numbers(own_scale[-n:])} is in {_unit_names(own_units, n)}"
    return None, (
        f"'{labels.name}' does not lie on '{job.layer_name}' ({how}): its pixels would "
        "train against other pixels of the image; give it the image's scale and translate, "
        "or paint on a new annotation layer"
    )


def covers(labels, job) -> bool:
    """Whether ``labels`` lies on all of ``job``'s image, pixel for pixel."""
    offset, why = pixel_offset(labels, job, job.layer_name)
    return not why and not covered_part(labels, job, offset)


def covered_part(labels, job, offset) -> str:
    """``" It covers image pixels (0, 10, 50) to (0, 39, 69); ..."``, or ``""`` when
    ``labels`` (at ``offset``, see :func:`pixel_offset`) covers the whole image."""
    own = np.shape(job.collapse(labels.data))
    pixels = tuple(n for n, a in zip(np.shape(job.data), job.axes) if a != "C")
    if not any(offset) and own == pixels:
        return ""
    last = np.add(offset, own) - 1
    return (
        f" It covers image pixels {_numbers(offset)} to {_numbers(last)} of "
        f"{_numbers(pixels)}; the rest of the image is not annotated."
    )


def _unit_factors(own, image, n: int) -> np.ndarray:
    """Per axis, one of the layer's units in the image's; 1 where either has none or
    they are not of one kind (pixel beside um: napari then draws both without units)."""
    if own is None or image is None:
        return np.ones(n)
    factors = []
    for mine, theirs in zip(list(own)[-n:], list(image)[-n:]):
        try:
            factors.append(float((1 * mine).to(theirs).magnitude))
        except Exception:  # noqa: BLE001 - pint's DimensionalityError and friends
            return np.ones(n)
    return np.asarray(factors)


def _unit_names(units, n: int) -> str:
    names = [f"{u:~}" if hasattr(u, "dimensionality") else str(u) for u in list(units)[-n:]]
    return names[0] if len(set(names)) == 1 else "(" + ", ".join(names) + ")"


def _numbers(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def is_instances_result(labels) -> bool:
    """Whether ``labels`` is (a copy of) the segment panel's *instances* result, whose
    values are objects, not classes."""
    named = re.search(r" instances\](?: \[\d+\])?$", labels.name)
    return bool(named) and RESULT_KEY in labels.metadata


def follow_renames(viewer, before: dict) -> dict:
    """Annotation layers follow their image when it is renamed: ``before`` maps
    ``id(layer)`` to its name as last seen; returns the map as it is now."""
    for layer in viewer.layers:
        old = before.get(id(layer))
        if old is not None and old != layer.name:
            for ann in viewer.layers:
                if ann.metadata.get(ANNOTATION_KEY) == old:
                    ann.metadata[ANNOTATION_KEY] = layer.name
    return {id(layer): layer.name for layer in viewer.layers}


def fill_plane_index(job, shape) -> tuple:
    """The plane ``job`` reads (the one shown when the fill started: the user may move
    on while the model runs) as an index of an annotation layer of ``shape``: with the
    one-plane channel axis of a Z, C, Y, X image's layers or, for a layer of the user's,
    without it."""
    plane = list(job.plane or ())
    if job.channel_at is not None and len(shape) == len(plane) + 3:
        plane.insert(job.channel_at, 0)
    return tuple(plane)


def fill_plane(layer, index: tuple, classes) -> str:
    """Write ``classes`` + 1 where plane ``index`` of ``layer`` is 0 (not annotated);
    painted pixels are kept. Returns the message for the user. Only that plane is read
    and written, whatever holds the layer's data (see :func:`unwritable`)."""
    why = unwritable(layer)  # (checked before the run; the layer may have changed since)
    if why:
        return f"'{layer.name}' {why}: nothing was filled."
    data = layer.data
    labels = np.asarray(classes).astype(data.dtype) + 1
    # the plane shown when the fill started, if the layer still has it at that size
    fits = len(index) == data.ndim - 2 and all(i < n for i, n in zip(index, data.shape))
    if not fits or tuple(data.shape[-2:]) != labels.shape[-2:]:
        return f"'{layer.name}' changed shape meanwhile: nothing was filled."
    plane = np.asarray(data[index])
    labels = labels.reshape(plane.shape)
    empty = plane == 0
    undoable = np.count_nonzero(empty) <= UNDOABLE_FILL
    if undoable:  # one step of the layer's undo history (Ctrl-Z undid the stroke before
        # it); napari keeps every pixel's index and value for it
        where = np.nonzero(empty)
        where = tuple(np.full(len(where[0]), i) for i in index) + where
        try:
            with layer.block_history():
                layer.data_setitem(where, labels[where[len(index) :]])
        except (TypeError, IndexError, NotImplementedError):  # (dask reads no pixels by
            undoable = False  # index: written as a plane, below)
    try:  # only this plane, in place (a copy of a whole stack stalled the GUI)
        if not undoable:  # (4096^2: 4 s on the GUI thread and 436 MB of undo history)
            data[index] = np.where(empty, labels, plane)
            layer.refresh()
    except (TypeError, ValueError, NotImplementedError, IndexError, OSError) as err:
        # (never a copy of the whole stack in its place: read on the GUI thread, it
        # replaced the user's data, a dask or read-only array, silently)
        return f"'{layer.name}' could not be written ({err}): nothing was filled."
    note = "" if undoable else " (A fill this large is not in the undo history.)"
    if not undoable and not isinstance(data, np.ndarray):
        lazy = ", in memory, not into a file it is read from" if hasattr(data, "dask") else ""
        note = (
            f" (Written into its {type(data).__module__.split('.')[0]} array, one plane"
            f"{lazy}: not in the undo history.)"
        )
    return (
        f"'{layer.name}' now holds the model's classes where nothing was painted: "
        "paint over the mistakes, then Train." + note
    )


def unwritable(layer) -> str:
    """Why a fill cannot be written into ``layer`` (``""``: it can). It writes one plane
    into the array, whatever holds it (numpy, or a dask or zarr array read lazily,
    which napari paints too); a read-only array is refused, never replaced by a copy
    (which read the whole stack on the GUI thread and changed the user's layer)."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        return "is multiscale (a pyramid): its levels cannot be filled as one"
    if getattr(data, "read_only", False) or not getattr(
        getattr(data, "flags", None), "writeable", True
    ):
        return (
            f"holds a read-only {type(data).__module__.split('.')[0]} array (opened for "
            "reading only, e.g. from a file): open it for writing, or make an in-memory "
            "copy of it (napari's console: layer.data = np.array(layer.data)), or press "
            "'New annotation layer' and fill that one"
        )
    return ""


def classes_mismatch(labels, classes) -> str:
    """Why ``labels``' painted classes are not ``classes`` (``""``: they are, or the
    layer does not name them). Layers made by napari-unet (annotations, class-label
    results) name value k in ``features["class"][k]``."""
    features = getattr(labels, "features", None)
    if features is None or "class" not in features.columns or len(features) < 2:
        return ""
    named = [str(c) for c in list(features["class"])[1:]]
    if named == [str(c) for c in classes]:
        return ""
    return (
        f"'{labels.name}' was painted for the classes {', '.join(named)}, but the model in "
        f"use has {', '.join(map(str, classes))}: load the model it was painted for, or "
        "paint on a new annotation layer"
    )
