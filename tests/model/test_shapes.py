import pytest
import torch

from napari_unet.model import UNet, UNetConfig
from napari_unet.model.receptive import structural_halo
from napari_unet.model.shapes import unet_geometry


def test_paper_geometry_572_to_388():
    g = unet_geometry(4, "valid")
    assert g.output_size(572) == 388
    assert g.halo == 92
    assert g.multiple == 16
    net = UNet(UNetConfig(depth=4, base_width=2, padding="valid"))
    with torch.inference_mode():
        assert net(torch.zeros(1, 1, 572, 572)).shape == (1, 2, 388, 388)


def test_valid_sizes_near_requested():
    g = unet_geometry(4, "valid")
    assert g.valid_sizes_near(572) == (572, 572)
    assert g.valid_sizes_near(580) == (572, 588)
    assert g.snap(580, "nearest") == 572
    assert g.snap(581, "nearest") == 588
    assert g.input_for_output(388) == 572
    with pytest.raises(ValueError, match="nearest accepted: 572 or 588"):
        g.output_size(573)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_every_accepted_size_runs_and_matches_geometry(depth, padding):
    net = UNet(UNetConfig(depth=depth, base_width=2, padding=padding)).eval()
    g = net.geometry
    sizes = [g.min_input, g.min_input + g.multiple, g.min_input + 3 * g.multiple]
    for h in sizes:
        for w in sizes[:2]:
            with torch.inference_mode():
                y = net(torch.zeros(1, 1, h, w))
            assert y.shape[-2:] == (g.output_size(h), g.output_size(w))
    # one below the minimum and an off-grid size are refused by the arithmetic
    assert not g.accepts(g.min_input - g.multiple)
    assert not g.accepts(g.min_input + 1)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_same_padding_halo_equals_structural_receptive_field(depth):
    config = UNetConfig(depth=depth, padding="same")
    assert unet_geometry(depth, "same").halo == structural_halo(config)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_bilinear_halo_equals_structural_receptive_field(depth):
    config = UNetConfig(depth=depth, padding="same", upsample="bilinear", relu="last")
    assert UNet(config).geometry.halo == structural_halo(config)
    assert UNet(config).geometry.halo > unet_geometry(depth, "same").halo


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_valid_halo_is_half_the_trimmed_border(depth):
    g = unet_geometry(depth, "valid")
    assert 2 * g.halo == g.shrink
    # the valid network never looks further than the tile it is given, but its
    # receptive field (all pooling phases) is at least the halo
    assert structural_halo(UNetConfig(depth=depth, padding="valid")) >= g.halo
