"""Result layers: added, or updated in place where that loses nothing the user made."""

from __future__ import annotations

import re
import zlib

import numpy as np

COLORMAPS = ["gray", "green", "magenta", "cyan", "yellow", "red", "blue"]


def result_name(source: str, model_name: str, what: str) -> str:
    return f"{source} [{model_name} {what}]"


RESULT_KEY = "napari_unet_result"  # layer metadata: checksum of the result as written
OUTPUT_KEY = "napari_unet_output"  # layer metadata of other outputs (feature maps)
ANNOTATION_KEY = "napari_unet_annotates"  # layer metadata: name of the image it annotates
RUN_KEY = "napari_unet_run"  # layer metadata of a result: the model and settings of its run


def is_output(layer) -> bool:
    """Whether ``layer`` is one of this plugin's outputs (not an input image)."""
    return RESULT_KEY in layer.metadata or OUTPUT_KEY in layer.metadata


def add_or_update(
    viewer, job, model, mode: str, result: np.ndarray, run: dict | None = None
) -> tuple[list[str], list[str]]:
    """Show a result (class labels as class + 1, named in the layer's features); an
    earlier result of the same name and shape is updated instead of
    duplicated, unless it was edited since (painted corrections) or is not a result at all:
    those are kept, and the new result gets a layer of its own. ``run`` (the model and
    settings that made it) goes into each layer's metadata under :data:`RUN_KEY`.
    Returns the result layers' names and, for the layers kept, ``(name, why)``."""
    info = model.info
    kw = job.placement()
    if mode == "probabilities":
        wanted = [result_name(job.layer_name, info.name, c) for c in info.classes]
        put = [
            _put(
                viewer,
                "image",
                name,
                job.expand(result[k]),
                kw,
                run,
                colormap=COLORMAPS[k % len(COLORMAPS)],
                blending="additive",
                contrast_limits=(0.0, 1.0),
                # the objects' maps: not the background (em-membrane's first class is
                # its membranes, a one-output model's only map its objects)
                visible=name_k.lower() != "background",
            )
            for k, (name, name_k) in enumerate(zip(wanted, info.classes))
        ]
    else:
        wanted = [result_name(job.layer_name, info.name, mode)]
        style = {}
        if mode == "labels":
            from napari_unet._widgets._annotations import annotation_colormap

            # class k is label k + 1, as in annotation layers: 0 (drawn transparent) would
            # hide the first class (em-membrane's membranes), and the layer, corrected by
            # painting, trains the classes it shows ('Use selected Labels layer')
            dtype = np.uint8 if info.num_classes < 255 else np.uint16
            # (cast and shifted in one pass, into a new array: two copies of a large
            # stack's classes were made here, on the GUI thread; the caller's is kept)
            result = np.asarray(result)
            if info.num_classes == 1:  # one sigmoid output: 1 is its class, 0 the rest
                result = result.astype(dtype, copy=False)
                shown = ["background", *info.classes]  # (+ 1 named the background so)
            else:
                result = np.add(result, 1, dtype=dtype, casting="unsafe")
                shown = ["-", *info.classes]
            style = dict(features={"class": shown}, colormap=annotation_colormap(info.classes))
        put = [_put(viewer, "labels", wanted[0], job.expand(result), kw, run, **style)]
    return [n for n, _ in put], [(w, why) for w, (n, why) in zip(wanted, put) if n != w]


def _refusal(layer, kind: str, data, kw: dict) -> str:
    """Why ``layer`` cannot take a new result (``""``: it can). Updated in place only by a
    result of the same extent: a plane or a region must not replace a whole stack's
    result. The checksum of what the layer holds (seconds for large ones) comes last."""
    if layer._type_string != kind or RESULT_KEY not in layer.metadata:
        return "not a result of napari-unet"
    if ANNOTATION_KEY in layer.metadata:
        return "used as annotations"
    # shapes first: a layer of another number of axes (a 2D result beside a stack of
    # the same name) has a translate that cannot be compared (the result was lost)
    # translates to a hundredth of a pixel, not relative to the translate: at a stage
    # position of 42000 um, 0.42 um was 4 px
    if tuple(layer.data.shape) != tuple(np.shape(data)) or not np.allclose(
        layer.translate, kw["translate"], rtol=0, atol=0.01 * np.abs(kw["scale"]).min()
    ):
        return "it covers another extent (stack, plane or region)"
    if not overwritable(layer):
        return "edited since it was written"
    return ""


def _put(viewer, kind: str, name: str, data, kw: dict, run=None, **style) -> tuple[str, str]:
    """Update or add the result layer ``name``; return the name the result got and, when
    that is not ``name``, why the layer ``name`` was kept."""
    family = [
        layer
        for layer in viewer.layers
        if layer.name == name or re.fullmatch(re.escape(name) + r" \[\d+\]", layer.name)
    ]  # the result and the copies made when it was edited ("name [1]", ...)
    old, why = None, ""
    for layer in family:
        refused = _refusal(layer, kind, data, kw)
        if not refused:
            old = layer
            break
        if layer.name == name:
            why = refused
    if old is not None:
        replace_data(old, data)
        if kind == "labels":  # the classes of this run's model (another model of the
            # same name may have other classes): names on hover and colours
            for key in ("features", "colormap"):
                if key in style:
                    setattr(old, key, style[key])
        # each assignment re-slices the layer (about 1 s for 8000^2): only what changed
        if not np.allclose(old.scale, kw["scale"]):
            old.scale = kw["scale"]
        for key in ("units", "axis_labels"):
            if key in kw and tuple(getattr(old, key)) != tuple(kw[key]):
                setattr(old, key, kw[key])
        if run is not None:
            old.metadata[RUN_KEY] = run
        mark_result(old)
        return old.name, why
    # napari names a layer "name [1]" when "name" is taken
    # marked from the start: panels that list input images hear of it while it is added
    mark = {RESULT_KEY: _checksum(data), **({RUN_KEY: run} if run is not None else {})}
    layer = getattr(viewer, f"add_{kind}")(data, name=name, metadata=mark, **kw, **style)
    if layer.data is not data:  # napari converted it: mark what the layer holds
        mark_result(layer)
    return layer.name, why


def replace_data(layer, data) -> None:
    """Give ``layer`` new data and a fresh undo history: the history was of the old
    data, and a Redo wrote a stroke undone on it into the new one (napari 0.9 keeps a
    Labels layer's history when its data is replaced)."""
    layer.data = data
    reset = getattr(layer, "_reset_history", None)
    if callable(reset):
        reset()


def _checksum(data) -> int | None:
    return zlib.crc32(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else None


def mark_result(layer) -> None:
    """Record ``layer``'s data as this plugin wrote it (see :func:`overwritable`)."""
    layer.metadata[RESULT_KEY] = _checksum(layer.data)


def overwritable(layer) -> bool:
    """Whether ``layer`` holds a result exactly as this plugin wrote it, and is not
    paired as annotations: only such a layer may be written into again."""
    written = layer.metadata.get(RESULT_KEY)
    unedited = written is not None and written == _checksum(layer.data)
    return unedited and ANNOTATION_KEY not in layer.metadata
