"""Axes: guessed or given, checked, and described in words."""

import pytest

from napari_unet.core.axes import AxesError, resolve_axes


def test_description_names_each_leading_axis_once():
    assert resolve_axes((31, 64, 80), None, 1).describe() == (
        "64 x 80 pixels; Z: 31 planes, processed one by one"
    )
    assert resolve_axes((2, 3, 64, 80), None, 1).describe() == (
        "64 x 80 pixels; T x Z: 2 x 3 = 6 planes, processed one by one"
    )
    # a channel axis read as planes (one-channel model) is named so, not by its letter
    assert "; channel: 2 planes" in resolve_axes((2, 64, 80), "QYX", 1).describe()
    assert resolve_axes((2, 64, 80), "CYX", 2).describe() == (
        "64 x 80 pixels, 2 channel(s) on axis C"
    )


def test_rgb_like_shapes_need_their_axes_named():
    with pytest.raises(AxesError, match="looks like an RGB"):
        resolve_axes((64, 64, 4), None, 1)
    assert resolve_axes((64, 64, 4), "ZYX", 1).leading_shape == (64,)
    # for a two-channel model, said as such (it read as 128 planes of 128 x 3 pixels)
    with pytest.raises(AxesError, match=r"RGB\(A\) image \(3 colours last\).* takes 2 ch"):
        resolve_axes((128, 128, 3), None, 2)
    assert resolve_axes((128, 128, 3), None, 3).axes == "YXC"
    with pytest.raises(AxesError, match="too many dimensions"):
        resolve_axes((1,) * 8 + (8, 8), None, 1)
