"""From napari layers to engine inputs: axes, planes, regions, and where results go."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_unet.core.axes import CHANNEL_PLANE_LETTERS, AxesError, leading_letters, resolve_axes


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
    # where outputs get a one-plane channel axis (Z, C, Y, X: results (Z, 1, Y, X)), so
    # that napari, which lines layers up by their last axes, puts their Z on the image's Z
    channel_at: int | None = None
    units: tuple | None = None  # the layer's units (napari >= 0.6), channel axis as above
    plane: tuple[int, ...] | None = None  # 'current plane': the index on each leading axis
    axis_labels: tuple | None = None  # the layer's axis labels, as units

    def expand(self, array):
        """``array`` (the image's axes without channels) shaped for its output layer."""
        return array if self.channel_at is None else np.expand_dims(array, self.channel_at)

    def output_shape(self) -> tuple[int, ...]:
        """The shape of an output layer: the image's without its channels, see :meth:`expand`."""
        shape = [n for n, a in zip(np.shape(self.data), self.axes) if a != "C"]
        if self.channel_at is not None:
            shape.insert(self.channel_at, 1)
        return tuple(shape)

    def collapse(self, array):
        """An output layer's data (see :meth:`expand`) back on the image's axes."""
        if self.channel_at is None or np.ndim(array) != len(self.scale):
            return array  # (a Labels layer of the user's without the channel axis)
        return array[(slice(None),) * self.channel_at + (0,)]

    def placement(self) -> dict:
        """``scale``, ``translate`` (and ``units``) of an output layer."""
        kw = {"scale": self.scale, "translate": self.translate}
        if self.units is not None:
            kw["units"] = self.units
        if self.axis_labels is not None and len(self.axis_labels) == len(self.scale):
            kw["axis_labels"] = self.axis_labels  # (napari named a result's 'z' '-3')
        return kw


def job_for_layer(layer, model, viewer=None, current_plane=False, visible=False) -> LayerJob:
    """Map an Image layer to the engine: RGB to gray, channel axis, plane, region."""
    _check_placement(layer)
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    # indexed lazily: a zarr plane or region is read in the worker, not here
    data = _lazy(data, bool(getattr(layer, "rgb", False)))
    full_shape = tuple(data.shape)
    data, axes, spatial_scale, notes = _read_axes(layer, data, model)
    # the layer's own axes but a channel axis (wherever it is: CYX, YXC, ZCYX...)
    translate = [t for t, a in zip(layer.translate, axes.axes) if a != "C"]
    translate = translate[-len(spatial_scale) :]
    scale = list(spatial_scale)
    summary = axes.describe()
    if current_plane or visible:
        _check_view(layer, axes, viewer)
    layer_axes_ = axes.axes
    plane = None
    if current_plane and axes.leading:
        data, plane, note = _current_plane(layer, viewer, axes, data, translate, scale)
        notes.append(note)
        axes = resolve_axes(tuple(data.shape), axes.axes, model.info.in_channels)
    region = None
    if visible:
        region = _visible_region(layer, axes, viewer)
        translate[-2] += region[0] * scale[-2]
        translate[-1] += region[2] * scale[-1]
        notes.append(f"visible region {region[1] - region[0]} x {region[3] - region[2]}")
    text = summary + ("; " + ", ".join(notes) if notes else "")
    units = getattr(layer, "units", None)  # napari >= 0.6
    labels = getattr(layer, "axis_labels", None)
    if not getattr(layer, "rgb", False):
        if units is not None:
            units = [u for u, a in zip(units, layer_axes_) if a != "C"]
        if labels is not None:
            labels = [la for la, a in zip(labels, layer_axes_) if a != "C"]
    channel_at = layer_axes_.index("C") if "C" in layer_axes_ else None
    if channel_at == 0 or getattr(layer, "rgb", False):
        channel_at = None  # (C, Z, Y, X): outputs (Z, Y, X) line up with its last axes
    if channel_at is not None:
        # one plane stretched over all the channels: the output shows at every channel
        n, step = full_shape[channel_at], layer.scale[channel_at]
        scale.insert(channel_at, n * step)
        translate.insert(channel_at, layer.translate[channel_at] + (n - 1) / 2 * step)
        if units is not None:
            units.insert(channel_at, layer.units[channel_at])
        if labels is not None:
            labels.insert(channel_at, layer.axis_labels[channel_at])
    units = None if units is None else tuple(units)
    return LayerJob(
        layer.name,
        data,
        axes.axes,
        region,
        tuple(scale),
        tuple(translate),
        text,
        channel_at,
        units,
        plane,
        None if labels is None else tuple(labels),
    )


def _read_axes(layer, data, model):
    """``(data, axes, scale of the axes but C, notes)``: how the model reads the layer
    (RGB to gray or 3 channels, a channel axis where the model takes several)."""
    notes = []
    if not getattr(layer, "rgb", False):
        named, note = labelled_axes(getattr(layer, "axis_labels", ()), model.info.in_channels)
        if note:
            notes.append(note)
        axes = resolve_axes(
            tuple(data.shape),
            named or layer_axes(data.shape, model.info.in_channels),
            model.info.in_channels,
        )
        spatial_scale = tuple(s for s, a in zip(layer.scale, axes.axes) if a != "C")
        return data, axes, spatial_scale, notes
    channels = model.info.in_channels
    named, _ = labelled_axes(getattr(layer, "axis_labels", ()), 1)  # (T, Y, X) of RGB
    lead = named[:-2] if named and "Q" not in named else leading_letters(len(data.shape) - 3)
    if channels == 1:
        from napari_unet.core.segment import lazy_gray

        data = lazy_gray(data)  # converted where it is read (in the worker)
        notes.append("RGB converted to grayscale")
        axes = resolve_axes(tuple(data.shape), lead + "YX", 1)
    elif channels == 3:
        if data.shape[-1] == 4:
            data = data[..., :3]
            notes.append("alpha channel left out")
        axes = resolve_axes(tuple(data.shape), lead + "YXC", 3)
    else:
        raise AxesError(
            f"layer {layer.name!r} is an RGB image (3 colour channels), but the model "
            f"takes {channels} channels: open the image with its channels as one axis "
            "before Y and X (not as RGB), or load a model for this image"
        )
    return data, axes, tuple(layer.scale), notes


def _current_plane(layer, viewer, axes, data, translate: list, scale: list):
    """The plane the viewer shows: ``(its data, its index, a note)``; ``translate`` is
    moved onto it. In the 3D view the axes on screen stay whole."""
    lead = axes.leading
    point = world_to_layer(layer, viewer, viewer.dims.point) if viewer is not None else None
    # (a hidden slider position of a displayed Z would pick one arbitrary plane)
    shown = set()
    if viewer is not None and viewer.dims.ndisplay == 3:
        offset = viewer.dims.ndim - layer.ndim
        shown = {pos for pos in lead if offset + pos in set(viewer.dims.displayed)}
    index = [slice(None)] * len(axes.shape)
    for k, pos in enumerate(lead):
        if pos in shown:
            continue
        i = round(point[pos]) if point is not None else 0
        if not 0 <= i < axes.shape[pos]:
            name = _axis_name(layer, axes, pos)
            raise ValueError(
                f"layer {layer.name!r} has no plane at the viewer's {name} "
                f"position (its {name} planes are 0-{axes.shape[pos] - 1}, the "
                f"viewer is at {point[pos]:.1f}), so napari shows none of it: move the "
                "slider onto the image (or, in the segment panel, leave 'Current plane "
                "only' off to process the whole image)"
            )
        index[pos] = slice(i, i + 1)
        translate[k] = translate[k] + i * scale[k]
    plane = tuple(index[p].start or 0 for p in lead)
    where = ", ".join(
        f"{axes.axes[p]}={index[p].start}" if p not in shown else f"all {axes.axes[p]}"
        for p in lead
    )
    return data[tuple(index)], plane, f"current plane only ({where})"


def world_to_layer(layer, viewer, point) -> np.ndarray:
    """``layer.world_to_data`` of a viewer position, with the unit conversion napari's own
    slicing applies (a layer in um beside one in nm is shown in nm: the viewer's position
    is in nm, the layer's scale in um)."""
    point = np.asarray(point, float).copy()
    units = getattr(layer, "units", None)
    world = getattr(getattr(viewer, "dims", None), "units", None)
    if units is not None and world is not None and len(world) >= len(units):
        import pint

        reg = pint.get_application_registry()
        factors = [
            reg.get_base_units(w)[0] / reg.get_base_units(u)[0]
            for w, u in zip(world[-len(units) :], units)
        ]
        point[-len(units) :] *= np.asarray(factors, float)
    return np.asarray(layer.world_to_data(point))


# napari axis labels that name an axis (any case); napari's defaults ("-3") name none
AXIS_NAMES = {"t": "T", "time": "T", "z": "Z", "c": "C", "ch": "C", "channel": "C"}
AXIS_NAMES |= {"channels": "C", "y": "Y", "x": "X"}


def labelled_axes(labels, in_channels: int) -> tuple[str | None, str]:
    """The axes a layer's ``axis_labels`` name (``("c", "y", "x")`` -> ``"CYX"``) and a
    note, or ``(None, "")`` where they do not name every axis, Y and X among them; labels
    that put Y and X before another axis are refused. For a one-channel model a channel
    axis is read as planes, each segmented on its own."""
    letters = [AXIS_NAMES.get(str(label).strip().lower()) for label in labels or ()]
    if len(letters) < 3 or None in letters or len(set(letters)) != len(letters):
        return None, ""
    if "Y" not in letters or "X" not in letters:
        return None, ""
    if letters[-2:] != ["Y", "X"]:
        # napari shows a layer's last two axes as the image: read as labelled, the
        # result would not lie over what is shown; read as shown, it was each 96 x 2
        # sliver of a (y, x, c) layer segmented on its own, and reported done
        raise AxesError(
            f"the layer's axis labels ({', '.join(map(str, labels))}) put "
            f"'{labels[letters.index('Y')]}' and '{labels[letters.index('X')]}' before "
            "other axes, but napari shows a layer's last two axes as the image: open it "
            "with y and x last (e.g. channels first: numpy.moveaxis(data, -1, 0), or as an "
            "RGB layer)"
        )
    if in_channels > 1 and "C" not in letters:
        raise AxesError(
            f"the layer's axis labels ({', '.join(map(str, labels))}) name no channel axis, "
            f"but the model takes {in_channels} channels: label its channel axis 'c' "
            "(layer.axis_labels), or load a model for this image"
        )
    if in_channels == 1 and "C" in letters:
        at = letters.index("C")
        letters[at] = next(a for a in CHANNEL_PLANE_LETTERS if a not in letters)
        return "".join(letters), (
            f"the channels of the axis labelled '{labels[at]}' are segmented one by one "
            "(the model takes one channel)"
        )
    return "".join(letters), ""


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
            "transposed or rolled): bring them back with napari's roll and transpose "
            "buttons below the layer list (or, in the segment panel, leave 'Current plane "
            "only' and 'Visible region only' off to process the whole image)"
        )


def _check_placement(layer) -> None:
    """Results, annotation layers and feature maps are placed with the layer's scale and
    translate; a rotated, sheared or affine-transformed layer is refused rather than
    answered with outputs (and paint) that do not lie on its pixels."""
    what = transformed(layer)
    if what:
        raise ValueError(
            f"layer {layer.name!r} is {' and '.join(what)}: napari-unet places its results "
            "with a layer's scale and translate only; reset the layer's rotate / shear / "
            "affine (or resample the image) first"
        )


def transformed(layer) -> list[str]:
    """How ``layer`` is placed beyond its scale and translate ("rotated", ...)."""
    eye = np.eye(np.asarray(layer.rotate).shape[0])
    moved = {
        "rotated": not np.allclose(layer.rotate, eye),
        "sheared": np.any(np.asarray(layer.shear) != 0),
        "given an affine transform": not np.allclose(
            layer.affine.affine_matrix, np.eye(layer.affine.affine_matrix.shape[0])
        ),
    }
    return [k for k, v in moved.items() if v]


def _lazy(data, rgb: bool = False):
    """``data`` as is if indexing it reads nothing (numpy views, dask); other arrays
    (zarr, HDF5...) wrapped in dask, so a plane or region is read only when computed."""
    if isinstance(data, np.ndarray) or hasattr(data, "dask"):
        return data
    import dask.array as da

    shape = tuple(data.shape)
    native = getattr(data, "chunks", None)
    if not native or len(native) != len(shape):  # contiguous (HDF5): by plane and region
        native = (1,) * len(shape)
    chunks = [max(1, int(c)) for c in native]
    # at least 1024 px along Y and X, in whole native chunks: dask's task per small chunk
    # made tiles of a 64-px-chunked zarr 2-4x slower than reading the zarr itself
    for a in (-3, -2) if rgb else (-2, -1):
        chunks[a] = min(shape[a], -(-1024 // chunks[a]) * chunks[a])
    if rgb:
        chunks[-1] = shape[-1]
    return da.from_array(data, chunks=tuple(chunks), name=False)  # (no hashing of the data)


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
        corners = np.stack([world_to_layer(layer, viewer, lo), world_to_layer(layer, viewer, hi)])
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


def _axis_name(layer, axes, pos: int) -> str:
    """How a message names the image's axis ``pos``: its letter, or "channel" for the
    channels a one-channel model reads as planes (a letter of its own, see
    :func:`labelled_axes`, that the user never gave)."""
    labels = tuple(getattr(layer, "axis_labels", ()) or ())
    label = str(labels[pos]).lower() if pos < len(labels) else ""
    return "channel" if label in ("c", "channel") and axes.axes[pos] != "C" else axes.axes[pos]
