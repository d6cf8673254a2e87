"""The U-Net of Ronneberger et al. (2015) with named stages.

Stages, in the order data flows through them::

    enc0 -> enc1 -> ... -> enc{d-1} -> bottleneck -> dec{d-1} -> ... -> dec0 -> head

``enc{i}`` works at 1/2**i of the input resolution (``enc{i>0}`` starts with a
2x2 max-pool), ``bottleneck`` at 1/2**d, ``dec{i}`` up-convolves to 1/2**i and
concatenates the (cropped) ``enc{i}`` map, and ``head`` is a 1x1 convolution
giving one logit map per class.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from napari_unet.model.blocks import DoubleConv, Down, Up
from napari_unet.model.shapes import Geometry, unet_geometry

PADDINGS = ("valid", "same")
NORMS = ("none", "batch", "group")
UPSAMPLES = ("transpose", "bilinear")
RELUS = ("each", "last")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet`.

    The paper's network is ``UNetConfig(in_channels=1, num_classes=2, depth=4,
    base_width=64, padding="valid", norm="none")``. bioimage.io's ``unet2d``
    (``unet2d_nuclei_broad``) is ``depth=3, base_width=16, padding="same",
    norm="none", upsample="bilinear", relu="last"``: bilinear up-sampling and a 1x1
    convolution in place of the 2x2 up-convolution, and no ReLU between the two
    convolutions of a block.
    """

    in_channels: int = 1
    num_classes: int = 2
    depth: int = 4
    base_width: int = 64
    padding: str = "valid"
    norm: str = "batch"
    dropout: float = 0.0
    upsample: str = "transpose"
    relu: str = "each"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("padding", PADDINGS),
            ("norm", NORMS),
            ("upsample", UPSAMPLES),
            ("relu", RELUS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.upsample == "bilinear" and self.padding != "same":
            raise ValueError("bilinear up-sampling needs padding 'same'")
        # bounds: a configuration read from a file is built (base_width 2**40 overflowed
        # the allocator instead of being refused)
        limits = {"in_channels": 1024, "num_classes": 1024, "depth": 8, "base_width": 1024}
        for name, most in limits.items():
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Integral)
                or not 1 <= value <= most
            ):
                raise ValueError(f"{name} must be an integer from 1 to {most}, got {value!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real):
            raise ValueError(f"dropout must be a number, got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """Build from a dict, refusing unknown keys with a clear message."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown U-Net configuration keys: {sorted(unknown)}")
        return cls(**d)


class UNet(nn.Module):
    """U-Net mapping ``(N, in_channels, H, W)`` to logits ``(N, num_classes, H', W')``.

    ``H' = H`` for same padding; for valid padding ``H' = H - geometry.shrink``
    (572 -> 388 at depth 4). Input sizes must be accepted by :attr:`geometry`.
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs) -> None:
        super().__init__()
        self.config = config if config is not None else UNetConfig(**kwargs)
        c = self.config
        widths = [c.base_width * 2**i for i in range(c.depth + 1)]
        self.enc0 = DoubleConv(c.in_channels, widths[0], c.padding, c.norm, 0.0, c.relu)
        for i in range(1, c.depth):
            down = Down(widths[i - 1], widths[i], c.padding, c.norm, 0.0, c.relu)
            self.add_module(f"enc{i}", down)
        self.bottleneck = Down(widths[-2], widths[-1], c.padding, c.norm, c.dropout, c.relu)
        for i in reversed(range(c.depth)):
            up = Up(widths[i + 1], widths[i], c.padding, c.norm, 0.0, c.relu, c.upsample)
            self.add_module(f"dec{i}", up)
        self.head = nn.Conv2d(widths[0], c.num_classes, 1)

    @property
    def geometry(self) -> Geometry:
        """Accepted sizes, output size and halo of this network."""
        return unet_geometry(self.config.depth, self.config.padding, self.config.upsample)

    @property
    def stage_names(self) -> list[str]:
        """Stage names in forward order."""
        d = self.config.depth
        return (
            [f"enc{i}" for i in range(d)]
            + ["bottleneck"]
            + [f"dec{i}" for i in reversed(range(d))]
            + ["head"]
        )

    def stage_scale(self, name: str) -> int:
        """Downsampling factor of a stage's output relative to the input."""
        d = self.config.depth
        if name == "bottleneck":
            return 2**d
        if name == "head":
            return 1
        if name[:3] in ("enc", "dec") and name[3:].isdigit() and int(name[3:]) < d:
            return 2 ** int(name[3:])
        raise KeyError(f"no stage {name!r}; stages are {self.stage_names}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x`` of shape ``(N, in_channels, H, W)``."""
        d = self.config.depth
        skips = []
        for i in range(d):
            x = getattr(self, f"enc{i}")(x)
            skips.append(x)
        x = self.bottleneck(x)
        for i in reversed(range(d)):
            x = getattr(self, f"dec{i}")(x, skips[i])
        return self.head(x)


# the largest new network built from settings (the paper's is 31 M parameters): depth 5
# at base width 1024 (2.4 G parameters a layer) was built until the memory ran out
MAX_PARAMETERS = 500_000_000


def check_size(config: UNetConfig) -> int:
    """The parameters of ``config``'s U-Net, counted without allocating them, or a
    ValueError above :data:`MAX_PARAMETERS` (float32 weights, and Adam's two copies
    more while training)."""
    with torch.device("meta"):
        n = sum(p.numel() for p in UNet(config).parameters())
    if n > MAX_PARAMETERS:
        raise ValueError(
            f"a U-Net of depth {config.depth} and base width {config.base_width} has "
            f"{n / 1e6:,.0f} M parameters ({4 * n / 2**30:,.0f} GiB of weights, about 4 times "
            f"that to train); napari-unet builds at most {MAX_PARAMETERS / 1e6:,.0f} M: use "
            "a smaller depth or base width (the paper's U-Net: depth 4, base width 64, 31 M)"
        )
    return n


def fused_for_inference(net: nn.Module) -> nn.Module:
    """A copy of ``net`` in eval mode with each BatchNorm folded into its convolution.

    Same outputs (to float round-off), faster, and without the normalised
    activations in memory. Networks without batch norm are returned as they are.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if not any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
        return net.eval()
    fused = copy.deepcopy(net).eval()
    for module in fused.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                fused_conv = fuse_conv_bn_eval(conv, bn)
                conv.weight, conv.bias = fused_conv.weight, fused_conv.bias
                setattr(module, bn_name, nn.Identity())
    return fused


def for_inference(net: nn.Module, device) -> nn.Module:
    """The fastest equivalent of a project U-Net for inference on ``device``.

    Batch norm folded into the convolutions and, on CPU and CUDA, the channels-last
    memory layout (oneDNN / cuDNN pick faster kernels: 1.78 s instead of 3.52 s for
    a 1216 x 1216 input with the nuclei model on this project's 2-core CPU). Feed
    it inputs through :func:`to_layout`. A project U-Net is copied, never moved or
    changed in place (the same model may be saved or exported meanwhile); other networks
    are moved to ``device`` in place (they may be large) and returned as they are.
    """
    import copy

    if not isinstance(net, UNet):
        return net.to(device).eval()
    fused = fused_for_inference(net)
    if fused is net:  # no batch norm to fold: still a copy
        fused = copy.deepcopy(net).eval()
    return _fast_layout(fused.to(device), device)


def for_training(net: nn.Module, device) -> nn.Module:
    """``net`` on ``device`` in the memory layout it trains fastest in (in place).

    Project U-Nets use channels-last on CPU and CUDA (a training step of 8 x 256^2
    patches: 2.1 s -> 1.7 s on this project's 2-core CPU); feed inputs through
    :func:`to_layout`. The weights and their values are unchanged.
    """
    net = net.to(device)
    return _fast_layout(net, device) if isinstance(net, UNet) else net


def _fast_layout(net: nn.Module, device) -> nn.Module:
    """Channels-last on CPU and CUDA (marked for :func:`to_layout`), in place."""
    if torch.device(device).type in ("cpu", "cuda"):
        net = net.to(memory_format=torch.channels_last)
        net.channels_last = True
    return net


def to_layout(x: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """``x`` in the memory layout ``net`` (from :func:`for_inference` or
    :func:`for_training`) runs fastest on."""
    if getattr(net, "channels_last", False) and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
