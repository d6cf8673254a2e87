"""Explicit axes for images: which axis is Y, X, channels, and the rest.

Axes strings use one letter per array axis: ``Y`` and ``X`` (required), ``C``
(channels, optional) and any other letter (``Z``, ``T``, ...) for leading axes
processed plane by plane. Examples: ``"YX"``, ``"CYX"``, ``"YXC"``, ``"TZCYX"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class AxesError(ValueError):
    """The image's axes do not fit the model."""


@dataclass(frozen=True)
class Axes:
    """Resolved axes of an image of a given shape."""

    axes: str
    shape: tuple[int, ...]

    @property
    def leading(self) -> tuple[int, ...]:
        """Positions of the axes processed plane by plane."""
        return tuple(i for i, a in enumerate(self.axes) if a not in "CYX")

    @property
    def leading_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[i] for i in self.leading)

    @property
    def channels(self) -> int:
        return self.shape[self.axes.index("C")] if "C" in self.axes else 1

    @property
    def yx(self) -> tuple[int, int]:
        return self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")]

    def describe(self) -> str:
        """One line a user can read, e.g. ``"Z: 31 planes, processed one by one"``."""
        # (a channel axis read as planes has an internal letter: Q, R, S)
        names = [
            "channel" if self.axes[i] in CHANNEL_PLANE_LETTERS else self.axes[i]
            for i in self.leading
        ]
        n = int(np.prod(self.leading_shape)) if self.leading else 1
        y, x = self.yx
        text = f"{y} x {x} pixels"
        if "C" in self.axes:
            text += f", {self.channels} channel(s) on axis C"
        if len(names) == 1:
            text += f"; {names[0]}: {n} planes, processed one by one"
        elif names:
            sizes = " x ".join(str(s) for s in self.leading_shape)
            text += f"; {' x '.join(names)}: {sizes} = {n} planes, processed one by one"
        return text

    def read(self, array, lead_index: tuple[int, ...], ys: slice, xs: slice) -> np.ndarray:
        """Read one ``(C, y, x)`` block of a plane from any array-like (numpy, dask, zarr)."""
        index: list = []
        lead = iter(lead_index)
        for a in self.axes:
            if a == "Y":
                index.append(ys)
            elif a == "X":
                index.append(xs)
            elif a == "C":
                index.append(slice(None))
            else:
                index.append(next(lead))
        block = np.asarray(array[tuple(index)])
        kept = [a for a in self.axes if a in "CYX"]
        if "C" not in kept:
            block = block[None]
            kept = ["C", *kept]
        order = [kept.index(a) for a in "CYX"]
        return block.transpose(order)


def resolve_axes(shape: tuple[int, ...], axes: str | None, in_channels: int) -> Axes:
    """Check or guess the axes of an image for a model with ``in_channels`` inputs.

    With ``axes=None``: 2D is ``YX``; for a multichannel model a first or last
    axis equal to ``in_channels`` is ``C`` (last first, as RGB); a last axis of 1
    is the channel of a one-channel image (``Y, X, 1``); every other axis before
    ``YX`` is a leading axis (``Z``, ``T``, ...).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise AxesError(f"an image needs at least 2 dimensions (Y, X), got shape {shape}")
    if any(s == 0 for s in shape):
        raise AxesError(f"the image is empty (shape {shape})")
    if axes is None:
        axes = _guess_axes(shape, in_channels)
    axes = axes.upper()
    if len(axes) != len(shape):
        raise AxesError(f"axes {axes!r} has {len(axes)} letters but the image has shape {shape}")
    if len(set(axes)) != len(axes) or "Y" not in axes or "X" not in axes:
        raise AxesError(f"axes {axes!r} must name Y and X once each, with no repeated letter")
    if not axes.isalpha():
        raise AxesError(f"axes {axes!r} must be letters")
    res = Axes(axes, shape)
    if res.channels != in_channels:
        hint = (
            " (an RGB image? convert it to grayscale or pick one channel)"
            if res.channels in (3, 4) and in_channels == 1
            else ""
        )
        raise AxesError(
            f"the model expects {in_channels} input channel(s) but the image has "
            f"{res.channels} on axes {axes!r}{hint}"
        )
    return res


def _guess_axes(shape: tuple[int, ...], in_channels: int) -> str:
    nd = len(shape)
    if nd == 2:
        return "YX"
    if in_channels > 1 and shape[-1] == in_channels:
        return leading_letters(nd - 3) + "YXC"
    if in_channels > 1 and shape[-3] == in_channels:
        return leading_letters(nd - 3) + "CYX"
    if in_channels == 1 and nd >= 3 and shape[-1] == 1 and shape[-2] > 1:
        # (Y, X, 1), as Keras-style arrays and many TIFF writers store a grayscale image
        # (read as Y planes of Y x 1 pixels, it took 20x the time and gave nonsense)
        return leading_letters(nd - 3) + "YXC"
    if in_channels == 1 and nd >= 3 and shape[-1] in (3, 4) and shape[-2] > 4:
        raise AxesError(
            f"shape {shape} looks like an RGB(A) image but the model takes one channel; "
            "convert it to grayscale first (napari_unet.core.segment.lazy_gray), or, for a "
            "stack of images 3 or 4 pixels wide, pass axes='ZYX'"
        )
    if in_channels > 1 and nd >= 3 and shape[-1] in (3, 4) and shape[-2] > 4:
        raise AxesError(
            f"shape {shape} looks like an RGB(A) image ({shape[-1]} colours last) but the "
            f"model takes {in_channels} channels; pick {in_channels} of them "
            "(e.g. image[..., :2]), or give the axes (e.g. axes='ZYX' for a stack)"
        )
    if in_channels == 1 and nd == 3 and shape[-1] == 2 and shape[-2] > 4:
        raise AxesError(
            f"shape {shape} looks like a grayscale image with an alpha channel; drop the "
            "alpha channel first (image[..., 0]), or, for a stack of images 2 pixels wide, "
            "pass axes='ZYX'"
        )
    return leading_letters(nd - 2) + "YX"


# letters for the channels of an image that a one-channel model reads as planes, one by
# one (the panel's labelled C axis, the command line's OME or ImageJ C axis)
CHANNEL_PLANE_LETTERS = "QRS"


def leading_letters(n: int) -> str:
    """Letters for ``n`` leading axes: ``Z``, ``TZ``, ``STZ``, ..."""
    letters = "QRSTZ"
    if n > len(letters):
        raise AxesError(f"too many dimensions ({n + 2}): at most {len(letters) + 2} are read")
    return letters[len(letters) - n :]
