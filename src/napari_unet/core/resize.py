"""Images resized in Y and X, so that a model sees objects at the size it was trained on
(``SegmentOptions.diameter``), and results sampled back to the image's pixels.

Every resize uses the mapping of ``ndimage.zoom(..., grid_mode=True)``: pixel ``y`` of an
axis of ``full`` pixels lies at ``(y + 0.5) * small / full - 0.5`` on the resized axis.
"""

from __future__ import annotations

import numbers

import numpy as np

from napari_unet.core.normalize import check_dtype, dtype_of

TRUNCATE = 4.0  # the anti-aliasing Gaussian's radius in sigmas (scipy's default)


def _zoom(shape: tuple[int, ...], axes: str, factor: float) -> list[float]:
    zoom = [1.0] * len(shape)
    for a in "YX":  # at least one pixel left of a thin image
        zoom[axes.index(a)] = max(factor, 1.0 / shape[axes.index(a)])
    return zoom


def _working(dtype) -> np.dtype:
    """float32, or the image's own float dtype when wider."""
    dtype = np.dtype(dtype)
    return dtype if dtype.kind == "f" and dtype.itemsize >= 4 else np.dtype(np.float32)


def _sigmas(zoom: list[float], factor: float) -> list[float]:
    """The anti-aliasing Gaussian's sigma per axis (0: none), as skimage's rescale."""
    return [(1 / z - 1) / 2 if factor < 1 and z < 1 else 0.0 for z in zoom]


def resize_image(image, axes: str, factor: float) -> np.ndarray:
    """``image`` (axes ``axes``) resized by ``factor`` in Y and X: linear, float32,
    smoothed first when shrinking (anti-aliasing, as skimage.transform.rescale)."""
    from scipy import ndimage as ndi

    check_dtype(dtype_of(image))
    zoom = _zoom(tuple(image.shape), axes, factor)
    data = np.asarray(image)
    data = data.astype(_working(data.dtype), copy=False)
    if factor < 1:
        data = ndi.gaussian_filter(data, _sigmas(zoom, factor), mode="mirror")
    return ndi.zoom(data, zoom, order=1, mode="reflect", grid_mode=True)


class ResizedView:
    """What :func:`resize_image` gives, computed only where read (``view[index]`` with whole
    numbers and unit-step slices, as the tiling engine reads): segmenting a region of a
    large rescaled image reads and resizes the region's neighbourhood, not the whole
    image or stack (a 32 x 32 region made a 6144 x 6144 float32 copy)."""

    def __init__(self, image, axes: str, factor: float) -> None:
        check_dtype(dtype_of(image))
        self.image = image
        zoom = _zoom(tuple(image.shape), axes, factor)
        self.shape = tuple(int(round(n * z)) for n, z in zip(image.shape, zoom))
        self.ndim, self.dtype = len(self.shape), _working(dtype_of(image))
        self._sigma = _sigmas(zoom, factor)
        self._yx = (axes.index("Y"), axes.index("X"))

    def __getitem__(self, index) -> np.ndarray:
        from scipy import ndimage as ndi

        index = index if isinstance(index, tuple) else (index,)
        if len(index) != self.ndim:
            raise IndexError(f"index {index!r}: give one entry per axis ({self.ndim})")
        source, spans, drop = [], {}, []
        for axis, (i, n) in enumerate(zip(index, self.shape)):
            if isinstance(i, numbers.Integral):
                i = int(i) + (n if i < 0 else 0)
                if not 0 <= i < n:
                    raise IndexError(f"index {i} is out of range for an axis of {n}")
                start, stop, drop = i, i + 1, [*drop, axis]
            elif isinstance(i, slice) and i.step in (None, 1):
                start, stop, _ = i.indices(n)
                stop = max(start, stop)
            else:
                raise IndexError(f"only whole numbers and unit-step slices, not {i!r}")
            if axis in self._yx:
                spans[axis] = self._span(axis, start, stop)
                source.append(slice(*spans[axis][0]))
            else:
                source.append(slice(start, stop))
        block = np.asarray(self.image[tuple(source)]).astype(self.dtype, copy=False)
        if any(self._sigma):
            block = ndi.gaussian_filter(block, self._sigma, mode="mirror")
        for axis, ((a, _), lo, hi, w) in spans.items():
            w = w.reshape([-1 if k == axis else 1 for k in range(block.ndim)])
            low, high = np.take(block, lo - a, axis=axis), np.take(block, hi - a, axis=axis)
            block = (low * (1 - w) + high * w).astype(self.dtype, copy=False)
        return block.squeeze(axis=tuple(drop)) if drop else block

    def _span(self, axis: int, start: int, stop: int):
        """The source pixels ``(a, b)`` that resized pixels ``start:stop`` of ``axis`` are
        computed from (with the Gaussian's reach: a window's own edges then do not show),
        and the linear interpolation's ``lo`` / ``hi`` source pixels and weights."""
        full, small = self.image.shape[axis], self.shape[axis]
        c = _small_coordinate(np.arange(start, stop), small, full)  # (the inverse mapping)
        floor = np.floor(c)
        # (outside the edge pixels' centres the half-sample mirror repeats the edge pixel)
        lo = np.clip(floor, 0, full - 1).astype(np.intp)
        hi = np.clip(floor + 1, 0, full - 1).astype(np.intp)
        reach = int(TRUNCATE * self._sigma[axis] + 0.5) + 1 if self._sigma[axis] else 0
        a = max(0, int(lo.min()) - reach) if len(c) else 0
        b = min(full, int(hi.max()) + 1 + reach) if len(c) else 0
        return (a, b), lo, hi, c - floor


def resize_labels(labels: np.ndarray, yx: tuple[int, int]) -> np.ndarray:
    """Integer ``labels`` with their last two axes resized to ``yx`` (nearest)."""
    return resize_yx(np.asarray(labels), yx, order=0)


def resize_yx(result: np.ndarray, yx: tuple[int, int], order: int) -> np.ndarray:
    """``result`` with its last two axes resized to ``yx`` (order 0: nearest label)."""
    from scipy import ndimage as ndi

    zoom = [1.0] * (result.ndim - 2) + [yx[0] / result.shape[-2], yx[1] / result.shape[-1]]
    out = ndi.zoom(result, zoom, order=order, mode="nearest", grid_mode=True)
    return out[..., : yx[0], : yx[1]]


def _small_coordinate(y, full: int, small: int):
    """Where pixel ``y`` of an axis of ``full`` pixels lies on the same axis resized to
    ``small`` pixels (the mapping of ``ndimage.zoom(..., grid_mode=True)``)."""
    return (np.asarray(y, np.float64) + 0.5) * small / full - 0.5


def small_span(a: int, b: int, full: int, small: int) -> tuple[int, int]:
    """The pixels of the resized axis that pixels ``a:b`` of the full one are sampled
    from (plus one for interpolation)."""
    lo = int(np.floor(_small_coordinate(a, full, small))) - 1
    hi = int(np.ceil(_small_coordinate(b - 1, full, small))) + 2
    return max(0, lo), min(small, max(hi, lo + 1))


def sample_axis(result, axis, a, b, full, small, start, order):
    """``result`` (an axis of the small image from pixel ``start``) sampled at the
    original pixels ``a:b`` of that axis: nearest (order 0) or linear, edges clamped."""
    c = np.clip(_small_coordinate(np.arange(a, b), full, small) - start, 0, result.shape[axis] - 1)
    if order == 0:
        return np.take(result, np.floor(c + 0.5).astype(np.intp), axis=axis)
    lo = np.floor(c).astype(np.intp)
    hi = np.minimum(lo + 1, result.shape[axis] - 1)
    w = (c - lo).astype(np.float32)
    shape = [1] * result.ndim
    shape[axis] = len(w)
    w = w.reshape(shape)
    return np.take(result, lo, axis=axis) * (1 - w) + np.take(result, hi, axis=axis) * w
