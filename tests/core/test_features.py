import numpy as np
import pytest
import torch

from conftest import tiny_model
from napari_unet.core.features import capture, estimate_bytes, stage_grid
from napari_unet.core.tiling import predict
from napari_unet.model import UNet, UNetConfig
from napari_unet.model.info import wrap_unet


def _blob_net(padding: str, depth: int = 3) -> UNet:
    """Uniform positive kernels: every stage's response to a dot is centred on the dot."""
    net = UNet(UNetConfig(depth=depth, base_width=2, padding=padding, norm="none"))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.1)
    return net.eval()


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_every_stage_lands_on_the_pixels_it_came_from(padding):
    model = wrap_unet(_blob_net(padding), normalization={"mode": "none"})
    image = np.zeros((120, 130), np.float32)
    dot = (57, 71)
    image[dot] = 100.0
    maps = capture(image, model, region=(20, 100, 30, 110))
    assert list(maps) == model.net.stage_names
    for name, fm in maps.items():
        a = fm.data[0].astype(np.float64)
        a = a - a.min()
        assert a.sum() > 0, name
        jj, ii = np.meshgrid(np.arange(a.shape[0]), np.arange(a.shape[1]), indexing="ij")
        cy = fm.origin[0] + fm.scale * (a * jj).sum() / a.sum()
        cx = fm.origin[1] + fm.scale * (a * ii).sum() / a.sum()
        tol = fm.scale / 2 + 0.6
        assert abs(cy - dot[0]) <= tol and abs(cx - dot[1]) <= tol, (name, cy, cx)


def test_head_stage_equals_the_engines_logits_on_the_region():
    model = tiny_model("valid", depth=2)
    image = np.random.default_rng(0).random((90, 100), dtype=np.float32)
    maps = capture(image, model, ["head"], region=(10, 60, 20, 90))
    head = maps["head"]
    assert head.scale == 1 and head.origin == (10.0, 20.0)
    probs = torch.softmax(torch.from_numpy(head.data), 0).numpy()
    np.testing.assert_allclose(probs, predict(image, model)[:, 10:60, 20:90], atol=1e-5)


def test_a_stack_needs_one_plane_index_per_leading_axis():
    stack = np.random.default_rng(0).random((3, 30, 34), dtype=np.float32)
    model = tiny_model("same", depth=2)
    for plane in ((), (5,), (-1,), (0, 0)):
        with pytest.raises(ValueError, match=r"not a plane of this image.*axis Z within \(3,\)"):
            capture(stack, model, ["head"], axes="ZYX", plane=plane)
    head = capture(stack, model, ["head"], axes="ZYX", plane=(2,))["head"]
    np.testing.assert_allclose(head.data, capture(stack[2], model, ["head"])["head"].data)
    # the input checks of segmenting: a boolean mask is no image here either
    with pytest.raises(ValueError, match="booleans look like a mask"):
        capture(stack[0] > 0.5, model, ["head"])


def test_world_placement_uses_the_layer_scale_and_translate():
    model = tiny_model("same", depth=2)
    maps = capture(np.zeros((64, 64), np.float32), model, ["enc1"], region=(8, 40, 8, 40))
    scale, translate = maps["enc1"].world((0.5, 0.5), (100.0, 200.0))
    assert scale == (1.0, 1.0)
    assert translate == (100 + maps["enc1"].origin[0] * 0.5, 200 + maps["enc1"].origin[1] * 0.5)


def test_hooks_are_removed_after_100_calls_and_errors():
    model = tiny_model("same", depth=2)
    image = np.random.default_rng(1).random((40, 40), dtype=np.float32)
    for _ in range(100):
        capture(image, model, ["enc0", "head"], region=(0, 16, 0, 16))
    assert all(not m._forward_hooks for m in model.net.modules())
    with pytest.raises(ValueError, match="no stage"):
        capture(image, model, ["enc9"])
    with pytest.raises(ValueError, match="outside the image"):
        capture(image, model, ["enc0"], region=(0, 50, 0, 10))
    assert all(not m._forward_hooks for m in model.net.modules())


def test_top_channels_float16_and_memory_estimate():
    model = tiny_model("same", depth=2)
    image = np.random.default_rng(2).random((48, 48), dtype=np.float32)
    full = capture(image, model, ["enc1"])["enc1"]
    top = capture(image, model, ["enc1"], max_channels=3, dtype=np.float16)["enc1"]
    assert top.data.dtype == np.float16 and top.data.shape[0] == 3
    variances = full.data.reshape(full.data.shape[0], -1).var(axis=1)
    assert set(top.channels) == set(np.argsort(-variances)[:3])
    est = estimate_bytes(model, ["enc1"], (48, 48))
    assert est >= full.data.nbytes
    assert est * 3 / full.data.shape[0] == estimate_bytes(model, ["enc1"], (48, 48), 3)
    with pytest.raises(ValueError, match="max_channels must be a whole number from 1"):
        capture(image, model, ["enc1"], max_channels=-1)
    # a region's maps hold their own pixels: a view kept the stage's whole output over
    # the tile and its halo alive (613 MB where the estimate said 468)
    part = capture(image, model, ["enc0", "enc1"], region=(10, 20, 10, 30))
    for stage, fm in part.items():
        assert fm.data.flags.owndata
        assert fm.data.nbytes <= estimate_bytes(model, [stage], (10, 20))


def test_stage_grid_matches_the_paper_geometry():
    grid = stage_grid(UNetConfig(depth=4, padding="valid"))
    assert grid["head"] == (92.0, 1)
    assert grid["bottleneck"][1] == 16
    assert stage_grid(UNetConfig(depth=4, padding="same"))["head"] == (0.0, 1)


def test_networks_of_unknown_architecture_use_their_top_level_modules():
    """A plain nn.Module (e.g. a bioimage.io state-dict model): stages are its
    children, placed by their stride and centred, as for a same-padding U-Net."""
    from napari_unet.core.features import stage_names
    from napari_unet.model.info import LoadedModel

    unet = tiny_model("same", depth=2)

    class Plain(torch.nn.Module):  # the same layers without the UNet class
        def __init__(self, net):
            super().__init__()
            self.inner = net

        def forward(self, x):
            return self.inner(x)

    plain = Plain(unet.net)
    assert stage_names(plain) == ["inner"]
    image = np.random.default_rng(3).random((48, 48), dtype=np.float32)
    ref = capture(image, unet, ["head"])["head"]
    got = capture(image, LoadedModel(plain, unet.info), ["inner"])["inner"]
    np.testing.assert_allclose(got.data, ref.data, atol=1e-5)
    assert got.scale == ref.scale == 1.0 and got.origin == ref.origin


def test_torchscript_networks_get_a_clear_message():
    from napari_unet.model.info import LoadedModel

    model = tiny_model("same", depth=1)
    scripted = torch.jit.trace(model.net, torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="TorchScript"):
        capture(np.zeros((32, 32), np.float32), LoadedModel(scripted, model.info))


def test_a_shared_network_s_passes_from_other_threads_are_not_kept():
    # networks that are not napari-unet U-Nets are shared, not copied: a segmentation
    # running one meanwhile put its tiles' activations into the maps
    import threading

    from napari_unet.core.features import _keep

    conv, store = torch.nn.Conv2d(1, 2, 3), {}
    handle = conv.register_forward_hook(_keep(store, "conv"))
    other = threading.Thread(target=lambda: conv(torch.zeros(1, 1, 9, 9)))
    other.start()
    other.join()
    assert store == {}
    conv(torch.zeros(1, 1, 5, 5))
    assert store["conv"].shape == (1, 2, 3, 3)
    handle.remove()
