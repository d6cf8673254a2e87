"""Input intensity normalisation, as a model's metadata prescribes.

A normalisation spec is a small dict stored with the model, e.g.
``{"mode": "percentile", "low": 1.0, "high": 99.8}``. Statistics are taken per
plane (per channel) from a sample of at most ``max_samples`` pixels (windows spread
over the plane), so huge planes cost little, then applied tile by tile as ``x * scale + offset``.

Modes
-----
``percentile``  maps the ``low``/``high`` percentiles to 0/1 (CSBDeep, StarDist).
``zscore``      zero mean, unit variance.
``fixed``       ``(x - offset) / scale`` with constants from the spec (``scale``, ``offset``).
``none``        unchanged (float32 cast).

Optional keys (bioimage.io packages): ``eps`` divides by ``spread + eps``
(``std + eps`` or ``high - low + eps``) instead of guarding a zero spread, and
``joint: True`` takes one set of statistics over all channels together.
"""

from __future__ import annotations

import numbers

import numpy as np

DEFAULT = {"mode": "percentile", "low": 1.0, "high": 99.8}
MODES = ("percentile", "zscore", "fixed", "none")


def validate(spec: dict | None) -> dict:
    """Return a complete spec, raising ``ValueError`` for an unknown mode or a value that
    is not a finite number where one belongs (a model file's metadata is not trusted)."""
    if spec is not None and not isinstance(spec, dict):
        raise ValueError(f"a normalisation spec is an object, got {spec!r:.80}")
    spec = dict(DEFAULT if spec is None else spec)
    mode = spec.get("mode")
    if mode not in MODES:
        raise ValueError(f"unknown normalisation mode {mode!r}; use one of {MODES}")
    if mode == "percentile":
        spec.setdefault("low", 1.0)
        spec.setdefault("high", 99.8)
    if mode == "fixed":
        spec.setdefault("scale", 1.0)
        spec.setdefault("offset", 0.0)
    for key in ("low", "high", "scale", "offset", "eps"):
        value = spec.get(key)
        if value is None and key == "eps" or key not in spec:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not np.isfinite(value)
        ):
            raise ValueError(f"normalisation {key!r} must be a finite number, got {value!r:.40}")
    if mode == "percentile" and not 0 <= spec["low"] < spec["high"] <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {spec}")
    if mode == "fixed" and spec["scale"] == 0:
        raise ValueError("fixed normalisation needs a non-zero scale")
    if spec.get("eps") is not None and spec["eps"] < 0:
        raise ValueError(f"normalisation eps must not be negative, got {spec['eps']}")
    return spec


SAMPLE_WINDOWS = 8  # per axis, on planes too large to read whole


def sample_plane(read_block, yx: tuple[int, int], max_samples: int = 1 << 20) -> np.ndarray:
    """A ``(C, n)`` sample of a plane, read through ``read_block(ys, xs)``.

    A plane of up to ``max_samples`` pixels is read whole. On a larger one each axis
    longer than its share of the samples is read in ``SAMPLE_WINDOWS`` evenly spaced
    windows, so a huge plane costs at most 64 small reads. (A strided read of a dask or
    zarr plane decodes every chunk of it: a 32768-pixel plane was read whole, twice.)
    In memory or lazy, the sample is the same.
    """
    h, w = yx
    if h * w <= max_samples:
        block = read_block(slice(0, h), slice(0, w))
        return block.reshape(block.shape[0], -1)
    short = min(h, w)
    if short * short <= max_samples:  # a thin plane: the short axis whole
        spans = [short, max_samples // short]
        spans = spans if h <= w else spans[::-1]
    else:
        spans = [int(np.sqrt(max_samples))] * 2
    slices = [_windows(n, span) for n, span in zip(yx, spans)]
    blocks = [read_block(ys, xs) for ys in slices[0] for xs in slices[1]]
    return np.concatenate([b.reshape(b.shape[0], -1) for b in blocks], axis=1)


def _windows(n: int, span: int) -> list[slice]:
    """``span`` pixels of an axis of ``n``: all, or in windows spread over it."""
    if n <= span:
        return [slice(0, n)]
    size = max(1, span // SAMPLE_WINDOWS)
    starts = ((np.arange(SAMPLE_WINDOWS) + 0.5) * n / SAMPLE_WINDOWS - size / 2).astype(int)
    return [slice(int(s), int(s) + size) for s in np.clip(starts, 0, n - size)]


def plane_stats(sample: np.ndarray, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(scale, offset)`` so that ``x * scale + offset`` is normalised.

    Raises ``ValueError`` if the sample holds NaN or infinite values.
    """
    sample = sample.astype(np.float64, copy=False)
    if not np.isfinite(sample).all():
        raise ValueError("the image contains NaN or infinite values; fix or mask them first")
    mode = spec["mode"]
    c = sample.shape[0]
    if mode == "none":
        return np.ones(c), np.zeros(c)
    if mode == "fixed":
        s = 1.0 / float(spec["scale"])
        return np.full(c, s), np.full(c, -float(spec["offset"]) * s)
    if spec.get("joint"):
        scale, offset = plane_stats(sample.reshape(1, -1), {**spec, "joint": False})
        return np.repeat(scale, c), np.repeat(offset, c)
    if mode == "zscore":
        lo = sample.mean(axis=1)
        spread = sample.std(axis=1)
    else:
        lo, hi = np.percentile(sample, [spec["low"], spec["high"]], axis=1)
        spread = hi - lo
        if spec.get("eps") is None:
            # percentiles that coincide on an image that is not flat (a dark field with a
            # few bright spots): its full range, not the raw values (scale 1)
            spread = np.where(_flat(spread, lo), sample.max(axis=1) - lo, spread)
    if spec.get("eps") is not None:
        scale = 1.0 / (spread + float(spec["eps"]))
    else:
        scale = 1.0 / np.where(_flat(spread, lo), 1.0, spread)
    return scale, -lo * scale


def _flat(spread: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Whether each channel's ``spread`` is nothing next to the values it spans from
    ``lo`` (relative, not absolute: values around 1e-13 spread over 1e-13 are not flat;
    a few extreme pixels beyond the percentiles do not count)."""
    size = np.maximum(np.abs(lo), np.abs(lo + spread))
    return spread <= np.maximum(size * 1e-9, np.finfo(np.float64).tiny)


def apply(block: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Normalise a ``(C, y, x)`` block to float32; NaN raises ``ValueError``."""
    kind, size = block.dtype.kind, block.dtype.itemsize
    if (kind == "f" and size > 4) or (kind in "iu" and size > 2):
        # in float64 first: float32 keeps 7 digits, so values on a large offset
        # (1e7 + 0..10) would lose their differences before the offset is taken away
        wide = block.astype(np.float64) * scale[:, None, None] + offset[:, None, None]
        out = wide.astype(np.float32)
    else:
        out = block.astype(np.float32, copy=True)
        out *= scale.astype(np.float32)[:, None, None]
        out += offset.astype(np.float32)[:, None, None]
    if not np.isfinite(out).all():
        if kind != "f" or np.isfinite(block).all():
            raise ValueError(
                "the image's values do not fit in float32 once normalised; rescale the image"
            )
        raise ValueError("the image contains NaN or infinite values; fix or mask them first")
    return out


def dtype_of(image) -> np.dtype:
    """The dtype of an array-like without reading it (a dask or zarr array stays on disk)."""
    return np.dtype(image.dtype) if hasattr(image, "dtype") else np.asarray(image).dtype


def check_dtype(dtype) -> None:
    """Refuse dtypes that are not real numbers, with a clear message."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "uif":
        raise ValueError(
            f"an image of dtype {dtype} cannot be used; expected integers or floats"
            + (" (booleans look like a mask, not an image)" if dtype.kind == "b" else "")
        )
