"""Measure the context (halo) a network needs, from the network itself.

Used for networks whose architecture we do not know (TorchScript, bioimage.io)
and, in tests, to check the analytic halo of :class:`~napari_unet.model.UNet`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

_TOL = 1e-7  # relative output change that counts as "depends on" when probing a network


class NoGradient(RuntimeError):
    """The network's output has no usable gradient (thresholded, or dead units):
    measure its halo by perturbation (:func:`perturb_halo`) instead."""


def measure_halo(
    net: nn.Module,
    in_channels: int,
    size: int,
    multiple: int = 1,
    shrink: int = 0,
    trials: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> int:
    """Largest distance from an output pixel to an input pixel it depends on.

    The gradient of every output pixel in a ``multiple x multiple`` block at the
    centre (all pooling phases) is taken with respect to the input, for
    ``trials`` random inputs in float64; the halo is the furthest input pixel
    with a non-zero gradient. ReLU networks can hide dependencies behind dead
    units, so this is a lower bound that is exact in practice with random data.
    Raises :class:`NoGradient` when no gradient reaches the input.

    Parameters
    ----------
    net : nn.Module
        Network mapping ``(1, in_channels, size, size)`` to ``(1, K, size - shrink, ...)``.
    size : int
        Input size accepted by the network, larger than twice the expected halo.
    shrink : int
        ``input - output`` size (valid-padding networks).
    """
    gen = torch.Generator().manual_seed(seed)
    was_training = net.training
    net.eval()
    try:
        net64 = net.to(dtype)
        halo = 0
        for _ in range(trials):
            x = torch.rand(1, in_channels, size, size, generator=gen, dtype=dtype)
            x.requires_grad_(True)
            y = net64(x)
            if not isinstance(y, torch.Tensor) or not y.requires_grad:
                raise NoGradient("the network's output carries no gradient")
            c = (y.shape[-1] // 2) // multiple * multiple
            sel = y[..., c : c + multiple, c : c + multiple].sum()
            (grad,) = torch.autograd.grad(sel, x, allow_unused=True)
            if grad is None:
                raise NoGradient("the network's output does not depend on its input")
            support = grad.abs().sum(dim=(0, 1)).detach().numpy() > 0
            ys, xs = np.nonzero(support)
            if ys.size == 0:  # thresholded outputs or dead units: no gradient anywhere
                raise NoGradient("the gradient of the network's output is zero")
            # output pixel c..c+multiple-1 sits at input c + shrink/2 + ...
            lo = c + shrink // 2
            hi = lo + multiple - 1
            halo = max(halo, lo - ys.min(), ys.max() - hi, lo - xs.min(), xs.max() - hi)
        return int(halo)
    finally:
        net.float()
        net.train(was_training)


def structural_halo(config) -> int:
    """Exact receptive-field halo of a :class:`UNet` architecture.

    Builds a linear twin of the network (ReLU -> identity, max-pool -> average
    pool, positive weights, no normalisation) in which every structural
    dependency has a strictly positive gradient, and measures it.
    """
    from dataclasses import replace

    from napari_unet.model.unet import UNet

    twin = UNet(replace(config, base_width=1, norm="none", dropout=0.0, in_channels=1))
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(2))
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(torch.rand_like(p) + 0.1)
    g = twin.geometry
    size = g.snap(3 * g.halo + 4 * g.multiple, "up")
    return measure_halo(twin, 1, size, g.multiple, g.shrink, trials=1)


def _reach(run, x, base, corner, block, tol, rng) -> int:
    """How far outside a perturbed ``block`` the output changes (a halo estimate)."""
    cy, cx = corner
    y = x.copy()
    y[..., cy : cy + block, cx : cx + block] += rng.standard_normal(
        (1, x.shape[1], block, block)
    ).astype(np.float32)
    changed = np.abs(run(y) - base).max(axis=(0, 1)) > tol
    rows, cols = np.nonzero(changed.any(axis=1))[0], np.nonzero(changed.any(axis=0))[0]
    if rows.size == 0:
        return 0
    far = (
        cy - rows.min(),
        rows.max() - cy - block + 1,
        cx - cols.min(),
        cols.max() - cx - block + 1,
    )
    return int(max(0, *far))


def perturb_halo(run, c: int, hw: tuple, block: int, start: int) -> int | None:
    """Smallest ``h`` such that replacing every input pixel further than ``h`` from a
    ``block x block`` square leaves the square's output unchanged (None: frame too small).

    ``run`` maps a float32 ``(1, c, *hw)`` array to the network's output array. Needs no
    gradient, so it also measures thresholded networks and ONNX sessions.
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, c, *hw)).astype(np.float32)
    base = run(x)
    cy, cx = ((n // 2) // block * block for n in hw)
    room = min(cy, cx, hw[0] - cy - block, hw[1] - cx - block)
    sel = (Ellipsis, slice(cy, cy + block), slice(cx, cx + block))
    tol = _TOL * (1 + float(np.abs(base[sel]).max()))
    # the reach of the block's edge pixels misses a few pixels of other pooling phases
    h = max(start, _reach(run, x, base, (cy, cx), block, tol, rng) + 4)
    while h <= room:
        if not _changed_beyond(run, x, base, (cy, cx), block, h, tol, rng):
            return h
        h += 4
    return None


def _changed_beyond(run, x, base, corner, block: int, h: int, tol: float, rng) -> bool:
    """Whether the output of the ``block`` square at ``corner`` changes when every input
    pixel further than ``h`` from it is replaced by noise."""
    cy, cx = corner
    y = rng.standard_normal(x.shape).astype(np.float32)
    keep = (Ellipsis, slice(cy - h, cy + block + h), slice(cx - h, cx + block + h))
    y[keep] = x[keep]
    sel = (Ellipsis, slice(cy, cy + block), slice(cx, cx + block))
    return bool(np.abs(run(y)[sel] - base[sel]).max() > tol)


def reaches_beyond(run, c: int, side: int, block: int, halo: int) -> bool:
    """Whether the network reaches further than ``halo``: the output of a ``block``
    square near a corner of a ``side`` x ``side`` frame changes when every input pixel
    further than ``halo`` from it is replaced. A halo measured on a smaller frame misses
    what lies beyond that frame (a convolution dilated by 300 px measured 0 on 512 px);
    near the corner, the square sees up to ``side - halo`` px in one direction (where a
    network's reach is the same). ``run``: see :func:`perturb_halo`."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, c, side, side)).astype(np.float32)
    base = run(x)
    at = -(-(halo + 1) // block) * block  # on the pooling grid, ``halo`` from the edge
    sel = (Ellipsis, slice(at, at + block), slice(at, at + block))
    tol = _TOL * (1 + float(np.abs(base[sel]).max()))
    return _changed_beyond(run, x, base, (at, at), block, halo, tol, rng)
