"""Data augmentation for training patches: flips, 90-degree rotations, intensity
jitter, gamma, blur, noise and the paper's elastic deformation.

Functions take a ``(C, H, W)`` float image and a matching ``(H', W')`` target
and weights (``(H', W')``, or ``(M, H', W')`` for several float maps) whose grid
is centred in the image's (valid-padding models see a larger input than their
output); geometry is applied to all alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run, and how strong."""

    flips: bool = True
    rotations: bool = True
    intensity: float = 0.2  # random scale in [1 - s, 1 + s] and shift in [-s, s]
    shift: float | None = None  # shift range instead of ``intensity`` (0: brightness kept)
    noise: float = 0.03  # largest std of additive Gaussian noise (each patch draws its std
    # from [0, noise]; normalised units)
    elastic: float = 0.0  # probability of elastic deformation
    elastic_sigma: float = 10.0  # px, std of displacements on the coarse grid
    elastic_grid: int = 3
    zoom: float = 0.0  # random isotropic zoom in [1 - zoom, 1 + zoom] (object size)
    # probabilities of nnU-Net's gamma (in GAMMA_RANGE, the patch's range kept) and of a
    # Gaussian blur (sigma in BLUR_SIGMA px: focus and optics of other microscopes)
    gamma: float = 0.0
    blur: float = 0.0

    def __post_init__(self) -> None:
        # name: largest value (None: any)
        limits = {"intensity": None, "shift": None, "noise": None, "elastic": 1.0}
        limits.update(elastic_sigma=None, zoom=0.9, gamma=1.0, blur=1.0)
        for name, top in limits.items():
            value = getattr(self, name)
            if value is None and name == "shift":  # shift None: the intensity's
                continue
            bad = isinstance(value, bool) or not isinstance(value, (int, float))
            if bad or not math.isfinite(value) or value < 0 or (top is not None and value > top):
                what = f"from 0 to {top}" if top is not None else "a finite number >= 0"
                raise ValueError(f"augmentation {name} must be {what}, got {value!r}")
        if isinstance(self.elastic_grid, bool) or not isinstance(self.elastic_grid, int):
            raise ValueError(f"elastic_grid must be a whole number, got {self.elastic_grid!r}")
        if not 2 <= self.elastic_grid <= 64:  # (the paper's 3; 1e6 asked for 14 TiB)
            raise ValueError(f"elastic_grid must be from 2 to 64, got {self.elastic_grid}")


GAMMA_RANGE = (0.7, 1.5)
BLUR_SIGMA = (0.5, 1.5)


def elastic_field(shape, rng, sigma: float, grid: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Smooth displacement field: random ``grid x grid`` vectors, bicubic upsampling."""
    coarse = rng.normal(0, sigma, (2, grid, grid))
    zoom = (shape[0] / grid, shape[1] / grid)
    dy = ndi.zoom(coarse[0], zoom, order=3, mode="nearest", grid_mode=True)
    dx = ndi.zoom(coarse[1], zoom, order=3, mode="nearest", grid_mode=True)
    return dy[: shape[0], : shape[1]], dx[: shape[0], : shape[1]]


def augment(image, target, weights, rng, cfg: AugmentConfig):
    """Augment one sample in place of copies; returns ``(image, target, weights)``."""
    deform = cfg.elastic > 0 and rng.random() < cfg.elastic
    if deform or cfg.zoom > 0:
        image, target, weights = _warp(image, target, weights, rng, cfg, deform)
    k = rng.integers(4) if cfg.rotations else 0
    flip = cfg.flips and rng.random() < 0.5
    image = np.rot90(image, k, axes=(1, 2))
    target, weights = np.rot90(target, k), np.rot90(weights, k, axes=(-2, -1))
    if flip:
        image, target, weights = image[:, :, ::-1], target[:, ::-1], weights[..., ::-1]
    if cfg.blur > 0 and rng.random() < cfg.blur:
        sigma = rng.uniform(*BLUR_SIGMA)
        image = np.stack([ndi.gaussian_filter(ch, sigma, mode="reflect") for ch in image])
    if cfg.gamma > 0 and rng.random() < cfg.gamma:
        image = _gamma(image, np.exp(rng.uniform(*np.log(GAMMA_RANGE))))
    if cfg.intensity > 0:
        c = image.shape[0]
        scale = rng.uniform(1 - cfg.intensity, 1 + cfg.intensity, (c, 1, 1))
        r = cfg.intensity if cfg.shift is None else cfg.shift
        shift = rng.uniform(-r, r, (c, 1, 1))
        image = image * scale + shift
    if cfg.noise > 0:
        image = image + rng.normal(0, cfg.noise * rng.random(), image.shape)
    return (
        np.ascontiguousarray(image, np.float32),
        np.ascontiguousarray(target),
        np.ascontiguousarray(weights, np.float32),
    )


def _gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    """``image`` through ``x ** gamma`` on each channel's own range (which it keeps)."""
    lo = image.min(axis=(1, 2), keepdims=True)
    span = image.max(axis=(1, 2), keepdims=True) - lo
    span = np.where(span > 0, span, 1)
    return ((image - lo) / span) ** gamma * span + lo


def _warp(image, target, weights, rng, cfg, deform: bool):
    """Zoom about the patch centre and/or elastic deformation, bicubic for the image."""
    _, h, w = image.shape
    th, tw = target.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if cfg.zoom > 0:
        f = np.exp(rng.uniform(np.log(1 - cfg.zoom), np.log(1 + cfg.zoom)))
        yy = (yy - (h - 1) / 2) / f + (h - 1) / 2
        xx = (xx - (w - 1) / 2) / f + (w - 1) / 2
    if deform:
        dy, dx = elastic_field((h, w), rng, cfg.elastic_sigma, cfg.elastic_grid)
        yy, xx = yy + dy, xx + dx
    coords = np.stack([yy, xx])
    image = np.stack([ndi.map_coordinates(ch, coords, order=3, mode="reflect") for ch in image])
    oy, ox = (h - th) // 2, (w - tw) // 2
    inner = coords[:, oy : oy + th, ox : ox + tw] - np.array([oy, ox])[:, None, None]
    # labels: nearest neighbour; pixels pulled from outside the label grid are ignored
    target = ndi.map_coordinates(target, inner, order=0, mode="constant", cval=-1)
    # weights: from the same pixel as each label (interpolated, a painted pixel beside
    # unpainted ones lost up to half its weight, and gap weights spread onto the classes
    # around them)
    maps = weights.reshape(-1, *weights.shape[-2:])
    weights = np.stack(
        [ndi.map_coordinates(m, inner, order=0, mode="nearest") for m in maps]
    ).reshape(weights.shape)
    return image, target, weights
