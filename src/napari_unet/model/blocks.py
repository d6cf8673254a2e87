"""Building blocks of the U-Net: double convolution, down and up steps.

All blocks take and return ``(N, C, H, W)`` float tensors.
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {kind!r}; use 'none', 'batch' or 'group'")


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by normalisation and ReLU.

    With ``padding="valid"`` each convolution trims one pixel per side, so the
    block maps ``(N, C_in, H, W)`` to ``(N, C_out, H - 4, W - 4)`` as in the paper.
    With ``padding="same"`` the size is kept. ``relu="last"`` leaves out the ReLU
    between the two convolutions (bioimage.io's ``unet2d`` blocks).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        padding: str,
        norm: str,
        dropout: float = 0.0,
        relu: str = "each",
    ) -> None:
        pad = 0 if padding == "valid" else 1
        inner = [nn.ReLU(inplace=True)] if relu == "each" else []
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, 3, padding=pad, bias=norm == "none"),
            _norm(norm, c_out),
            *inner,
            nn.Conv2d(c_out, c_out, 3, padding=pad, bias=norm == "none"),
            _norm(norm, c_out),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class Down(nn.Sequential):
    """2x2 max-pool (stride 2) then a :class:`DoubleConv`: ``H -> H / 2 (- 4)``."""

    def __init__(
        self, c_in: int, c_out: int, padding: str, norm: str, dropout: float, relu: str = "each"
    ) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(c_in, c_out, padding, norm, dropout, relu))


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop the spatial centre of ``x`` to ``(height, width)``."""
    dy = (x.shape[-2] - height) // 2
    dx = (x.shape[-1] - width) // 2
    return x[..., dy : dy + height, dx : dx + width]


class Up(nn.Module):
    """2x2 up-convolution halving the channels, crop-and-concatenate, DoubleConv.

    ``forward(x, skip)`` takes the deeper map ``x`` ``(N, C_in, h, w)`` and the
    encoder map ``skip`` ``(N, C_in / 2, H, W)`` with ``H >= 2h``; the skip is
    centre-cropped to ``2h`` (a no-op for same padding). ``upsample="bilinear"``
    up-samples bilinearly and halves the channels by a 1x1 convolution instead
    (bioimage.io's ``unet2d``; same padding only).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        padding: str,
        norm: str,
        dropout: float,
        relu: str = "each",
        upsample: str = "transpose",
    ) -> None:
        super().__init__()
        if upsample == "bilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="bilinear"), nn.Conv2d(c_in, c_in // 2, 1)
            )
        else:
            self.up = nn.ConvTranspose2d(c_in, c_in // 2, 2, stride=2)
        self.conv = DoubleConv(c_in // 2 + c_out, c_out, padding, norm, dropout, relu)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        skip = center_crop(skip, x.shape[-2], x.shape[-1])
        return self.conv(torch.cat([skip, x], dim=1))
