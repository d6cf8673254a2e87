"""Overlay figures of held-back results for the model cards (numpy and skimage only).

Outlines: green where only the annotation has one, magenta where only the model
does, yellow where both agree. Crops are chosen by the annotation (the window
holding the most annotated pixels), never by how well the model does there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_unet.core import normalize as norm

TRUTH = np.array([0.1, 0.9, 0.1])
MODEL = np.array([1.0, 0.2, 1.0])
BOTH = np.array([1.0, 1.0, 0.1])


def gray(image: np.ndarray) -> np.ndarray:
    """``image`` normalised by percentiles 1 / 99.8 (``normalize.DEFAULT``), clipped to
    [0, 1], as RGB."""
    plane = np.asarray(image)[None]
    x = norm.apply(plane, *norm.plane_stats(plane.reshape(1, -1), norm.DEFAULT))[0]
    return np.repeat(np.clip(x, 0.0, 1.0)[..., None], 3, axis=-1)


def overlay(
    image: np.ndarray, truth: np.ndarray, model: np.ndarray, opacity: float = 1.0
) -> np.ndarray:
    """RGB ``image`` with the two masks drawn in the colours above (``opacity`` < 1
    keeps the image visible under wide masks)."""
    rgb = gray(image)
    for mask, colour in (
        (truth & ~model, TRUTH),
        (model & ~truth, MODEL),
        (truth & model, BOTH),
    ):
        rgb[mask] = (1 - opacity) * rgb[mask] + opacity * colour
    return rgb


def instance_overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Outlines of the annotated and predicted instances over ``image``."""
    from skimage.segmentation import find_boundaries

    return overlay(
        image, find_boundaries(truth, mode="inner"), find_boundaries(pred, mode="inner")
    )


def busiest_window(truth: np.ndarray, size: int, stride: int = 32) -> tuple[slice, slice]:
    """The ``size`` x ``size`` window (on a ``stride`` grid) with the most annotated pixels."""
    h, w = truth.shape
    size_y, size_x = min(size, h), min(size, w)
    fg = np.pad(np.cumsum(np.cumsum(truth > 0, axis=0), axis=1), ((1, 0), (1, 0)))
    best, where = -1, (0, 0)
    for y in range(0, h - size_y + 1, stride):
        for x in range(0, w - size_x + 1, stride):
            n = fg[y + size_y, x + size_x] - fg[y, x + size_x] - fg[y + size_y, x] + fg[y, x]
            if n > best:
                best, where = n, (y, x)
    y, x = where
    return slice(y, y + size_y), slice(x, x + size_x)


def save_grid(panels: list[np.ndarray], path: Path, columns: int, zoom: int = 1) -> None:
    """RGB panels of one size in a grid (4-px white gaps), each enlarged ``zoom`` times."""
    from skimage.io import imsave

    panels = [np.kron(p, np.ones((zoom, zoom, 1))) for p in panels]
    h, w = panels[0].shape[:2]
    rows = -(-len(panels) // columns)
    gap = 4
    canvas = np.ones((rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap, 3))
    for i, p in enumerate(panels):
        r, c = divmod(i, columns)
        canvas[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = p
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, (canvas * 255).round().astype(np.uint8), check_contrast=False)
    print(f"wrote {path} ({canvas.shape[1]}x{canvas.shape[0]})")
