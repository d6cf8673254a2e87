"""Intensity normalisation: exact on wide dtypes, sane on degenerate images."""

import numpy as np
import pytest

from napari_unet.core import normalize as norm


def _normalised(plane: np.ndarray, spec=None) -> np.ndarray:
    block = plane[None]
    scale, offset = norm.plane_stats(block.reshape(1, -1), spec or norm.DEFAULT)
    return norm.apply(block, scale, offset)[0]


@pytest.mark.parametrize(
    ("dtype", "base", "levels"),
    [(np.float64, 1e7, 11), (np.uint32, 10**8, 101), (np.int64, 10**9, 1001)],
)
def test_values_on_a_large_offset_keep_their_differences(dtype, base, levels):
    """float32 keeps 7 digits: cast before the offset was taken away, 1e7 + 0..10 kept
    11 levels as 11, but 1e9 + 0..1000 fell to 17 distinct values."""
    steps = np.arange(levels, dtype=np.float64)
    plane = (base + np.resize(steps, (64, 64))).astype(dtype)
    out = _normalised(plane, {"mode": "percentile", "low": 0.0, "high": 100.0})
    assert len(np.unique(out)) == levels
    expected = (np.resize(steps, (64, 64)) / (levels - 1)).astype(np.float32)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_a_dark_field_with_a_few_bright_spots_is_scaled_by_its_range():
    """Both percentiles 0: the raw values (3000) went into the network before."""
    plane = np.zeros((96, 96), np.uint16)
    plane[10:14, 10:14] = 3000  # 16 of 9,216 pixels: above the 99.8th percentile
    out = _normalised(plane)
    assert out.max() == pytest.approx(1.0) and out.min() == 0.0
    assert not _normalised(np.full((8, 8), 7, np.uint16)).any()  # flat: all 0


def test_huge_finite_values_are_normalised_and_nan_is_named():
    plane = np.linspace(0, 1e300, 64 * 64).reshape(64, 64)
    out = _normalised(plane)
    assert np.isfinite(out).all() and 0.9 < out.max() < 1.1
    plane[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        _normalised(plane)


@pytest.mark.parametrize("mode", ["percentile", "zscore"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiny_values_are_normalised_like_any_others(mode, dtype):
    """Flatness was an absolute spread of 1e-12: an image scaled by 1e-16 (values around
    1e-13) went into the network unscaled, about 0 everywhere, and no object was found."""
    plane = np.random.default_rng(0).random((64, 64)) * 9 + 1
    spec = {**norm.DEFAULT, "mode": mode} if mode == "zscore" else None
    reference = _normalised(plane.astype(dtype), spec)
    tiny = _normalised((plane * 4e-14).astype(dtype), spec)
    np.testing.assert_allclose(tiny, reference, atol=1e-4)
    assert not _normalised(np.full((8, 8), 3e-14, dtype), spec).any()  # flat: still all 0


def test_a_few_extreme_pixels_do_not_make_an_image_flat():
    """Flatness relative to the largest value took a 3 x 3 block of 1e10 (a no-data
    value) for the scale of the image: everything else went in as about 0."""
    plane = np.random.default_rng(1).random((128, 128)).astype(np.float32) * 0.9
    spiked = plane.copy()
    spiked[:3, :3] = 1e10
    out = _normalised(spiked)
    np.testing.assert_allclose(out[10:, 10:], _normalised(plane)[10:, 10:], atol=0.02)


def test_a_plane_sample_is_whole_when_small_and_windows_when_large():
    img = np.arange(40 * 3000, dtype=np.float32).reshape(1, 40, 3000)
    reads = []

    def read(ys, xs):
        reads.append((ys, xs))
        return img[:, ys, xs]

    small = norm.sample_plane(read, (40, 3000), max_samples=40 * 3000)
    np.testing.assert_array_equal(small, img.reshape(1, -1))
    reads.clear()
    sample = norm.sample_plane(read, (40, 3000), max_samples=40 * 800)
    # Y (40 px) whole, X in 8 windows of 800 / 8 = 100 px spread over the axis
    assert len(reads) == 8 and sample.shape == (1, 40 * 800)
    starts = [xs.start for _, xs in reads]
    assert starts[0] < 200 and starts[-1] > 2700 and np.all(np.diff(starts) > 300)
    assert all(ys == slice(0, 40) for ys, _ in reads)
    reads.clear()
    big = norm.sample_plane(
        lambda ys, xs: np.ones((1, ys.stop - ys.start, xs.stop - xs.start)), (3000, 3000)
    )
    assert big.shape == (1, 1 << 20)  # 8 x 8 windows of 128 x 128 pixels
