"""Geometry of a package: declared sizes, measured halo and tile multiple, as a Geometry."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from napari_unet.io.bioimageio._processing import PackageNet, _Bare, _runner
from napari_unet.io.bioimageio._rdf import _Axis, _Tensor
from napari_unet.io.safe_files import ModelFileError
from napari_unet.model.receptive import NoGradient, perturb_halo, reaches_beyond
from napari_unet.model.shapes import Geometry


@dataclass(frozen=True)
class _Declared:
    """What the RDF says about sizes: fixed or ``min + n*step`` inputs, shrink, halo."""

    fixed: tuple | None
    min: int
    step: int
    shrink: int
    halo: int
    channels: int
    classes: int

    def accepted(self, n: int) -> int:
        """Smallest declared input size ``>= n`` (variable-size inputs)."""
        return self.min + max(0, math.ceil((n - self.min) / self.step)) * self.step


def _axis_of(t: _Tensor, kind: str) -> _Axis:
    a = t.axis(kind)
    if a is None:
        raise ModelFileError(f"tensor {t.id!r} has no {kind} axis; only 2D images are supported")
    return a


def _size_one(size) -> bool:
    if isinstance(size, tuple):
        return size[0] == "ref" or (size[0] == "param" and size[1] == 1)
    return size == 1


def _check_other_axes(t: _Tensor) -> None:
    for a in t.axes:
        if a.kind == "other" and not _size_one(a.size):
            raise ModelFileError(
                f"tensor {t.id!r} axis {a.id!r} of size {a.size}: only 2D images are supported"
            )


def _combine(y: tuple, x: tuple) -> tuple[int, int]:
    """``(min, step)`` accepted along both spatial axes."""
    if y == x:
        return y
    m, lo = math.lcm(y[1], x[1]), max(y[0], x[0])
    for s in range(lo, lo + m):
        if (s - y[0]) % y[1] == 0 and (s - x[0]) % x[1] == 0:
            return s, m
    raise ModelFileError("input axes y and x accept no common size")


def _shrink(inp: _Tensor, out: _Tensor, fixed) -> int:
    values = []
    for i, k in enumerate("yx"):
        size, scale = _axis_of(out, k).size, _axis_of(out, k).scale
        if isinstance(size, tuple) and size[0] == "ref":
            ref = next((a for a in inp.axes if a.id == size[2]), None)
            if size[1] != inp.id or ref is None or ref.kind != k or ref.scale != scale:
                raise ModelFileError(f"output axis {k} is not the input's axis {k} (or rescaled)")
            values.append(-size[3])
        elif isinstance(size, int) and fixed is not None:
            values.append(fixed[i] - size)
        else:
            raise ModelFileError(f"output axis {k}: its size is not derived from the input")
    if values[0] != values[1] or values[0] < 0 or values[0] % 2:
        raise ModelFileError(f"output smaller than the input by {values}: not supported")
    return values[0]


def _channels(t: _Tensor, ref: _Tensor | None) -> int:
    a = t.axis("c")
    if a is None:
        return 1
    if isinstance(a.size, int):
        return a.size
    if isinstance(a.size, tuple) and a.size[0] == "ref" and ref is not None:
        return _channels(ref, None) + a.size[3]
    raise ModelFileError(f"tensor {t.id!r}: its number of channels is not fixed")


def _declared(inp: _Tensor, out: _Tensor) -> _Declared:
    _check_other_axes(inp)
    _check_other_axes(out)
    sizes = [_axis_of(inp, k).size for k in "yx"]
    if all(isinstance(s, int) for s in sizes):
        fixed, lo, step = tuple(sizes), min(sizes), 0
    elif all(isinstance(s, tuple) and s[0] == "param" for s in sizes):
        fixed = None
        for _, least, each in sizes:  # before _combine searches their common multiple
            _within("an input size step of", each, 0, MOST_STEP)
            _within("a smallest input size of", least, 1, MOST_SIZE)
        lo, step = _combine(sizes[0][1:], sizes[1][1:])
    else:
        raise ModelFileError(f"input {inp.id!r}: spatial sizes {sizes} are not supported")
    halo = max(_axis_of(out, k).halo for k in "yx")
    declared = _Declared(
        fixed, lo, step, _shrink(inp, out, fixed), halo, _channels(inp, None), _channels(out, inp)
    )
    # checked before any of them sizes an array (200,000 channels took 2 minutes and 20 GB
    # to be refused by numpy; a halo of 1000 px, 4 minutes to measure; a step of 2048,
    # 14 GB to measure the network on frames of 8 steps)
    for what, value, least, top in (
        ("input channels:", declared.channels, 1, 1024),
        ("output channels:", declared.classes, 1, 1024),
        ("a halo of", halo, 0, 512),
        ("a smallest input size of", lo, 1, MOST_SIZE),
        ("an input size step of", step, 0, MOST_STEP),
        ("an output shrink of", declared.shrink, 0, MOST_SIZE),
    ):
        _within(what, value, least, top)
    return declared


MOST_SIZE = 2048  # the largest smallest (or fixed) input size a package may declare
MOST_STEP = 256  # the largest input size step (a depth-8 U-Net's)


def _within(what: str, value: int, least: int, top: int) -> None:
    if not least <= value <= top:
        raise ModelFileError(
            f"the package declares {what} {value}; napari-unet takes {least} to {top}"
        )


def _shift_equal(a: np.ndarray, b: np.ndarray, m: int, margin: int) -> bool:
    if a.shape != b.shape:
        return False
    a = a[..., margin + m : a.shape[-2] - margin, margin + m : a.shape[-1] - margin]
    b = b[..., margin : b.shape[-2] - margin - m, margin : b.shape[-1] - margin - m]
    return a.size > 0 and bool(np.abs(a - b).max() <= 1e-6 * (1 + np.abs(a).max()))


def _find_multiple(run, c: int, hw: tuple, margin: int, candidates: tuple) -> int | None:
    """First shift in ``candidates`` under which the network is translation-equivariant."""
    rng = np.random.default_rng(1)
    pad = max(candidates)
    big = rng.standard_normal((1, c, hw[0] + pad, hw[1] + pad)).astype(np.float32)
    try:
        ref = run(big[..., : hw[0], : hw[1]])
    except Exception:  # noqa: BLE001 - size refused
        return None
    for m in candidates:
        try:
            moved = run(big[..., m : m + hw[0], m : m + hw[1]])
        except Exception:  # noqa: BLE001, S112 - size refused: next candidate
            continue
        if _shift_equal(ref, moved, m, margin):
            return m
    return None


def _grad_halo(net: PackageNet, c: int, size: int, block: int) -> int | None:
    """:func:`measure_halo` on the bare weights; None when the frame was too small."""
    from napari_unet.model.receptive import measure_halo

    h = measure_halo(_Bare(net).eval(), c, size, block, 0, dtype=torch.float32)
    net.eval()
    lo = (size // 2) // block * block
    return h if h < min(lo, size - lo - block) else None


def _adaptive_halo(net, run, torch_weights: bool, c: int, sizes, start: int, block: int) -> int:
    """Measure the halo on growing frames until the receptive field fits."""
    n = sizes(2 * start + 3 * block)
    for _ in range(4):
        if torch_weights:
            try:
                h = _grad_halo(net, c, n, block)
            except NoGradient:  # e.g. an in-graph threshold: perturb the input instead
                torch_weights = False
        if not torch_weights:
            h = perturb_halo(run, c, (n, n), block, start)
        # (what lies beyond the frame is checked on the next one)
        if h is not None and not reaches_beyond(run, c, sizes(2 * n), block, h):
            return h
        n = sizes(2 * n)
    raise ModelFileError(f"cannot measure the network's halo: it exceeds a {n} px frame")


def _valid_geometry(net: PackageNet, run, d: _Declared):
    net.crop = d.halo  # a declared halo is still to be cropped from the output
    shrink = d.shrink + 2 * d.halo
    if d.fixed:
        m = _find_multiple(run, d.channels, d.fixed, 0, (8, 16, 32, 64, 128))
        hw = d.fixed
    else:
        hw = (d.accepted(d.min + 8 * d.step),) * 2
        m = _find_multiple(run, d.channels, hw, 0, tuple(d.step * 2**k for k in range(3)))
    notes = {} if m else {"tiling": "not translation-equivariant: tiles may show seams"}
    m = m or d.step or 8
    return Geometry(m, d.min % m, d.min, shrink, shrink // 2), d.fixed, notes


def _used_halo(measured: int | None, m: int, d: _Declared) -> int:
    """The declared halo, or a larger measured one rounded up to the tile grid.

    Rounding puts every tile's first pixel on the image's pooling grid, so the
    result does not depend on how the halo was measured (gradients or perturbations).
    """
    if measured is None or measured <= d.halo:
        return d.halo
    return math.ceil(measured / m) * m


def _measured_note(measured: int | None, halo: int, d: _Declared) -> dict:
    if measured is None:
        return {"halo": f"declared {d.halo} px (too large to measure inside the fixed input)"}
    return {"halo": f"declared {d.halo} px, measured {measured} px, used {halo} px"}


def _variable_geometry(net: PackageNet, run, torch_weights: bool, d: _Declared):
    block = math.lcm(d.step, 32)
    measured = _adaptive_halo(net, run, torch_weights, d.channels, d.accepted, d.halo, block)
    margin = 2 * max(measured, d.halo)
    hw = (d.accepted(2 * margin + 8 * d.step + 32),) * 2
    m = _find_multiple(run, d.channels, hw, margin, (d.step, 2 * d.step, 4 * d.step))
    notes = {} if m else {"tiling": "not translation-equivariant: tiles may show seams"}
    m = m or d.step
    halo = _used_halo(measured, m, d)
    return (
        Geometry(m, d.min % m, d.min, 0, halo),
        None,
        {**_measured_note(measured, halo, d), **notes},
    )


def _relaxed_geometry(net: PackageNet, run, d: _Declared):
    """Geometry of PyTorch weights declared with one fixed size that accept others too."""

    def sizes(n: int) -> int:
        return 32 * math.ceil(n / 32)

    try:
        measured = _adaptive_halo(net, run, True, d.channels, sizes, d.halo, 32)
        margin = 2 * max(measured, d.halo)
        frame = sizes(2 * margin + 96)
        m = _find_multiple(run, d.channels, (frame, frame), margin, (1, 2, 4, 8, 16, 32))
        if m is None:
            return None
        halo = _used_halo(measured, m, d)
        n = m * math.ceil((2 * halo + m) / m)
        run(np.zeros((1, d.channels, n, n), np.float32))
    except Exception:  # noqa: BLE001 - any failure: keep the declared fixed size
        return None
    notes = _measured_note(measured, halo, d)
    notes["input size"] = f"declared {d.fixed[0]} x {d.fixed[1]}; the weights accept {n} + k*{m}"
    return Geometry(m, 0, n, 0, halo), None, notes


def _fixed_geometry(run, d: _Declared):
    measured = perturb_halo(run, d.channels, d.fixed, 64, d.halo)
    margin = 2 * max(measured or 0, d.halo)
    m = _find_multiple(run, d.channels, d.fixed, margin, (8, 16, 32, 64, 128))
    notes = {} if m else {"tiling": "not translation-equivariant: tiles may show seams"}
    m = m or 8
    halo = _used_halo(measured, m, d)
    return (
        Geometry(m, d.min % m, d.min, 0, halo),
        d.fixed,
        {**_measured_note(measured, halo, d), **notes},
    )


def _geometry(net: PackageNet, torch_weights: bool, d: _Declared):
    """Geometry, fixed input size and notes for the model card."""
    run = _runner(net)
    if d.shrink > 0:
        return _valid_geometry(net, run, d)
    if d.fixed is None:
        return _variable_geometry(net, run, torch_weights, d)
    relaxed = _relaxed_geometry(net, run, d) if torch_weights else None
    return relaxed or _fixed_geometry(run, d)
