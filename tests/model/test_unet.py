import pytest
import torch

from napari_unet.model import UNet, UNetConfig


def test_paper_configuration_has_31m_parameters():
    net = UNet(UNetConfig(depth=4, base_width=64, padding="valid", norm="none"))
    assert sum(p.numel() for p in net.parameters()) == 31_030_658


def test_stages_are_named_and_addressable():
    net = UNet(UNetConfig(depth=3, base_width=4))
    assert net.stage_names == [
        "enc0",
        "enc1",
        "enc2",
        "bottleneck",
        "dec2",
        "dec1",
        "dec0",
        "head",
    ]
    for name in net.stage_names:
        assert isinstance(getattr(net, name), torch.nn.Module)
    assert [net.stage_scale(s) for s in net.stage_names] == [1, 2, 4, 8, 4, 2, 1, 1]
    with pytest.raises(KeyError, match="no stage 'enc7'"):
        net.stage_scale("enc7")


@pytest.mark.parametrize("norm", ["none", "batch", "group"])
def test_options_change_the_network(norm):
    net = UNet(
        UNetConfig(
            depth=2,
            base_width=8,
            norm=norm,
            dropout=0.1,
            in_channels=3,
            num_classes=5,
            padding="same",
        )
    )
    x = torch.rand(2, 3, 36, 20)
    assert net(x).shape == (2, 5, 36, 20)
    has_norm = any(
        isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in net.modules()
    )
    assert has_norm == (norm != "none")
    assert any(isinstance(m, torch.nn.Dropout2d) for m in net.modules())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"padding": "reflect"}, "padding must be one of"),
        ({"norm": "layer"}, "norm must be one of"),
        ({"depth": 0}, "depth must be an integer from 1 to 8"),
        ({"depth": "4"}, "depth must be an integer from 1 to 8"),
        ({"base_width": True}, "base_width must be an integer from 1 to 1024"),
        ({"base_width": 2**40}, "base_width must be an integer from 1 to 1024"),
        ({"dropout": "0.1"}, "dropout must be a number"),
        ({"dropout": 1.5}, "dropout must be in"),
    ],
)
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**kwargs)


def test_config_round_trip_and_unknown_keys():
    c = UNetConfig(depth=3, base_width=16, padding="same")
    assert UNetConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown U-Net configuration keys"):
        UNetConfig.from_dict({**c.to_dict(), "heads": 2})


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_for_inference_never_moves_or_changes_the_callers_unet(norm):
    from napari_unet.model.unet import for_inference

    net = UNet(UNetConfig(depth=2, base_width=4, padding="same", norm=norm)).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        ref = net(x)
    moved = for_inference(net, torch.device("meta"))  # as to a GPU: a copy goes there
    assert moved is not net and next(moved.parameters()).device.type == "meta"
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert all(p.is_contiguous() for p in net.parameters())  # layout unchanged
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    fast = for_inference(net, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), ref)


def test_bilinear_last_relu_options_change_the_network():
    base = UNet(UNetConfig(depth=2, base_width=4, padding="same", norm="none"))
    bilinear = UNet(
        UNetConfig(
            depth=2, base_width=4, padding="same", norm="none", upsample="bilinear", relu="last"
        )
    )
    assert isinstance(base.dec0.up, torch.nn.ConvTranspose2d)
    assert isinstance(bilinear.dec0.up[0], torch.nn.Upsample)
    relus = [m for m in bilinear.enc0 if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == 1 and bilinear.enc0[-1] is relus[0]
    x = torch.rand(1, 1, 32, 32)
    assert bilinear(x).shape == base(x).shape == (1, 2, 32, 32)
    with pytest.raises(ValueError, match="bilinear up-sampling needs padding 'same'"):
        UNetConfig(padding="valid", upsample="bilinear")
    with pytest.raises(ValueError, match="relu must be one of"):
        UNetConfig(relu="none")
