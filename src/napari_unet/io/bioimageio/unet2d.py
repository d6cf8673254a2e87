"""bioimage.io's ``unet2d`` weights as a project U-Net, to train from them.

The BioImage Model Zoo's example U-Net (``unet2d.py``, e.g. the
``unet2d_nuclei_broad`` package trained on the 2018 Data Science Bowl nuclei) has
the project's stages with two differences that :class:`~napari_unet.model.UNetConfig`
names: bilinear up-sampling followed by a 1x1 convolution (``upsample="bilinear"``)
and no ReLU between the two convolutions of a block (``relu="last"``). Its weights,
renamed, give the same network in the project's format: same outputs, and it can
be trained, saved and looked into like any project U-Net.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from napari_unet.io.scripted import load_script
from napari_unet.model import UNet, UNetConfig

_ENCODER = re.compile(r"encoders\.\d+\.0\.weight")


def unet2d_config(state: dict[str, torch.Tensor]) -> UNetConfig:
    """The architecture of ``unet2d`` weights (``ValueError`` for other weights)."""
    depth = sum(1 for k in state if _ENCODER.fullmatch(k))
    first, out = state.get("encoders.0.0.weight"), state.get("output.weight")
    if depth == 0 or first is None or out is None or first.ndim != 4 or out.ndim != 4:
        raise ValueError(
            "these weights are not bioimage.io's unet2d (encoders.N, base, decoders.N, "
            "upsamplers.N, output)"
        )
    return UNetConfig(
        in_channels=int(first.shape[1]),
        num_classes=int(out.shape[0]),
        depth=depth,
        base_width=int(first.shape[0]),
        padding="same",
        norm="none",
        upsample="bilinear",
        relu="last",
    )


def _renamed(key: str, depth: int) -> str:
    """The project U-Net's name for a ``unet2d`` parameter."""
    parts = key.split(".")
    if parts[0] == "output":
        return "head." + parts[1]
    conv = {"0": "0", "1": "2"}  # the second convolution follows the (parameterless) norm
    if parts[0] == "encoders":
        i = int(parts[1])
        stage = f"enc{i}" if i == 0 else f"enc{i}.1"
        return f"{stage}.{conv[parts[2]]}.{parts[3]}"
    if parts[0] == "base":
        return f"bottleneck.1.{conv[parts[1]]}.{parts[2]}"
    level = depth - 1 - int(parts[1])  # decoders / upsamplers count from the deepest
    if parts[0] == "decoders":
        return f"dec{level}.conv.{conv[parts[2]]}.{parts[3]}"
    if parts[0] == "upsamplers":
        return f"dec{level}.up.{parts[2]}.{parts[3]}"
    raise KeyError(key)


def unet_from_unet2d(state: dict[str, torch.Tensor], num_classes: int | None = None) -> UNet:
    """A project :class:`UNet` computing what the ``unet2d`` weights ``state`` compute.

    With ``num_classes`` other than the weights' outputs, the 1x1 head is a new,
    randomly initialised one of ``num_classes`` outputs (seed torch first), to train
    the network for other classes from the package's features.
    """
    config = unet2d_config(state)
    new_head = num_classes not in (None, config.num_classes)
    try:
        renamed = {_renamed(k, config.depth): v for k, v in state.items()}
        if new_head:
            config = replace(config, num_classes=num_classes)
            renamed = {k: v for k, v in renamed.items() if not k.startswith("head.")}
        net = UNet(config)
        missing, unexpected = net.load_state_dict(renamed, strict=False)
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise ValueError(f"these weights are not bioimage.io's unet2d: {e}") from None
    if unexpected or set(missing) != ({"head.weight", "head.bias"} if new_head else set()):
        raise ValueError(
            "these weights are not bioimage.io's unet2d: "
            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    return net.eval()


def load_unet2d(path, num_classes: int | None = None) -> UNet:
    """:func:`unet_from_unet2d` of a package's TorchScript weights (``weights.pt``)."""
    scripted = load_script(Path(path), Path(path).name)
    return unet_from_unet2d(scripted.state_dict(), num_classes)
