"""From napari layers to engine inputs and back: axes, planes, regions, result layers."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from napari_unet.core.axes import AxesError, leading_letters, resolve_axes

COLORMAPS = ["gray", "green", "magenta", "cyan", "yellow", "red", "blue"]


@dataclass
class LayerJob:
    """What to run for a layer: data, axes, region, and where results go in the world."""

    layer_name: str
    data: object
    axes: str
    region: tuple[int, int, int, int] | None
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    describe: str


def job_for_layer(layer, model, viewer=None, current_plane=False, visible=False) -> LayerJob:
    """Map an Image layer to the engine: RGB to gray, channel axis, plane, region."""
    _check_placement(layer)
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    notes = []
    if getattr(layer, "rgb", False):
        if model.info.in_channels == 1:
            data = _lazy_gray(data)  # converted where it is read (in the worker)
            notes.append("RGB converted to grayscale")
            spatial_scale = tuple(layer.scale)
        else:
            spatial_scale = tuple(layer.scale)
        axes = resolve_axes(tuple(data.shape), None, model.info.in_channels)
    else:
        axes = resolve_axes(
            tuple(data.shape),
            layer_axes(data.shape, model.info.in_channels),
            model.info.in_channels,
        )
        spatial_scale = tuple(s for s, a in zip(layer.scale, axes.axes) if a != "C")
    # the layer's own axes but a channel axis (wherever it is: CYX, YXC, ZCYX...)
    translate_full = [t for t, a in zip(layer.translate, axes.axes) if a != "C"]
    translate_full = translate_full[-len(spatial_scale) :]
    scale = list(spatial_scale)
    translate = translate_full
    lead = axes.leading
    summary = axes.describe()
    if current_plane or visible:
        _check_view(layer, axes, viewer)
    if current_plane and lead:
        point = layer.world_to_data(viewer.dims.point) if viewer is not None else None
        # in the 3D view the axes on screen are shown whole: they stay whole (a hidden
        # slider position of a displayed Z would pick one arbitrary plane)
        shown = set()
        if viewer is not None and viewer.dims.ndisplay == 3:
            offset = viewer.dims.ndim - layer.ndim
            shown = {pos for pos in lead if offset + pos in set(viewer.dims.displayed)}
        index = [slice(None)] * len(axes.shape)
        for k, pos in enumerate(lead):
            if pos in shown:
                continue
            i = int(np.clip(round(point[pos]) if point is not None else 0, 0, axes.shape[pos] - 1))
            index[pos] = slice(i, i + 1)
            translate[k] = translate[k] + i * scale[k]
        data = data[tuple(index)]
        where = ", ".join(
            f"{axes.axes[p]}={index[p].start}" if p not in shown else f"all {axes.axes[p]}"
            for p in lead
        )
        notes.append(f"current plane only ({where})")
        axes = resolve_axes(tuple(data.shape), axes.axes, model.info.in_channels)
    region = None
    if visible:
        region = _visible_region(layer, axes, viewer)
        translate[-2] += region[0] * scale[-2]
        translate[-1] += region[2] * scale[-1]
        notes.append(f"visible region {region[1] - region[0]} x {region[3] - region[2]}")
    text = summary + ("; " + ", ".join(notes) if notes else "")
    return LayerJob(layer.name, data, axes.axes, region, tuple(scale), tuple(translate), text)


def layer_axes(shape, in_channels: int) -> str:
    """The axes of a (not RGB) layer as napari shows it: its last two axes are the image's
    Y and X; for a multichannel model, the channel axis is the axis before them with as
    many planes as the model takes channels (the nearest to Y and X if several have)."""
    n = len(shape) - 2
    if n < 0:
        return "YX"  # refused by resolve_axes with its own message
    if in_channels == 1:
        return leading_letters(n) + "YX"
    have = [i for i in range(n) if shape[i] == in_channels]
    if not have:
        raise AxesError(
            f"the model takes {in_channels} channels, and no axis of this layer (shape "
            f"{tuple(shape)}) before the image plane has {in_channels}: napari shows its last "
            f"two axes ({shape[-2]} x {shape[-1]}) as the image. Open the image with its "
            "channels as one axis before Y and X (channels opened as separate layers, or "
            "last as in Y, X, C, are not read as one multichannel image)"
        )
    letters = list(leading_letters(n - 1))
    letters.insert(have[-1], "C")
    return "".join(letters) + "YX"


def _check_view(layer, axes, viewer) -> None:
    """'Current plane' and 'visible region' mean the image's Y-X plane as shown: refuse a
    2D view that shows other axes (napari's transpose / roll of the axis order)."""
    if viewer is None or viewer.dims.ndisplay != 2:
        return
    offset = viewer.dims.ndim - layer.ndim
    want = {offset + axes.axes.index("Y"), offset + axes.axes.index("X")}
    if set(viewer.dims.displayed) != want:
        raise ValueError(
            "the view shows other axes than the image's Y and X (the axis order was "
            "transposed or rolled): reset the axis order, or leave 'current plane' and "
            "'visible region' off to process whole planes"
        )


def _check_placement(layer) -> None:
    """Results, annotation layers and feature maps are placed with the layer's scale and
    translate; a rotated, sheared or affine-transformed layer is refused rather than
    answered with outputs (and paint) that do not lie on its pixels."""
    eye = np.eye(np.asarray(layer.rotate).shape[0])
    moved = {
        "rotated": not np.allclose(layer.rotate, eye),
        "sheared": np.any(np.asarray(layer.shear) != 0),
        "given an affine transform": not np.allclose(
            layer.affine.affine_matrix, np.eye(layer.affine.affine_matrix.shape[0])
        ),
    }
    what = [k for k, v in moved.items() if v]
    if what:
        raise ValueError(
            f"layer {layer.name!r} is {' and '.join(what)}: napari-unet places its results "
            "with a layer's scale and translate only; reset the layer's rotate / shear / "
            "affine (or resample the image) first"
        )


def _lazy_gray(data):
    """Luminance of an RGB(A) layer (ITU-R 601, as ``rgb_to_gray``), computed block by block
    when read: describing or choosing a layer costs nothing, the GUI thread converts nothing."""
    import dask.array as da

    if not hasattr(data, "dask"):
        # tile-sized chunks of one plane: reading a tile converts only its chunks (whole
        # planes made every tile of a 6000^2 image cost 4 s)
        data = da.from_array(data, chunks=(1,) * (data.ndim - 3) + (512, 512, data.shape[-1]))
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    return (data[..., :3].astype(np.float32) * weights).sum(axis=-1)


def viewer_camera(viewer):
    """The viewer's camera: ``viewer.scene.camera`` from napari 0.9 on (where
    ``viewer.camera`` is deprecated), ``viewer.camera`` before."""
    scene = getattr(viewer, "scene", None)
    return getattr(scene, "camera", None) or viewer.camera


def _visible_region(layer, axes, viewer) -> tuple[int, int, int, int]:
    """Data-pixel box of the field of view, from the camera (2D view only)."""
    if viewer is not None and viewer.dims.ndisplay != 2:
        raise ValueError("'visible region' needs the 2D view")
    corners = np.asarray(layer.corner_pixels, float)
    if viewer is not None:
        size = getattr(getattr(viewer, "canvas", None), "size", None)
        size = size if size is not None else getattr(viewer, "_canvas_size", (600, 800))
        camera = viewer_camera(viewer)
        half = np.asarray(size, float) / camera.zoom / 2
        centre = np.asarray(camera.center[-2:], float)
        point = np.asarray(viewer.dims.point, float)
        lo, hi = point.copy(), point.copy()
        shown = list(viewer.dims.displayed)  # (vertical, horizontal), as the camera's centre
        lo[shown], hi[shown] = centre - half, centre + half
        corners = np.stack([layer.world_to_data(lo), layer.world_to_data(hi)])
        corners = np.sort(corners, axis=0)
    iy, ix = axes.axes.index("Y"), axes.axes.index("X")  # layer axes (YXC: not the last two)
    h, w = axes.yx
    y0, y1 = (
        int(np.clip(np.floor(corners[0, iy]), 0, h)),
        int(np.clip(np.ceil(corners[1, iy]) + 1, 0, h)),
    )
    x0, x1 = (
        int(np.clip(np.floor(corners[0, ix]), 0, w)),
        int(np.clip(np.ceil(corners[1, ix]) + 1, 0, w)),
    )
    if y1 <= y0 or x1 <= x0:
        raise ValueError("the image is not in view; pan or zoom to it first")
    return y0, y1, x0, x1


def result_name(source: str, model_name: str, what: str) -> str:
    return f"{source} [{model_name} {what}]"


RESULT_KEY = "napari_unet_result"  # layer metadata: checksum of the result as written
OUTPUT_KEY = "napari_unet_output"  # layer metadata of other outputs (feature maps)
ANNOTATION_KEY = "napari_unet_annotates"  # layer metadata: name of the image it annotates


def is_output(layer) -> bool:
    """Whether ``layer`` is one of this plugin's outputs (not an input image)."""
    return RESULT_KEY in layer.metadata or OUTPUT_KEY in layer.metadata


def add_or_update(
    viewer, job: LayerJob, model, mode: str, result: np.ndarray
) -> tuple[list[str], list[str]]:
    """Show a result; an earlier result of the same name and shape is updated instead of
    duplicated, unless it was edited since (painted corrections) or is not a result at all:
    those are kept, and the new result gets a layer of its own. Returns the result layers' names
    and those of the layers kept."""
    info = model.info
    kw = {"scale": job.scale, "translate": job.translate}
    if mode == "probabilities":
        wanted = [result_name(job.layer_name, info.name, c) for c in info.classes]
        names = [
            _put(
                viewer,
                "image",
                name,
                result[k],
                kw,
                colormap=COLORMAPS[k % len(COLORMAPS)],
                blending="additive",
                contrast_limits=(0.0, 1.0),
                visible=k > 0,
            )
            for k, name in enumerate(wanted)
        ]
    else:
        wanted = [result_name(job.layer_name, info.name, mode)]
        names = [_put(viewer, "labels", wanted[0], result, kw)]
    return names, [w for w, n in zip(wanted, names) if n != w]


def _put(viewer, kind: str, name: str, data, kw: dict, **style) -> str:
    """Update or add the result layer ``name``; return the name the result got."""
    family = [
        layer
        for layer in viewer.layers
        if layer.name == name or re.fullmatch(re.escape(name) + r" \[\d+\]", layer.name)
    ]  # the result and the copies made when it was edited ("name [1]", ...)
    # updated in place only by a result of the same extent: a plane or a region must not
    # replace a whole stack's result (it gets a layer of its own)
    old = next(
        (
            la
            for la in family
            if la._type_string == kind
            and overwritable(la)
            and tuple(la.data.shape) == tuple(np.shape(data))
        ),
        None,
    )
    if old is not None:
        old.data = data
        # each assignment re-slices the layer (about 1 s for 8000^2): only what changed
        if not np.allclose(old.scale, kw["scale"]):
            old.scale = kw["scale"]
        if not np.allclose(old.translate, kw["translate"]):
            old.translate = kw["translate"]
        mark_result(old)
        return old.name
    # napari names a layer "name [1]" when "name" is taken
    # marked from the start: panels that list input images hear of it while it is added
    mark = {RESULT_KEY: _checksum(data)}
    layer = getattr(viewer, f"add_{kind}")(data, name=name, metadata=mark, **kw, **style)
    if layer.data is not data:  # napari converted it: mark what the layer holds
        mark_result(layer)
    return layer.name


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
