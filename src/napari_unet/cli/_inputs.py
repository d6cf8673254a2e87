"""The command line's image files as a model takes them (``predict`` and ``train``)."""

from __future__ import annotations

import sys


def model_input(image, axes: str | None, model) -> tuple:
    """``(image, axes, note, planes)`` as a one-channel model reads an image, as the
    segment panel does: of an RGB(A) image (colour last, as PNG, JPEG and RGB TIFF store
    it) its luminance; of a grayscale image with alpha, the gray; the channels of a
    multichannel stack (an OME or ImageJ C axis) one by one, as planes of the axis
    ``planes`` (``""``: none)."""
    from napari_unet.core.axes import CHANNEL_PLANE_LETTERS
    from napari_unet.core.segment import lazy_gray

    shape = tuple(image.shape)
    colour_last = axes is None or axes.upper().endswith("YXC")
    if model.info.in_channels != 1 or len(shape) < 3:
        return image, axes, "", ""
    # (axes that do not fit the image are left as given, for the message that says so:
    # it named the letter they were rewritten to, "axes 'ZQYX' has 4 letters")
    fits = axes is not None and len(axes) == len(shape) and axes.upper().count("C") == 1
    if not colour_last and fits and shape[axes.upper().index("C")] > 1:
        free = next((a for a in CHANNEL_PLANE_LETTERS if a not in axes.upper()), None)
        if free is not None:
            n = shape[axes.upper().index("C")]
            note = f"the model takes one channel: the {n} channels are segmented one by one"
            return image, axes.upper().replace("C", free), note, free
    # (not a (Z, Y, X) stack of images 2-4 pixels wide, as axes.py guesses)
    if not colour_last or shape[-2] <= 4:
        return image, axes, "", ""
    kept = axes[:-1] if axes else None
    if shape[-1] in (3, 4):
        return lazy_gray(image), kept, "RGB converted to grayscale", ""
    if shape[-1] == 2:  # grayscale with alpha (PNG's LA), one image or a stack of them
        return image[..., 0], kept, "alpha channel left out", ""
    return image, axes, "", ""


def training_images(paths, model) -> list:
    """The images as a one-channel model reads them (RGB as its gray, as predict does)."""
    from napari_unet.io.image_metadata import image_axes
    from napari_unet.io.images import read_image

    images = []
    for path in paths:
        raw = read_image(path)
        image, _, note, planes = model_input(raw, image_axes(path), model)
        if planes:  # channels as planes: training takes 2D planes (it says so)
            image, note = raw, ""
        if note:
            print(f"{path}: {note}", file=sys.stderr)
        images.append(_in_memory(path, image, pixels=True))
    return images


def label_images(paths) -> list:
    """The label images, as stored."""
    from napari_unet.io.images import read_image

    return [_in_memory(p, read_image(p)) for p in paths]


def _in_memory(path, image, pixels: bool = False):
    """The image read whole; a corrupt file, or (``pixels``) a dtype no network takes,
    refused in a message naming the file."""
    import numpy as np

    from napari_unet.core.normalize import check_dtype, dtype_of
    from napari_unet.io.images import corrupt_data

    try:
        if pixels:
            check_dtype(dtype_of(image))
        return np.asarray(image)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    except Exception as err:
        if corrupt_data(err):
            raise ValueError(f"{path}: its image data is corrupt ({err})") from None
        raise
