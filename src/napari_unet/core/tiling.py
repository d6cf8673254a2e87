"""Overlap-tile inference (Ronneberger et al. 2015, Fig. 2), seamless by construction.

The image is seen as a *canvas*: the image extended on every side by mirroring
(reflection), as in the paper. Tiles of the network's input size are cut from
the canvas at origins on the network's pooling grid (multiples of
``geometry.multiple``), each carrying ``halo`` pixels of context per side. The
network's output for a tile, cropped to its valid centre, is written to the
output. Because the origins stay on the pooling grid and every kept pixel has
its full receptive field inside the tile, the tiled result equals one forward
pass over the whole mirrored canvas (to floating-point round-off).

Only the output, one plane's statistics and one batch of tiles are held in
memory; the input is read tile by tile from any array-like (numpy, dask, zarr)
and the output may be a preallocated numpy or zarr array.

:func:`predict_iter` is a generator yielding :class:`Progress` after every
batch (so callers can show progress and cancel by closing it); its return value
is the output array. :func:`predict` runs it to the end.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch

from napari_unet.core import normalize as norm
from napari_unet.core.axes import resolve_axes
from napari_unet.core.cancel import Cancelled, stoppable
from napari_unet.core.device import amp_applies, available_ram, is_oom, resolve_device
from napari_unet.core.postprocess import class_labels, label_dtype
from napari_unet.core.tile_plan import (
    auto_tile,
    checked_region,
    plan_tiles,
    plane_stats,
    read_mirrored,
    smallest_tile,
)
from napari_unet.model.info import LoadedModel
from napari_unet.model.unet import for_inference, to_layout

OUTPUTS = ("probabilities", "labels")


@dataclass(frozen=True)
class Progress:
    """Where a long job is: ``done`` of ``total`` units (tiles or steps); ``detail``:
    what a step found that its result should record (e.g. the object size measured)."""

    done: int
    total: int
    message: str = ""
    detail: dict | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


class _Restart(Exception):
    """Out of memory with one tile per batch: restart with smaller tiles."""


def predict_iter(
    image,
    model: LoadedModel,
    *,
    axes: str | None = None,
    tile=None,
    batch_size: int | None = None,
    device="auto",
    amp: bool = True,
    output: str = "probabilities",
    out=None,
    region: tuple[int, int, int, int] | None = None,
    tta: bool = False,
    should_stop=None,
) -> Generator[Progress, None, np.ndarray]:
    """Segment ``image`` tile by tile, yielding :class:`Progress` after each batch.

    Parameters
    ----------
    image : array-like
        numpy, dask or zarr array with axes ``axes`` (guessed when None, see
        :func:`~napari_unet.core.axes.resolve_axes`).
    model : LoadedModel
        Network and metadata (halo, accepted sizes, normalisation, classes).
    tile : int or (int, int), optional
        Network input tile size, snapped to an accepted size. Default: as large
        as the device's free memory allows.
    batch_size : int, optional
        Tiles per forward pass. Default: from free memory (1 on CPU).
    device : str
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"`` or ``"mps"``.
    amp : bool
        Mixed precision (float16) on CUDA.
    output : str
        ``"probabilities"``: float32 array ``(K, *leading, Y, X)``, one map per
        class; ``"labels"``: uint8 array ``(*leading, Y, X)`` of class indices.
    out : array-like, optional
        Preallocated output of that shape (numpy, or zarr for huge images). Tiles are
        written into it as they are done: a run cancelled (the generator closed) or
        failed part-way leaves the tiles done so far, so give a scratch array (the
        command line writes into a temporary zarr store, renamed into place at the end).
    region : (y0, y1, x0, x1), optional
        Predict only this region of every plane, with real image context.
    tta : bool
        Test-time augmentation: every tile is also predicted mirrored left-right,
        up-down and both, and the four results are averaged (4x the time;
        smoother, usually slightly better maps).
    should_stop : callable, optional
        Checked before every layer of the network (by this thread): once it returns
        True, the run reports once more and raises
        :class:`~napari_unet.core.cancel.Cancelled` (a cancelled napari worker stops at
        that report), instead of finishing the tile.

    Returns
    -------
    The output array (via ``StopIteration.value``; :func:`predict` returns it).
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    info = model.info
    norm.check_dtype(norm.dtype_of(image))
    ax = resolve_axes(tuple(image.shape), axes, info.in_channels)
    y0, y1, x0, x1 = checked_region(region, ax.yx)
    yx = (y1 - y0, x1 - x0)
    # tiles stay on the image's pooling grid, so a region equals the same
    # pixels of a whole-image prediction
    m = info.geometry.multiple
    shift = (y0 % m, x0 % m)
    dev = resolve_device(device)
    spec = norm.validate(info.normalization)
    auto_t, auto_b = auto_tile(model, dev, yx)
    if tile is None and info.fixed_input is None:
        tile = auto_t
    batch = max(1, int(batch_size or auto_b))
    out = _allocate(out, output, info.num_classes, ax.leading_shape, yx)
    model = LoadedModel(for_inference(model.net, dev), info)
    warned = False
    while True:
        grid = (yx[0] + shift[0], yx[1] + shift[1])
        plan = plan_tiles(grid, info.geometry, tile, info.fixed_input)
        if plan.n_tiles > 1 and not warned and normalises_per_tile(model.net):
            warned = True
            _warn_per_tile(info.name, plan.n_tiles, grid)
        start = (y0 - shift[0], x0 - shift[1])
        runner = _Runner(
            image, ax, model, plan, spec, dev, amp, output, out, start, shift, tta, should_stop
        )
        try:
            result = yield from runner.run(batch)
            return result
        except _Restart:
            smaller = max(plan.y.tile, plan.x.tile) // 2
            if info.fixed_input or smaller < smallest_tile(info.geometry):
                raise MemoryError(
                    "out of memory even with one tile per batch at the smallest tile size"
                ) from None
            tile = smaller


def _warn_per_tile(name: str, n_tiles: int, grid: tuple[int, int]) -> None:
    warnings.warn(
        f"{name or 'this network'} normalises each tile on its own (group or "
        f"instance normalisation): its result depends on the tile size and may "
        f"show seams between the {n_tiles} tiles of each plane; a tile as "
        f"large as the image ({grid[0]} x {grid[1]} plus the halo) gives the "
        "whole-image result",
        stacklevel=3,
    )


def normalises_per_tile(net) -> bool:
    """Whether ``net`` has layers whose statistics come from their input (group or
    instance norm), so that tiles are not seamless."""
    if not isinstance(net, torch.nn.Module):
        return False
    kinds = (torch.nn.GroupNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d)
    return any(
        isinstance(m, kinds) and not getattr(m, "track_running_stats", False)
        for m in net.modules()
    )


def run_to_end(gen, callback=None):
    """Drive a progress generator to its end, calling ``callback(report)`` on each
    report; returns the generator's return value. A callback that raises closes the
    generator (a training run's patch workers lived on with the traceback)."""
    with contextlib.closing(gen):
        while True:
            try:
                report = next(gen)
            except StopIteration as stop:
                return stop.value
            if callback is not None:
                callback(report)


def predict(image, model: LoadedModel, callback=None, **kwargs) -> np.ndarray:
    """Run :func:`predict_iter` to the end; ``callback(progress)`` after each batch."""
    return run_to_end(predict_iter(image, model, **kwargs), callback)


def output_dtype(output: str, n_classes: int) -> np.dtype:
    """What :func:`predict_iter` writes: float32 probabilities, else class indices in
    uint8, or uint16 from 256 classes on."""
    return np.dtype(np.float32) if output == "probabilities" else label_dtype(n_classes)


def _allocate(out, output, n_classes, lead, yx):
    shape = (*lead, *yx) if output != "probabilities" else (n_classes, *lead, *yx)
    if out is None:
        dtype = output_dtype(output, n_classes)
        need, have = np.prod(shape, dtype=float) * dtype.itemsize, available_ram()
        # (numpy refused 75 GiB in its own words; a result under the machine's memory but
        # over what is free would be granted, and filled until the machine ran out)
        if have is not None and need > 0.9 * have:
            raise MemoryError(
                f"the result ({output}, {' x '.join(map(str, shape))}) would take "
                f"{need / 2**30:.1f} GiB of memory, and {have / 2**30:.1f} GiB is free: "
                "segment a part of the image (one plane, or a region), or write the result "
                "to a .zarr file, which is written tile by tile (napari-unet predict IMAGE "
                "-o result.zarr)"
            )
        return np.zeros(shape, dtype)
    if tuple(out.shape) != shape:
        raise ValueError(f"output array has shape {tuple(out.shape)}, expected {shape}")
    kind = np.dtype(out.dtype).kind
    if (output == "probabilities" and kind != "f") or kind not in "uif":
        # probabilities cast to integers would all be 0
        raise ValueError(
            f"output array has dtype {out.dtype}; {output} need "
            + ("a float array (e.g. float32)" if output == "probabilities" else "integers")
        )
    if kind in "ui" and np.iinfo(out.dtype).max < n_classes - 1:  # would wrap around
        raise ValueError(
            f"output array has dtype {out.dtype}, which cannot hold class {n_classes - 1} "
            f"(use {output_dtype(output, n_classes)})"
        )
    return out


class _Runner:
    """One pass over all tiles of all planes with a fixed plan."""

    def __init__(
        self,
        image,
        ax,
        model,
        plan,
        spec,
        dev,
        amp,
        output,
        out,
        start,
        shift,
        tta=False,
        should_stop=None,
    ):
        self.image, self.ax, self.model, self.plan = image, ax, model, plan
        self.spec, self.dev, self.output, self.out = spec, dev, output, out
        self.start, self.shift, self.tta = start, shift, tta
        self.amp = amp_applies(amp, dev)
        self._stats: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.should_stop = should_stop

    def jobs(self):
        planes = itertools.product(*(range(n) for n in self.ax.leading_shape))
        for plane in planes:
            for oy in self.plan.y.origins:
                for ox in self.plan.x.origins:
                    yield plane, oy, ox

    def run(self, batch: int):
        total = len(list(itertools.product(*(range(n) for n in self.ax.leading_shape))))
        total *= self.plan.n_tiles
        done = 0
        yield Progress(0, total, f"0/{total} tiles")
        pending = list(self.jobs())
        while pending:
            chunk, rest = pending[:batch], pending[batch:]
            try:
                if self.should_stop is not None and self.should_stop():
                    raise Cancelled("cancelled")
                probs = self._forward([self._read_tile(*job) for job in chunk])
            except Cancelled:
                # a napari worker whose Cancel was pressed stops at this report
                yield Progress(done, total, "cancelled")
                raise
            except Exception as err:  # noqa: BLE001 - only OOM is handled
                if not is_oom(err):
                    raise
                if self.dev.type == "cuda":
                    torch.cuda.empty_cache()
                if batch == 1:
                    raise _Restart from err
                batch = max(1, batch // 2)
                continue
            for job, p in zip(chunk, probs):
                self._write(job, p)
            pending = rest
            done += len(chunk)
            yield Progress(done, total, f"tile {done}/{total}")
        return self.out

    def _plane_stats(self, plane):
        if plane not in self._stats:
            self._stats.clear()
            self._stats[plane] = plane_stats(self.image, self.ax, plane, self.spec)
        return self._stats[plane]

    def _read_tile(self, plane, oy, ox) -> np.ndarray:
        halo = self.plan.halo
        start = (self.start[0] + oy - halo, self.start[1] + ox - halo)
        block = read_mirrored(
            self.image, self.ax, plane, start, (self.plan.y.tile, self.plan.x.tile)
        )
        return norm.apply(block, *self._plane_stats(plane))

    def _forward(self, tiles: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(tiles)).to(self.dev)
        if not self.tta:
            return self._activate(self._net(x)).cpu().numpy()
        acc = None
        for dims in ((), (-1,), (-2,), (-2, -1)):  # mirrored tiles, mirrored back
            p = self._activate(self._net(x.flip(dims) if dims else x))
            p = p.flip(dims) if dims else p
            acc = p if acc is None else acc + p
        return (acc / 4).cpu().numpy()

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        x = to_layout(x, self.model.net)
        with (
            stoppable(self.model.net, self.should_stop),
            torch.inference_mode(),
            torch.autocast("cuda", torch.float16, enabled=self.amp),
        ):
            out = self.model.net(x)
        check_answer(out, x, self.model.info)
        return out.float()

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        act = self.model.info.activation
        if act == "softmax":
            return torch.softmax(logits, dim=1)
        if act == "sigmoid":
            return torch.sigmoid(logits)
        return logits

    def _write(self, job, probs: np.ndarray) -> None:
        plane, oy, ox = job
        # tile output in grid coordinates [o, o + out) -> output [o - shift, ...)
        sy, sx = max(0, self.shift[0] - oy), max(0, self.shift[1] - ox)
        ty, tx = oy + sy - self.shift[0], ox + sx - self.shift[1]
        hy = min(self.plan.y.out - sy, self.out.shape[-2] - ty)
        hx = min(self.plan.x.out - sx, self.out.shape[-1] - tx)
        if hy <= 0 or hx <= 0:
            return
        c = self.plan.crop
        p = probs[:, c + sy : c + sy + hy, c + sx : c + sx + hx]
        dst = (*plane, slice(ty, ty + hy), slice(tx, tx + hx))
        if self.output == "probabilities":
            self.out[(slice(None), *dst)] = p
        else:
            self.out[dst] = class_labels(p, self.out.dtype)


def check_answer(out, x: torch.Tensor, info) -> None:
    """A network's answer to a batch of tiles: a tensor of the classes it declares, of the
    size its geometry gives, finite. (A package's network returning 2 channels where it
    declared 1 failed on every tile with a numpy broadcast error; one returning 2 px less
    than declared wrote a result shifted by a pixel; NaN on bright pixels was written
    as the result.)"""
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the network returned a {type(out).__name__}, not a tensor")
    g = info.geometry
    want = (x.shape[0], info.num_classes, *(n - g.shrink for n in x.shape[-2:]))
    if tuple(out.shape) != want:
        raise ValueError(
            f"the network returned an array of shape {tuple(out.shape)} for input "
            f"{tuple(x.shape)}, where its description says {want}: a broken model file"
        )
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            "the network answered NaN or infinity on this image (broken weights, or "
            "float16 overflow on CUDA: try without mixed precision); nothing was written"
        )
