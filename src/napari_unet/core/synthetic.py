"""Synthetic microscopy with ground truth, generated deterministically from a seed.

These are the project's sample images (``sample_data/``, File > Open Sample in
napari). They are *synthetic*: drawn by this code, not acquired.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def nuclei(shape=(512, 512), n=90, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Fluorescence-like nuclei: touching, varied size and brightness, noise, uneven background.

    Returns ``(image uint16, instance labels uint16)``.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, np.uint16)
    signal = np.zeros(shape, np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    placed = 0
    centres: list[tuple[float, float, float]] = []
    for _ in range(n * 20):
        if placed == n:
            break
        r = rng.uniform(7, 17)
        if centres and rng.random() < 0.6:  # grow clusters of touching nuclei
            py, px, pr = centres[rng.integers(len(centres))]
            angle = rng.uniform(0, 2 * np.pi)
            cy, cx = py + np.sin(angle) * (pr + r) * 0.9, px + np.cos(angle) * (pr + r) * 0.9
        else:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ecc = rng.uniform(0.7, 1.0)
        theta = rng.uniform(0, np.pi)
        # computed in the nucleus's box only (the whole image per nucleus made the napari
        # sample take over a second on the GUI thread); the same pixels as over the image
        box = _box(cy, cx, r + 1, shape)
        dy, dx = yy[box] - cy, xx[box] - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        inside = (u / r) ** 2 + (v / (r * ecc)) ** 2 <= 1
        overlap = np.count_nonzero(inside & (labels[box] > 0)) / max(1, np.count_nonzero(inside))
        if not inside.any() or overlap > 0.12:
            continue
        placed += 1
        centres.append((cy, cx, r))
        new = inside & (labels[box] == 0)
        labels[box][new] = placed
        brightness = rng.uniform(0.35, 1.0)
        noise = rng.standard_normal(shape)  # drawn whole: the same numbers as ever
        wide = _box(cy, cx, r + 1 + _TEXTURE_RADIUS, shape)  # the filter's reach around it
        inner = tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, wide))
        texture = 1 + 0.15 * ndi.gaussian_filter(noise[wide], 1.5)[inner][new]
        signal[box][new] = brightness * texture
    signal = ndi.gaussian_filter(signal, 1.2)
    background = 0.08 + 0.12 * (xx / w) + 0.06 * np.sin(yy / h * np.pi)
    photons = (signal + background) * 900
    image = rng.poisson(photons) + rng.normal(100, 8, shape)
    return np.clip(image, 0, 65535).astype(np.uint16), labels


_TEXTURE_RADIUS = int(4.0 * 1.5 + 0.5)  # scipy's gaussian_filter(sigma=1.5) kernel radius


def _box(cy: float, cx: float, reach: float, shape) -> tuple[slice, slice]:
    """The pixels within ``reach`` of ``(cy, cx)`` in Y and X, clipped to the image."""
    y0, y1 = int(np.floor(cy - reach)), int(np.ceil(cy + reach)) + 1
    x0, x1 = int(np.floor(cx - reach)), int(np.ceil(cx + reach)) + 1
    return (
        slice(min(max(y0, 0), shape[0]), min(max(y1, 0), shape[0])),
        slice(min(max(x0, 0), shape[1]), min(max(x1, 0), shape[1])),
    )


def membranes(shape=(512, 512), n=120, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """EM-like cell membranes: Voronoi cells with dark 2-4 px walls, texture and noise.

    Returns ``(image uint8, labels uint8)`` with labels 0 = membrane, 255 = cell
    interior (the ISBI 2012 convention).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    seeds = np.zeros(shape, np.int32)
    pts = rng.uniform(0, 1, (n, 2)) * [h, w]
    seeds[pts[:, 0].astype(int), pts[:, 1].astype(int)] = np.arange(1, n + 1)
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    cells = seeds[iy, ix]
    edge = np.zeros(shape, bool)
    edge[:-1] |= cells[:-1] != cells[1:]
    edge[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    thickness = ndi.gaussian_filter(rng.standard_normal(shape), 8) * 3 + 1.5
    dist = ndi.distance_transform_edt(~edge)
    membrane = dist <= np.clip(thickness, 0.5, 2.5)
    interior = 0.65 + 0.1 * ndi.gaussian_filter(rng.standard_normal(shape), 2)
    interior += 0.08 * rng.uniform(-1, 1, n + 1)[cells]
    image = np.where(membrane, 0.18, interior)
    blobs = ndi.gaussian_filter(rng.standard_normal(shape), 3) > 0.9  # vesicles
    image = np.where(blobs & ~membrane, image - 0.25, image)
    image = ndi.gaussian_filter(image, 1.0) + rng.normal(0, 0.06, shape)
    image = np.clip(image * 255, 0, 255).astype(np.uint8)
    labels = np.where(membrane, 0, 255).astype(np.uint8)
    return image, labels


def dim_uneven(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """A domain shift for benchmarks: 0.15x signal, read noise, a strong left-right ramp."""
    rng = np.random.default_rng(seed)
    dim = image.astype(np.float32) * 0.15 + rng.normal(0, 60, image.shape)
    dim += 2000 * np.linspace(0, 1, image.shape[-1])[None]
    return np.clip(dim, 0, 65535).astype(np.uint16)


def strokes(
    target: np.ndarray,
    pixels_per_class: int = 300,
    seed: int = 0,
    prefer: np.ndarray | None = None,
    length: int = 25,
) -> np.ndarray:
    """Simulate a user's brush strokes on a class map (for benchmarks and tests).

    ``target`` holds class indices ``0..K-1``; the result is a sparse annotation
    (``0`` = not painted, ``k + 1`` = class ``k``) of short 3 px wide random-walk
    strokes that stay inside their class, about ``pixels_per_class`` pixels per
    class present. With ``prefer`` (a boolean map, e.g. where a model is wrong),
    most strokes start there, as a user paints over mistakes.
    """
    rng = np.random.default_rng(seed)
    target = np.asarray(target)
    out = np.zeros(target.shape, np.uint8)
    steps = np.array([(-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (1, 1), (-1, 1), (1, -1)])
    for c in np.unique(target):
        inside = target == c
        starts_all = np.argwhere(inside)
        starts_pref = np.argwhere(inside & prefer) if prefer is not None else starts_all[:0]
        painted = 0
        for _ in range(200):
            if painted >= pixels_per_class:
                break
            pool = starts_pref if len(starts_pref) and rng.random() < 0.7 else starts_all
            y, x = pool[rng.integers(len(pool))]
            line = np.zeros(target.shape, bool)
            direction = steps[rng.integers(len(steps))]
            for _ in range(length):
                line[y, x] = True
                if rng.random() < 0.3:
                    direction = steps[rng.integers(len(steps))]
                ny, nx = y + direction[0], x + direction[1]
                if not (0 <= ny < target.shape[0] and 0 <= nx < target.shape[1]):
                    break
                if not inside[ny, nx]:
                    break
                y, x = ny, nx
            line = ndi.binary_dilation(line) & inside & (out == 0)
            out[line] = c + 1
            painted += int(line.sum())
    return out
