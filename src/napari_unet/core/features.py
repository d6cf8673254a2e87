"""Feature maps: the activations of every named stage of a U-Net, placed on the image grid.

:func:`capture` runs a region of one plane (with its halo, mirrored at the
image border, tiles on the pooling grid) through the network with forward hooks
on the requested stages, removes the hooks, and returns one
:class:`FeatureMap` per stage. Each map knows where its pixels lie on the input
image: the centre of feature pixel ``(i, j)`` is at image pixel
``origin + scale * (i, j)``, so a deep, coarse stage can be drawn exactly over
the pixels it came from.
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch

from napari_unet.core import normalize as norm
from napari_unet.core.axes import resolve_axes
from napari_unet.core.cancel import Cancelled, stoppable
from napari_unet.core.device import resolve_device
from napari_unet.core.tile_plan import (
    activation_bytes_per_px,
    checked_region,
    plane_stats,
    read_mirrored,
    tiling_geometry,
)
from napari_unet.core.tiling import Progress, run_to_end
from napari_unet.model.info import LoadedModel
from napari_unet.model.unet import for_inference, to_layout


@dataclass
class FeatureMap:
    """Activations ``(C, h, w)`` of one stage and their place on the image."""

    stage: str
    data: np.ndarray
    scale: float  # image pixels per feature pixel
    origin: tuple[float, float]  # image (y, x) of the centre of feature pixel (0, 0)
    channels: np.ndarray  # indices of the kept channels in the stage's output

    def world(self, layer_scale=(1.0, 1.0), layer_translate=(0.0, 0.0)):
        """``(scale, translate)`` for a napari layer over an image layer with these."""
        sy, sx = layer_scale
        ty, tx = layer_translate
        return (
            (self.scale * sy, self.scale * sx),
            (ty + self.origin[0] * sy, tx + self.origin[1] * sx),
        )


OPAQUE = (
    "this network's weights are TorchScript or ONNX, which do not let napari-unet look "
    "inside them (no forward hooks); feature maps need a napari-unet model or a "
    "bioimage.io package with pytorch_state_dict weights (tick 'Trust package code' in "
    "the model panel)"
)


def inspectable(net) -> bool:
    """Whether forward hooks see ``net``'s stages: not when it is, or runs its weights
    as, TorchScript or ONNX (a bioimage.io package's wrapper around them has only
    'pre', 'core' and 'post')."""
    if not isinstance(net, torch.nn.Module):
        return False
    return not any(
        isinstance(m, torch.jit.ScriptModule) or getattr(m, "opaque", False) for m in net.modules()
    )


def _body(net):
    """The network whose stages are shown: of a bioimage.io package, its weights (the
    wrapper's own children are only 'pre', 'core' and 'post', all at full resolution)."""
    core = getattr(net, "core", None)
    return core if isinstance(core, torch.nn.Module) and hasattr(net, "package") else net


def stage_names(net) -> list[str]:
    """Stages of a network: a U-Net's named stages, else its top-level modules."""
    net = _body(net)
    names = getattr(net, "stage_names", None)
    if names:
        return list(names)
    return [name for name, _ in net.named_children()]


def stage_grid(config) -> dict[str, tuple[float, int]]:
    """``{stage: (offset, scale)}``: feature pixel ``j`` is centred on input pixel
    ``offset + scale * j`` (input = the network's input tile)."""
    t = 2 if config.padding == "valid" else 0  # pixels trimmed per side by two convs
    grid = {"enc0": (float(t), 1)}
    a, s = float(t), 1
    for level in range(1, config.depth + 1):
        a, s = a + s * (2 * t + 0.5), 2 * s
        grid[f"enc{level}" if level < config.depth else "bottleneck"] = (a, s)
    for level in reversed(range(config.depth)):
        a, s = a - s / 4, s // 2  # 2x2 up-convolution splits each pixel in two
        a = a + s * t
        grid[f"dec{level}"] = (a, s)
    grid["head"] = grid["dec0"]
    return grid


def forward_bytes(model: LoadedModel, yx: tuple[int, int]) -> int:
    """Peak activation memory of :func:`capture`'s single, untiled forward pass over a
    region (with its halo), estimated as the tiling engine does (``tile_plan.auto_tile``)."""
    halo = tiling_geometry(model.info.geometry).halo
    return activation_bytes_per_px(model) * (yx[0] + 2 * halo) * (yx[1] + 2 * halo)


def estimate_bytes(
    model: LoadedModel, stages: list[str], yx: tuple[int, int], max_channels: int | None = None
) -> int:
    """Bytes of float32 activations :func:`capture` would return for a region (of at most
    ``max_channels`` channels per stage)."""
    arch = model.info.architecture or {}
    width, depth = arch.get("base_width", 64), arch.get("depth", 4)
    total = 0
    for name in stages:
        if name == "head":
            ch, s = model.info.num_classes, 1
        elif name == "bottleneck":
            ch, s = width * 2**depth, 2**depth
        else:
            level = int(name[3:]) if name[3:].isdigit() else 0
            ch, s = width * 2**level, 2**level
        ch = min(ch, max_channels) if max_channels else ch
        total += ch * (yx[0] // s + 2) * (yx[1] // s + 2) * 4
    return total


def capture_iter(
    image,
    model: LoadedModel,
    stages: list[str] | None = None,
    *,
    axes: str | None = None,
    plane: tuple[int, ...] = (),
    region: tuple[int, int, int, int] | None = None,
    max_channels: int | None = None,
    dtype=np.float32,
    device="auto",
    should_stop=None,
) -> Generator[Progress, None, dict[str, FeatureMap]]:
    """Yield progress; return ``{stage: FeatureMap}`` for a region of one plane.

    ``max_channels`` keeps the channels with the highest activation variance
    (ranked per stage); ``dtype=np.float16`` halves the memory. ``should_stop`` is
    checked before every layer: once true, the capture reports once more and raises
    :class:`~napari_unet.core.cancel.Cancelled`.
    """
    if not inspectable(model.net):
        raise ValueError(OPAQUE)
    if max_channels is not None and (
        isinstance(max_channels, bool)
        or not isinstance(max_channels, (int, np.integer))
        or max_channels < 1
    ):
        raise ValueError(
            f"max_channels must be a whole number from 1 (or None), got {max_channels!r}"
        )
    if not hasattr(image, "shape"):  # a nested list, say
        image = np.asarray(image)
    names = stage_names(model.net)
    stages = list(stages or names)
    unknown = [s for s in stages if s not in names]
    if unknown:
        raise ValueError(f"no stage(s) {unknown}; the network has {names}")
    norm.check_dtype(norm.dtype_of(image))  # as segmenting does
    ax = resolve_axes(tuple(image.shape), axes, model.info.in_channels)
    y0, y1, x0, x1 = checked_region(region, ax.yx)
    lead = ax.leading_shape
    names = "".join(ax.axes[i] for i in ax.leading)
    if len(plane) != len(lead) or not all(0 <= int(i) < n for i, n in zip(plane, lead)):
        raise ValueError(
            f"plane {tuple(plane)} is not a plane of this image: give one index per axis "
            f"{names or '(none: a 2D image)'} within {lead or '()'}"
        )
    yield Progress(0, 3, "reading the region with its halo")
    tile, (sy, sx) = _input_tile(image, ax, model, plane, (y0, y1, x0, x1))
    grid = _grid(model.net, model)
    dev = resolve_device(device)
    net = for_inference(model.net, dev)  # a copy for project U-Nets
    captured: dict[str, torch.Tensor] = {}
    body = _body(net)
    handles = [getattr(body, n).register_forward_hook(_keep(captured, n)) for n in stages]
    cancelled = False
    try:
        yield Progress(1, 3, "running the network")
        with stoppable(net, should_stop), torch.inference_mode():
            net(to_layout(torch.from_numpy(tile[None]).to(dev), net))
    except Cancelled:
        cancelled = True
    finally:
        for handle in handles:
            handle.remove()
    if cancelled:  # (hooks gone first: a cancelled napari worker stops at this report)
        yield Progress(1, 3, "cancelled")
        raise Cancelled("cancelled")
    yield Progress(2, 3, "placing feature maps")
    out = {}
    for name in stages:
        data = captured.pop(name)[0]  # (C, h, w) tensor, any memory layout
        a, s = grid.get(name) or _centred_grid(tile.shape[-2], data.shape[-2])
        out[name] = _place(name, data, a, s, (sy, sx), (y0, y1, x0, x1), max_channels, dtype)
    return out


def capture(image, model, stages=None, **kwargs) -> dict[str, FeatureMap]:
    """Run :func:`capture_iter` to the end."""
    return run_to_end(capture_iter(image, model, stages, **kwargs))


def _centred_grid(tile: int, size: int) -> tuple[float, int]:
    """For networks of unknown architecture: an integer stride from the sizes, and the
    stage's pixels centred on the input tile (exact for same-padding poolings)."""
    s = max(1, round(tile / size))
    return ((tile - 1) - s * (size - 1)) / 2, s


def _keep(store: dict, name: str):
    """A hook keeping the stage's output of passes run by this thread only: a network
    that is not a napari-unet U-Net is shared, not copied (a bioimage.io package), and a
    segmentation running it meanwhile put its tiles' activations in the maps."""
    thread = threading.get_ident()

    def hook(module, inputs, output):
        if threading.get_ident() == thread:
            store[name] = output.detach()

    return hook


def _grid(net, model) -> dict:
    config = getattr(_body(net), "config", None)
    return stage_grid(config) if config is not None else {}


def _input_tile(image, ax, model, plane, box):
    """Normalised input covering ``box`` plus the halo, starting on the pooling grid."""
    g = tiling_geometry(model.info.geometry)
    y0, y1, x0, x1 = box
    m = g.multiple
    # the same pooling grid as the tiling engine (canvas origin at -halo: its context)
    sy, sx = y0 // m * m - g.halo, x0 // m * m - g.halo
    ty = g.snap(y1 + g.halo - sy, "up")
    tx = g.snap(x1 + g.halo - sx, "up")
    block = read_mirrored(image, ax, plane, (sy, sx), (ty, tx))
    spec = norm.validate(model.info.normalization)
    return norm.apply(block, *plane_stats(image, ax, plane, spec)), (sy, sx)


def _place(name, data, a, s, start, box, max_channels, dtype) -> FeatureMap:
    """Crop a stage's map to the region (plus one pixel) and rank its channels.

    Works on the tensor; the crop is copied (a view kept the stage's whole output over
    the tile and its halo alive: 613 MB where the memory guard counted 468), which
    costs little next to the forward pass.
    """
    y0, y1, x0, x1 = box
    oy, ox = start[0] + a, start[1] + a  # image coordinate of feature pixel 0
    j0 = max(0, int(np.floor((y0 - oy) / s)))
    j1 = min(data.shape[1], int(np.ceil((y1 - 1 - oy) / s)) + 1)
    i0 = max(0, int(np.floor((x0 - ox) / s)))
    i1 = min(data.shape[2], int(np.ceil((x1 - 1 - ox) / s)) + 1)
    whole = data.numel()
    data = data[:, j0:j1, i0:i1]
    channels = np.arange(data.shape[0])
    if max_channels and data.shape[0] > max_channels:
        var = data.float().reshape(data.shape[0], -1).var(dim=1).cpu().numpy()
        channels = np.argsort(-var, kind="stable")[:max_channels]
        data = data[torch.from_numpy(channels).to(data.device)]
    tdtype = torch.float16 if np.dtype(dtype) == np.float16 else torch.float32
    array = data.to(tdtype).cpu().numpy()
    if array.size < whole:  # a crop: its own copy
        array = np.array(array)
    return FeatureMap(name, array, float(s), (oy + j0 * s, ox + i0 * s), channels)
