"""Shared fixtures: tiny U-Nets with non-trivial batch-norm statistics."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_unet.core import normalize as norm
from napari_unet.core.tile_plan import tiling_geometry
from napari_unet.model import UNet, UNetConfig
from napari_unet.model.info import wrap_unet

# the real bioimage.io package of ../shared (tests that need it skip without it)
REAL_PACKAGE = Path(__file__).resolve().parents[1].parent / (
    "shared/models/bioimageio/unet2d_nuclei_broad"
)
needs_real_package = pytest.mark.skipif(
    not (REAL_PACKAGE / "bioimageio.yaml").is_file(),
    reason="real bioimage.io package not found at ../shared/models/bioimageio/unet2d_nuclei_broad",
)


@functools.cache
def _tiny_net(padding: str, depth: int, classes: int, channels: int, seed: int) -> UNet:
    torch.manual_seed(seed)
    net = UNet(
        UNetConfig(
            in_channels=channels,
            num_classes=classes,
            depth=depth,
            base_width=4,
            padding=padding,
        )
    )
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def tiny_model(padding="valid", depth=2, classes=3, channels=1, seed=0, **info):
    """A small random U-Net wrapped as a LoadedModel (fresh metadata each call)."""
    names = ["background", "interior", "boundary"][:classes] if classes <= 3 else None
    return wrap_unet(_tiny_net(padding, depth, classes, channels, seed), classes=names, **info)


@pytest.fixture
def valid_model():
    return tiny_model("valid")


@pytest.fixture
def same_model():
    return tiny_model("same")


def one_pass(image: np.ndarray, model, tta: bool = False) -> np.ndarray:
    """Reference: one forward pass over the whole image (C, Y, X) -> (K, Y, X), mirrored
    by the context tiles read (:func:`~napari_unet.core.tile_plan.tiling_geometry`).

    ``tta``: the mean over the mirrored *canvas* (the padded network input, mirrored
    back after the pass), which keeps the pooling grid where tiles have it; mirroring
    the image instead shifts the grid, and real networks answer that by up to 0.14.
    """
    g = tiling_geometry(model.info.geometry)  # the halo, on the pooling grid
    h = g.halo
    c, H, W = image.shape
    spec = norm.validate(model.info.normalization)
    scale, offset = norm.plane_stats(
        norm.sample_plane(lambda ys, xs: image[:, ys, xs], (H, W)), spec
    )
    ty, tx = g.snap(H + 2 * h, "up"), g.snap(W + 2 * h, "up")
    canvas = np.pad(image, ((0, 0), (h, ty - H - h), (0, 0)), mode="reflect" if H > 1 else "edge")
    canvas = np.pad(canvas, ((0, 0), (0, 0), (h, tx - W - h)), mode="reflect" if W > 1 else "edge")
    x = torch.from_numpy(norm.apply(canvas, scale, offset)[None])
    flips = ((), (-1,), (-2,), (-2, -1)) if tta else ((),)
    with torch.inference_mode():
        net = model.net.eval()
        p = sum(torch.softmax(net(x.flip(d)), 1).flip(d) for d in flips)[0].numpy() / len(flips)
    crop = 0 if g.valid else h
    return p[:, crop : crop + H, crop : crop + W]


def plugin_viewer(viewer):
    """The viewer as napari hands it to a dock widget opened from the Plugins menu: a
    ``PublicOnlyProxy``, through which every layer read is a new proxy object."""
    from napari.utils._proxies import PublicOnlyProxy

    return PublicOnlyProxy(viewer)
