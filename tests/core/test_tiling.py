import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import one_pass, tiny_model
from napari_unet.core import normalize as norm
from napari_unet.core.tile_plan import plan_tiles, reflect_index, tiling_geometry
from napari_unet.core.tiling import predict, predict_iter


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    padding=st.sampled_from(["valid", "same"]),
    depth=st.integers(1, 3),
    h=st.integers(1, 150),
    w=st.integers(1, 150),
    tile=st.one_of(st.none(), st.integers(1, 200)),
    batch=st.integers(1, 4),
)
def test_tiled_equals_one_pass_for_any_size_and_tile(padding, depth, h, w, tile, batch):
    model = tiny_model(padding, depth)
    image = np.random.default_rng(h * 1000 + w).random((h, w), dtype=np.float32) * 100
    tiled = predict(image, model, tile=tile, batch_size=batch, device="cpu")
    assert tiled.shape == (3, h, w)
    np.testing.assert_allclose(tiled, one_pass(image[None], model), atol=1e-5)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_tta_is_the_mean_over_mirrored_images(padding):
    model = tiny_model(padding, 2)
    image = np.random.default_rng(5).random((70, 90), dtype=np.float32) * 100
    tta = predict(image, model, tile=48, device="cpu", tta=True)
    np.testing.assert_allclose(tta, one_pass(image[None], model, tta=True), atol=1e-5)
    assert np.abs(tta - predict(image, model, device="cpu")).max() > 1e-3  # it does differ


def test_tta_of_a_real_network_keeps_the_pooling_grid_of_its_tiles():
    """The bundled network answers a shifted pooling grid by up to 0.14 (the tiny test
    networks by 5e-5): tiled TTA equals mirroring the padded input, at any tile size."""
    from napari_unet.io import load_model

    model = load_model("nuclei")
    image = np.random.default_rng(5).random((70, 90), dtype=np.float32) * 100
    reference = one_pass(image[None], model, tta=True)
    for tile in (96, 160):
        tta = predict(image, model, tile=tile, device="cpu", tta=True)
        np.testing.assert_allclose(tta, reference, atol=1e-5)


def test_the_context_is_the_halo_on_the_pooling_grid_where_a_fixed_input_has_room():
    same, valid = tiny_model("same", 2).info.geometry, tiny_model("valid", 2).info.geometry
    assert (same.halo, same.multiple) == (22, 4)
    assert tiling_geometry(same).halo == 24 and tiling_geometry(same, 52).halo == 24
    assert tiling_geometry(same, 48).halo == 22  # 48 - 2 * 24 leaves no output: exact
    assert tiling_geometry(tiling_geometry(same)) == tiling_geometry(same)
    assert tiling_geometry(valid) == valid  # valid padding reads its exact halo


def test_a_real_networks_tiles_equal_one_plain_pass_away_from_the_border():
    """Tiles read the context on the pooling grid (96 px for the bundled nuclei network,
    whose halo is 94): inside, the result is that of one plain pass over the whole image,
    as a notebook or a bioimage.io runner gives it. With 94 px the image sat 14 px off the
    grid, and this network answered by up to 0.3 at object edges (found by review)."""
    from napari_unet.io import load_model

    model = load_model("nuclei")
    assert model.info.geometry.halo == 94
    assert tiling_geometry(model.info.geometry).halo == 96
    yy, xx = np.mgrid[:320, :320]
    rng = np.random.default_rng(3)
    image = 100 + rng.normal(0, 5, (320, 320))
    for cy, cx in rng.uniform(20, 300, (40, 2)):  # nuclei-like blobs: edges everywhere
        image += 800 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 60.0)
    image = image.astype(np.float32)
    spec = norm.validate(model.info.normalization)
    stats = norm.plane_stats(
        norm.sample_plane(lambda ys, xs: image[None, ys, xs], (320, 320)), spec
    )
    with torch.inference_mode():
        x = torch.from_numpy(norm.apply(image[None], *stats)[None])
        plain = torch.softmax(model.net.float().eval()(x), 1)[0].numpy()
    inner = (slice(None), slice(96, 224), slice(96, 224))  # beyond the receptive field
    for tile in (None, 224, 288):
        tiled = predict(image, model, tile=tile, device="cpu")
        np.testing.assert_allclose(tiled[inner], plain[inner], atol=1e-4)


def test_many_tiles_are_used_and_cover_the_image(valid_model):
    g = valid_model.info.geometry
    plan = plan_tiles((300, 211), g, tile=g.min_input)
    assert plan.n_tiles > 4
    for axis, n in ((plan.y, 300), (plan.x, 211)):
        assert axis.origins[0] == 0
        assert all(o % g.multiple == 0 for o in axis.origins)
        assert axis.origins[-1] + axis.out >= n
        gaps = np.diff(axis.origins)
        assert (gaps <= axis.out).all()


def test_valid_tile_is_exactly_the_valid_centre():
    model = tiny_model("valid", depth=4)
    plan = plan_tiles((2000, 2000), model.info.geometry, tile=572)
    assert (plan.y.tile, plan.y.out, plan.crop) == (572, 388, 0)


def test_reflect_index_matches_numpy_pad():
    for n in (1, 2, 3, 7):
        base = np.arange(n)
        padded = np.pad(base, 25, mode="reflect" if n > 1 else "edge")
        np.testing.assert_array_equal(reflect_index(np.arange(-25, n + 25), n), padded)


@pytest.mark.parametrize("axes", ["CYX", "YXC"])
def test_channel_axes(axes):
    model = tiny_model("same", channels=2)
    rng = np.random.default_rng(1)
    cyx = rng.random((2, 40, 33), dtype=np.float32)
    image = cyx if axes == "CYX" else np.moveaxis(cyx, 0, -1)
    out = predict(image, model, axes=axes)
    np.testing.assert_allclose(out, one_pass(cyx, model), atol=1e-5)
    # guessed from the shape too
    np.testing.assert_allclose(predict(image, model), out, atol=0)


def test_leading_axes_are_processed_plane_by_plane(valid_model):
    rng = np.random.default_rng(2)
    stack = rng.integers(0, 4000, (2, 3, 30, 41)).astype(np.uint16)
    out = predict(stack, valid_model, axes="TZYX", tile=60, batch_size=5)
    assert out.shape == (3, 2, 3, 30, 41)
    for t in range(2):
        for z in range(3):
            ref = one_pass(stack[t, z][None].astype(np.float32), valid_model)
            np.testing.assert_allclose(out[:, t, z], ref, atol=1e-5)


def test_dask_and_zarr_inputs_and_zarr_output(tmp_path, same_model):
    rng = np.random.default_rng(3)
    image = rng.random((3, 70, 90), dtype=np.float32)
    ref = predict(image, same_model, tile=48)
    lazy = da.from_array(image, chunks=(1, 32, 32))
    np.testing.assert_allclose(predict(lazy, same_model, tile=48), ref, atol=1e-6)
    z = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=image.shape, dtype="f4")
    z[:] = image
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=ref.shape, dtype="f4")
    result = predict(z, same_model, tile=48, out=out)
    assert result is out
    np.testing.assert_allclose(out[:], ref, atol=1e-6)


class _CountingArray:
    """A lazy array (as dask or zarr are) that counts the pixels read and refuses to be
    read whole."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim
        self.read = 0

    def __getitem__(self, index):
        block = self.data[index]
        self.read += block.size
        return block

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole lazy image was read")


def test_a_lazy_image_is_read_tile_by_tile_not_whole(same_model):
    # the dtype check read a dask / zarr input whole before the first tile (32 GiB
    # refused), and the normalisation's strided sample decoded every chunk of a plane
    data = np.random.default_rng(6).random((2, 3000, 3000), dtype=np.float32)
    lazy = _CountingArray(data)
    part = predict(lazy, same_model, region=(1000, 1064, 2000, 2100))
    np.testing.assert_allclose(part, predict(data, same_model, region=(1000, 1064, 2000, 2100)))
    assert lazy.read < 2 * (1 << 20) + 2 * 500 * 500  # two planes' samples and tiles
    # in memory or lazy, the statistics come from the same pixels: whole result equals
    np.testing.assert_allclose(
        predict(_CountingArray(data[:, :1100, :40]), same_model),
        predict(data[:, :1100, :40], same_model),
    )


def test_labels_output_is_argmax(same_model):
    image = np.random.default_rng(4).random((50, 50), dtype=np.float32)
    probs = predict(image, same_model)
    labels = predict(image, same_model, output="labels", tile=40)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, probs.argmax(0))


def test_region_uses_real_context(same_model):
    image = np.random.default_rng(5).random((120, 130), dtype=np.float32)
    full = predict(image, same_model)
    part = predict(image, same_model, region=(40, 80, 30, 100))
    assert part.shape == (3, 40, 70)
    # far enough from the image border, a region equals the same pixels of the full image
    np.testing.assert_allclose(part, full[:, 40:80, 30:100], atol=1e-5)


def test_progress_and_cancel(valid_model):
    image = np.zeros((200, 200), np.float32)
    gen = predict_iter(image, valid_model, tile=valid_model.info.geometry.min_input, batch_size=1)
    first = next(gen)
    assert first.done == 0 and first.total > 3
    second = next(gen)
    assert second.done == 1 and second.message == f"tile 1/{first.total}"
    gen.close()  # cancel between batches
    with pytest.raises(StopIteration):
        next(gen)


def test_progress_reaches_total(valid_model):
    seen = []
    predict(np.ones((90, 90)), valid_model, tile=60, callback=seen.append)
    assert seen[-1].done == seen[-1].total == len(seen) - 1


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((0, 10)), "empty"),
        (np.zeros(10), "at least 2 dimensions"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"),
        (np.zeros((8, 8), bool), "booleans"),
        (np.zeros((8, 8), complex), "dtype complex128"),
        (np.zeros((30, 30, 3)), "RGB"),
        (np.zeros((30, 30, 2)), "alpha channel"),
    ],
)
def test_bad_images_give_clear_errors(image, message, valid_model):
    with pytest.raises(ValueError, match=message):
        predict(image, valid_model)


def test_tiny_and_constant_images(valid_model):
    out = predict(np.full((1, 1), 7, np.uint8), valid_model)
    assert out.shape == (3, 1, 1)
    np.testing.assert_allclose(out.sum(0), 1, atol=1e-6)
    flat = predict(np.zeros((17, 5), np.uint16), valid_model)
    assert np.isfinite(flat).all()


def test_wrong_output_shape_and_bad_region(valid_model):
    image = np.zeros((20, 20), np.float32)
    with pytest.raises(ValueError, match="expected"):
        predict(image, valid_model, out=np.zeros((3, 20, 21), np.float32))
    with pytest.raises(ValueError, match="outside the image"):
        predict(image, valid_model, region=(0, 30, 0, 10))
    for bad in (
        (0.5, 10, 0, 10),
        (0, 10, 0),
        ("0", 10, 0, 10),
        (True, 10, 0, 10),
        5,
        (0, float("inf"), 0, 10),
    ):
        with pytest.raises(ValueError, match="four whole pixel numbers"):
            predict(image, valid_model, region=bad)
    whole = predict(image, valid_model, region=(np.int64(2), 12.0, 0, 10))  # whole numbers
    np.testing.assert_array_equal(whole, predict(image, valid_model, region=(2, 12, 0, 10)))


@pytest.mark.parametrize(
    "message",
    [
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 8589934592 bytes. Error code 12",
    ],
)
def test_out_of_memory_retries_with_smaller_batches_and_tiles(message, valid_model):
    import torch

    calls = []
    net = valid_model.net

    class Flaky(torch.nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            if x.shape[0] > 1 or x.shape[-1] > 100:
                raise RuntimeError(message)
            return net(x)

    flaky = valid_model.with_info()
    flaky.net = Flaky()
    image = np.random.default_rng(6).random((150, 150), dtype=np.float32)
    out = predict(image, flaky, tile=180, batch_size=4)
    np.testing.assert_allclose(out, one_pass(image[None], valid_model), atol=1e-5)
    assert calls[0][0] == 4 and calls[-1][0] == 1 and calls[-1][-1] <= 100


def test_integer_output_array_for_probabilities_is_refused(same_model):
    from napari_unet.core.tiling import predict

    image = np.random.default_rng(0).random((40, 40), dtype=np.float32)
    with pytest.raises(ValueError, match="dtype uint8; probabilities need a float array"):
        predict(image, same_model, out=np.zeros((3, 40, 40), np.uint8))


def test_group_norm_networks_warn_when_tiled():
    """Group norm normalises each tile on its own: tiled and whole results differ (by up
    to 0.55 in a review), which the user heard nothing of."""
    import warnings

    import torch

    from napari_unet.model import UNet, UNetConfig
    from napari_unet.model.info import wrap_unet

    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=1, num_classes=2, depth=2, base_width=8, norm="group"))
    model = wrap_unet(net.eval(), name="grouped")
    image = np.random.default_rng(0).random((100, 100)).astype(np.float32)
    with pytest.warns(UserWarning, match="grouped normalises each tile on its own"):
        tiled = predict(image, model, tile=48, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one tile: nothing to warn of
        whole = predict(image, model, tile=400, device="cpu")
        predict(image, tiny_model("valid"), tile=48, device="cpu")  # batch norm: seamless
    assert np.abs(tiled - whole).max() > 1e-3  # what the warning is about


def test_an_answer_of_the_wrong_shape_or_nan_is_refused():
    """A package's network returning 2 channels where it declared 1 failed with a numpy
    broadcast error; 2 px less than declared wrote a result shifted by a pixel; NaN on
    bright pixels (finite on the random input checked at load) was written as the result."""
    import pytest
    import torch

    class Odd(torch.nn.Module):
        def __init__(self, answer):
            super().__init__()
            self.answer = answer

        def forward(self, x):
            return self.answer(x)

    image = np.zeros((40, 50), np.float32)
    image[10:20, 10:20] = 1000.0
    cases = {
        "shape": lambda x: torch.zeros((x.shape[0], 2, *x.shape[-2:])),
        "smaller": lambda x: torch.zeros((x.shape[0], 3, x.shape[-2] - 2, x.shape[-1] - 2)),
        "nan": lambda x: torch.where(x > 0.9, float("nan"), 0.0).expand(-1, 3, -1, -1),
    }
    for name, answer in cases.items():
        model = tiny_model("same")
        model.net = Odd(answer)
        match = "NaN or infinity" if name == "nan" else "a broken model file"
        with pytest.raises(ValueError, match=match):
            predict(image, model, device="cpu")


def test_a_result_larger_than_the_free_memory_is_refused_before_any_work(monkeypatch):
    """A lazy (100, 8192, 8192) stack's probabilities asked numpy for 75 GiB; less than
    the machine's memory would have been granted, then filled until it ran out."""
    from napari_unet.core import tiling

    model = tiny_model("same", 2)
    image = np.zeros((4, 64, 64), np.float32)
    need = 3 * 4 * 64 * 64 * 4  # three classes of float32
    monkeypatch.setattr(tiling, "available_ram", lambda: need)
    with pytest.raises(MemoryError, match=r"3 x 4 x 64 x 64\) would take 0.0 GiB") as err:
        predict(image, model, axes="ZYX")
    assert "write the result to a .zarr file" in str(err.value)
    monkeypatch.setattr(tiling, "available_ram", lambda: 2 * need)
    assert predict(image, model, axes="ZYX").shape == (3, 4, 64, 64)
    # an output array of the caller's (a zarr store, written tile by tile) is not held
    monkeypatch.setattr(tiling, "available_ram", lambda: 1)
    out = zarr.zeros((4, 64, 64), dtype=np.uint8)
    predict(image, model, axes="ZYX", output="labels", out=out)
    # where the free memory is not known (macOS, Windows), no guess refuses a result
    monkeypatch.setattr(tiling, "available_ram", lambda: None)
    assert predict(image, model, axes="ZYX").shape == (3, 4, 64, 64)
