"""bioimage.io's unet2d weights as a project U-Net (io/bioimageio/unet2d.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REAL_PACKAGE, needs_real_package
from napari_unet.io.bioimageio.unet2d import unet2d_config, unet_from_unet2d
from napari_unet.model import UNet


def _block(ci, co):
    return nn.Sequential(
        nn.Conv2d(ci, co, 3, padding=1), nn.Conv2d(co, co, 3, padding=1), nn.ReLU()
    )


class UNet2d(nn.Module):
    """bioimage.io's example ``unet2d.py`` (UNet2d), written out here as it runs."""

    def __init__(self, cin=1, cout=1, depth=3, width=4):
        super().__init__()
        w = [width * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList(_block(a, b) for a, b in zip([cin] + w[:-2], w[:-1]))
        self.base = _block(w[-2], w[-1])
        self.decoders = nn.ModuleList(_block(w[i + 1], w[i]) for i in reversed(range(depth)))
        self.upsamplers = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2.0, mode="bilinear"), nn.Conv2d(c, c // 2, 1))
            for c in reversed(w[1:])
        )
        self.output = nn.Conv2d(w[0], cout, 1)

    def forward(self, x):
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.base(x)
        for up, dec in zip(self.upsamplers, self.decoders):
            x = dec(torch.cat([skips.pop(), up(x)], 1))
        return self.output(x)


@pytest.mark.parametrize("depth", [2, 3])
def test_unet2d_weights_give_the_same_network(depth):
    torch.manual_seed(depth)
    ref = UNet2d(cin=2, cout=3, depth=depth, width=4).eval()
    net = unet_from_unet2d(ref.state_dict())
    assert isinstance(net, UNet)
    c = net.config
    assert (c.in_channels, c.num_classes, c.depth, c.base_width) == (2, 3, depth, 4)
    assert (c.upsample, c.relu, c.norm, c.padding) == ("bilinear", "last", "none", "same")
    x = torch.randn(2, 2, 48, 40)
    with torch.no_grad():
        assert torch.allclose(net(x), ref(x), atol=1e-5)


def test_other_weights_are_refused():
    with pytest.raises(ValueError, match="not bioimage.io's unet2d"):
        unet2d_config(UNet().state_dict())
    state = UNet2d(depth=2).state_dict()
    state["base.2.weight"] = torch.zeros(1)  # an unexpected parameter
    with pytest.raises(ValueError, match="not bioimage.io's unet2d"):
        unet_from_unet2d(state)
    del state["base.2.weight"], state["decoders.0.1.bias"]
    with pytest.raises(ValueError, match="not bioimage.io's unet2d"):
        unet_from_unet2d(state)


@needs_real_package
def test_the_real_package_weights_compute_the_same():
    scripted = torch.jit.load(str(REAL_PACKAGE / "weights.pt"), map_location="cpu").eval()
    net = unet_from_unet2d(scripted.state_dict())
    assert net.config.depth == 3 and net.config.base_width == 16
    x = torch.randn(1, 1, 128, 96)
    with torch.no_grad():
        assert torch.allclose(net(x), scripted(x), atol=1e-4)


def test_the_card_names_the_unet2d_differences():
    from napari_unet.model.info import wrap_unet

    card = wrap_unet(unet_from_unet2d(UNet2d(depth=2).state_dict())).info.card()
    assert "depth 2, base width 4, same padding, none norm, bilinear up-sampling, " in card
    assert "one ReLU per block" in card
    plain = wrap_unet(UNet()).info.card()
    assert "bilinear" not in plain and "ReLU" not in plain


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize(("h", "w", "tile"), [(70, 90, 32), (61, 47, 40), (130, 33, None)])
def test_a_unet2d_network_tiles_seamlessly(depth, h, w, tile):
    """Bilinear up-sampling is shift-equivariant on the tile grid: tiles add up to one
    pass over the mirrored image (the halo itself: test_shapes' structural check)."""
    import numpy as np

    from conftest import one_pass
    from napari_unet.core.tiling import predict
    from napari_unet.model.info import wrap_unet

    torch.manual_seed(depth)
    model = wrap_unet(unet_from_unet2d(UNet2d(cout=2, depth=depth).state_dict()))
    image = np.random.default_rng(h).random((h, w), dtype=np.float32) * 100
    tiled = predict(image, model, tile=tile, device="cpu")
    np.testing.assert_allclose(tiled, one_pass(image[None], model), atol=1e-5)
