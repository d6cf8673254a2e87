"""Tile plans for overlap-tile inference: where the tiles go and how large they are.

A :class:`TilePlan` cuts a ``(height, width)`` region into input tiles of the
network's accepted sizes whose useful (valid) centres cover the region exactly,
with origins on the network's pooling grid so the tiled result is seamless.
:func:`auto_tile` picks a tile size and batch that fit the device's memory.
Pixels outside the image are read by mirroring (:func:`reflect_index`,
:func:`read_mirrored`), each plane normalised alike (:func:`plane_stats`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

from napari_unet.core import normalize as norm
from napari_unet.core.device import free_memory
from napari_unet.model.info import LoadedModel
from napari_unet.model.shapes import Geometry


@dataclass(frozen=True)
class AxisPlan:
    """Tiling of one spatial axis."""

    tile: int  # network input size
    out: int  # useful output pixels per tile
    origins: tuple[int, ...]  # output start of each tile, in region coordinates


@dataclass(frozen=True)
class TilePlan:
    y: AxisPlan
    x: AxisPlan
    halo: int
    crop: int  # where the useful output starts inside the network output

    @property
    def n_tiles(self) -> int:
        return len(self.y.origins) * len(self.x.origins)


def tiling_geometry(g: Geometry, fixed: int | None = None) -> Geometry:
    """``g`` with the context tiles read beyond their output as its halo: for same
    padding the halo rounded up to the pooling grid (``multiple``), so that the image's
    first pixel lies on that grid as in one pass over the whole image, and as
    bioimage.io runners tile a package (a halo of 94 px put it at 14 mod 16, and the
    network, which is not shift-invariant within the grid, gave results up to 0.3 apart
    at object edges); valid padding keeps its exact halo. A ``fixed`` input too small
    for the rounded context keeps the exact halo. Idempotent."""
    if g.valid or g.halo % g.multiple == 0:
        return g
    rounded = -(-g.halo // g.multiple) * g.multiple
    if fixed is not None and fixed - 2 * rounded < g.multiple:
        return g
    return replace(g, halo=rounded)


def balanced_tile(n: int, g: Geometry, parts: int) -> int:
    """Smallest accepted input tile that covers ``n`` pixels in ``parts`` equal tiles."""
    m = g.multiple
    out = math.ceil(math.ceil(n / parts) / m) * m
    return g.snap(out + 2 * g.halo, "up")


def auto_plan_size(yx: tuple[int, int], g: Geometry, max_area: float) -> tuple[int, int]:
    """Tile ``(ty, tx)`` with ``ty * tx <= max_area`` that minimises the pixels computed.

    Tiles are balanced (equal parts per axis) and may be rectangular: a
    2048 x 2048 image that does not fit in one tile is cut in two halves rather
    than four quarters.
    """
    best = None
    for ny in range(1, max(1, yx[0] // g.multiple) + 2):
        ty = balanced_tile(yx[0], g, ny)
        if ty * g.min_input > max_area and ny > 1:
            continue
        for nx in range(1, max(1, yx[1] // g.multiple) + 2):
            tx = balanced_tile(yx[1], g, nx)
            if ty * tx > max_area:
                continue
            cost = ny * nx * ty * tx
            if best is None or cost < best[0]:
                best = (cost, ty, tx)
            break  # more parts along x only cost more
        if best is not None and ty * g.min_input <= max_area and ny * ty > 2 * yx[0] + 4 * g.halo:
            break
    if best is None:
        t = max(g.snap(int(math.sqrt(max_area)), "down") or g.min_input, g.min_input)
        return t, t
    return best[1], best[2]


def smallest_tile(g: Geometry) -> int:
    """The smallest input tile worth running: twice the halo plus one pooling step of
    useful output (a smaller ``tile`` asked for is raised to it)."""
    g = tiling_geometry(g)
    return g.snap(2 * g.halo + g.multiple, "up")


def plan_axis(n: int, g: Geometry, tile: int | None, fixed: int | None = None) -> AxisPlan:
    """Tile an axis of ``n`` pixels with input tiles of about ``tile`` pixels.

    The tile is snapped down to an accepted size, raised to the smallest one
    that yields at least ``g.multiple`` useful pixels, and lowered to the
    smallest one that covers the whole axis.
    """
    m = g.multiple

    def useful(t: int) -> int:
        return t - 2 * g.halo

    if fixed is not None:
        t = fixed
        if useful(t) < m:
            raise ValueError(
                f"the model's fixed input size {fixed} leaves no room for its halo {g.halo}"
            )
    else:
        t_min = smallest_tile(g)
        t_need = g.snap(n + 2 * g.halo, "up")
        t = t_need if tile is None else max(t_min, g.snap(max(int(tile), 1), "down") or t_min)
        t = min(t, t_need)
    out = useful(t)
    stride = out // m * m
    last = max(0, math.ceil((n - out) / m) * m)
    count = 1 if last == 0 else math.ceil(last / stride) + 1
    origins = tuple(sorted({min(k * stride, last) for k in range(count)}))
    return AxisPlan(tile=t, out=out, origins=origins)


def plan_tiles(
    yx: tuple[int, int], g: Geometry, tile=None, fixed_input: tuple[int, int] | None = None
) -> TilePlan:
    """Tile a ``(height, width)`` region; ``tile`` is an int or ``(ty, tx)``; the context
    read around each tile's output is :func:`tiling_geometry`'s."""
    ty, tx = (tile, tile) if tile is None or np.isscalar(tile) else tile
    fy, fx = fixed_input if fixed_input else (None, None)
    g = tiling_geometry(g, min(fixed_input) if fixed_input else None)
    return TilePlan(
        y=plan_axis(yx[0], g, ty, fy),
        x=plan_axis(yx[1], g, tx, fx),
        halo=g.halo,
        crop=0 if g.valid else g.halo,
    )


def reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Map any integer coordinates into ``[0, n)`` by mirroring (numpy ``reflect``)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def checked_region(region, full: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of a region of a ``full``-sized plane (the whole plane when
    None), refused when empty or outside it."""
    if region is None:
        return 0, full[0], 0, full[1]
    try:
        y0, y1, x0, x1 = (_whole(v) for v in region)
    except (TypeError, ValueError, OverflowError):  # (int(inf))
        raise ValueError(
            f"region must be four whole pixel numbers (y0, y1, x0, x1), got {region!r}"
        ) from None
    if not (0 <= y0 < y1 <= full[0] and 0 <= x0 < x1 <= full[1]):
        raise ValueError(f"region {region} is empty or outside the image {full}")
    return y0, y1, x0, x1


def _whole(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value):
        raise ValueError(value)
    return int(value)


def read_mirrored(image, ax, plane, start: tuple[int, int], size: tuple[int, int]):
    """The ``(C, *size)`` block of a plane from pixel ``start`` on, continued past the
    image's borders by mirroring (the overlap-tile strategy's missing context)."""
    h, w = ax.yx
    iy = reflect_index(np.arange(size[0]) + start[0], h)
    ix = reflect_index(np.arange(size[1]) + start[1], w)
    ys = slice(int(iy.min()), int(iy.max()) + 1)
    xs = slice(int(ix.min()), int(ix.max()) + 1)
    return ax.read(image, plane, ys, xs)[:, iy - ys.start][:, :, ix - xs.start]


def plane_stats(image, ax, plane, spec) -> tuple:
    """The normalisation ``(scale, offset)`` of one plane, from a sample of the whole
    plane, so that every tile and region of it is normalised alike."""
    sample = norm.sample_plane(lambda ys, xs: ax.read(image, plane, ys, xs), ax.yx)
    stats = norm.plane_stats(sample, spec)
    whole = sample.shape[-1] >= ax.yx[0] * ax.yx[1]  # (a sample of a large plane can
    # miss its few bright objects)
    if whole and sample.size and sample.min() == sample.max():  # (an all-zero image gave
        # "Done", an empty result and not a word)
        warnings.warn(
            f"the image has a blank plane (every pixel read is {sample.flat[0]:g}): its "
            "result is the model's answer to an empty image",
            stacklevel=2,
        )
    return stats


CPU_BUDGET = 2.2e9  # bytes of estimated activations per tile on CPU (peak RSS ~1.6 GB)


def activation_bytes_per_px(model: LoadedModel) -> int:
    """Estimated activation memory of a forward pass per input pixel: ``4 * base_width
    * 12`` bytes (measured: about ``4 * base_width * 9`` for the bundled models)."""
    return 4 * (model.info.architecture or {}).get("base_width", 64) * 12


def auto_tile(model: LoadedModel, device: torch.device, yx: tuple[int, int]):
    """Input tile ``(ty, tx)`` and batch size that fit the device's free memory.

    Activation memory is estimated as ``4 * base_width * 12`` bytes per input
    pixel (measured: about ``4 * base_width * 9`` for the bundled models).
    On GPUs, tiles up to 1024 px are batched; on CPU one tile at a time, as
    large as the budget allows, balanced over the image.
    """
    g = tiling_geometry(model.info.geometry)
    bytes_per_px = activation_bytes_per_px(model)
    if device.type == "cuda":
        budget = 0.4 * free_memory(device)
        t = min(g.snap(1024 + 2 * g.halo, "down"), g.snap(max(yx) + 2 * g.halo, "up"))
        batch = int(max(1, min(16, budget // (bytes_per_px * t * t))))
        return (t, t), batch
    budget = min(0.25 * free_memory(device), CPU_BUDGET)
    return auto_plan_size(yx, g, budget / bytes_per_px), 1
