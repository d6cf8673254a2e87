"""Segmentation at the model's object size (SegmentOptions.diameter)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model
from napari_unet.core import segment as seg
from napari_unet.core.metrics import object_scores
from napari_unet.core.resize import ResizedView, resize_image
from napari_unet.core.segment import SegmentOptions, median_diameter, segment, segment_iter
from napari_unet.core.tiling import run_to_end


class _Bright(torch.nn.Module):
    """Interior where the normalised input is bright, background elsewhere."""

    def forward(self, x):
        fg = (x[:, :1] - 0.5) * 20
        return torch.cat([-fg, fg, torch.full_like(fg, -10.0)], 1)


def bright_model(object_diameter=20.0):
    model = tiny_model("same", object_diameter=object_diameter)
    model.info.instances = {"method": "watershed", "seed": 1, "boundary": 2}
    model.net = _Bright()
    return model


def disks(shape=(96, 128), radii=(5, 5, 5, 5), seed=0):
    """Separate bright disks on a dim noisy background, and their labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    centres = [(24, 24), (24, 84), (70, 40), (70, 100)]
    for i, (r, (cy, cx)) in enumerate(zip(radii, centres), 1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    image = (labels > 0) * 1000.0 + 100 + rng.normal(0, 10, shape)
    return image.astype(np.float32), labels


def run(image, model, **kw):
    return run_to_end(segment_iter(image, model, SegmentOptions(device="cpu", **kw)))


@pytest.fixture
def seen(monkeypatch):
    """The (Y, X) sizes of the images the network is run on."""
    shapes = []
    inner = seg.predict_iter

    def spy(image, model, **kw):
        shapes.append(tuple(np.shape(image)[-2:]))
        return (yield from inner(image, model, **kw))

    monkeypatch.setattr(seg, "predict_iter", spy)
    return shapes


def test_median_diameter_of_disks():
    _, labels = disks(radii=(4, 8, 8, 12))
    d = median_diameter(labels)
    assert 15 < d < 17.5  # two disks of radius 8
    stack = np.stack([labels, np.zeros_like(labels)])
    assert median_diameter(stack) == pytest.approx(d)
    assert median_diameter(np.zeros((20, 20), np.int32)) is None


def test_diameter_rescales_the_image_to_the_model_object_size(seen):
    image, labels = disks()
    inst = run(image, bright_model(20.0), diameter=10)
    assert seen == [(192, 256)]  # twice the image: objects of 10 px -> 20 px
    assert inst.shape == image.shape and inst.dtype.kind == "i"
    s = object_scores(labels, inst)
    assert s["tp"] == 4 and s["fp"] == 0
    assert s["sum_matched_iou"] / 4 > 0.8


def test_auto_diameter_estimates_the_size_then_rescales(seen):
    image, labels = disks()
    inst = run(image, bright_model(20.0), diameter="auto")
    assert seen[0] == (96, 128) and len(seen) == 2
    # disks of radius 5 (81 px, 10.2 px equivalent diameter): about twice the size
    assert seen[1] == pytest.approx((2 * 96, 2 * 128), rel=0.03)
    assert object_scores(labels, inst)["tp"] == 4


def test_auto_diameter_keeps_the_first_pass_when_sizes_agree(seen):
    image, labels = disks(radii=(10, 10, 10, 10))
    inst = run(image, bright_model(20.0), diameter="auto")
    assert seen == [(96, 128)]
    assert object_scores(labels, inst)["tp"] == 4


def test_auto_diameter_without_objects_stays_at_the_image_scale(seen):
    image = np.full((64, 64), 100.0, np.float32)
    inst = run(image, bright_model(20.0), diameter="auto")
    assert seen == [(64, 64)] and inst.shape == (64, 64)


def test_the_object_size_used_is_said_and_recorded():
    def sizing(image, diameter):
        said = []
        options = SegmentOptions(device="cpu", diameter=diameter)
        run_to_end(segment_iter(image, bright_model(20.0), options), said.append)
        [sized] = [p for p in said if p.detail]
        return sized.message, sized.detail

    image, _ = disks()
    message, detail = sizing(image, "auto")
    assert detail["object_diameter"] == pytest.approx(10.2, abs=0.2)  # radius 5: 81 px
    assert detail["resized_by"] == pytest.approx(20.0 / detail["object_diameter"], rel=1e-9)
    assert message.startswith(f"objects measured at {detail['object_diameter']:.1f} px")
    assert message.endswith(f"image resized by {detail['resized_by']:.3g}")
    # the diameter recorded, given again, reproduces the run (a rounded one did not)
    again = SegmentOptions(device="cpu", diameter=detail["object_diameter"])
    assert (
        run_to_end(seg.scale_factor_iter(image, bright_model(20.0), again))[0]
        == (detail["resized_by"])
    )
    message, detail = sizing(image, 10)
    assert detail == {"object_diameter": 10.0, "resized_by": 2.0}
    assert message == "objects given at 10.0 px, model's 20.0 px: image resized by 2"
    message, detail = sizing(image, 20.5)  # within the tolerance: segmented as it is
    assert detail == {"object_diameter": 20.5, "resized_by": 1.0}
    assert message.endswith("image not resized")
    message, detail = sizing(np.full((64, 64), 100.0, np.float32), "auto")
    assert detail == {"object_diameter": None, "resized_by": 1.0}
    assert message.startswith("no objects found to measure their size")


def test_diameter_equal_to_the_model_size_changes_nothing(seen):
    image, _ = disks()
    model = tiny_model("same", object_diameter=16.0)
    plain = run(image, model, mode="probabilities")
    same = run(image, model, mode="probabilities", diameter=16.0)
    np.testing.assert_array_equal(plain, same)
    assert seen == [(96, 128), (96, 128)]


@pytest.mark.parametrize("mode", ["probabilities", "labels", "instances"])
def test_rescaled_results_have_the_image_shape(mode):
    image, _ = disks()
    stack = np.stack([image, image[::-1]])
    out = run(stack, bright_model(20.0), mode=mode, axes="ZYX", diameter=13)
    lead = (3,) if mode == "probabilities" else ()
    assert out.shape == (*lead, 2, 96, 128)
    region = run(stack, bright_model(20.0), mode=mode, axes="ZYX", diameter=13,
                 region=(10, 50, 20, 90))  # fmt: skip
    assert region.shape == (*lead, 2, 40, 70)


@pytest.mark.parametrize("diameter", [13, 31])
@pytest.mark.parametrize("mode", ["probabilities", "labels"])
def test_a_rescaled_region_equals_the_same_pixels_of_the_whole_image(mode, diameter):
    image = (np.random.default_rng(8).random((2, 150, 170)) * 1000).astype(np.uint16)
    model = tiny_model("same", object_diameter=20.0)
    whole = run(image, model, mode=mode, axes="ZYX", diameter=diameter)
    for region in [(0, 150, 0, 170), (103, 150, 7, 61), (1, 2, 168, 170), (40, 97, 55, 140)]:
        y0, y1, x0, x1 = region
        part = run(image, model, mode=mode, axes="ZYX", diameter=diameter, region=region)
        np.testing.assert_allclose(part, whole[..., y0:y1, x0:x1], atol=1e-5)


class _Reads:
    """An image that records the pixels each read asks for (as a zarr array would load)."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.read = array, array.shape, array.dtype, []

    def __getitem__(self, index):
        block = self.array[index]
        self.read.append(block.size)
        return block


def test_a_rescaled_region_reads_its_neighbourhood_not_the_whole_image():
    """Each region of a rescaled image resized the whole image (or stack) first: a
    32 x 32 region of a 1536^2 image at diameter 5 made a 6144^2 float32 copy."""
    image = (np.random.default_rng(3).random((2, 600, 700)) * 1000).astype(np.uint16)
    model = tiny_model("same", object_diameter=20.0)
    whole = run(image, model, mode="probabilities", axes="ZYX", diameter=13)
    lazy = _Reads(image)
    part = run(lazy, model, mode="probabilities", axes="ZYX", diameter=13,
               region=(300, 332, 400, 432))  # fmt: skip
    np.testing.assert_allclose(part, whole[..., 300:332, 400:432], atol=1e-5)
    # the normalisation's sample reads each plane whole once (< 1M px); tiles a little
    assert max(lazy.read) == 600 * 700
    assert sum(lazy.read) < 2 * image.size


@pytest.mark.parametrize("factor", [0.3, 0.65, 1.54, 2.7])
def test_a_resized_view_equals_the_resized_image_wherever_it_is_read(factor):
    image = (np.random.default_rng(4).random((2, 40, 3, 37)) * 1000).astype(np.uint16)
    whole = resize_image(image, "ZYCX", factor)
    view = ResizedView(image, "ZYCX", factor)
    assert view.shape == whole.shape and view.dtype == whole.dtype
    h, w = whole.shape[1], whole.shape[3]
    for index in [(slice(None),) * 4, (1, slice(2, 9), 0, slice(0, w)),
                  (-1, slice(h - 3, h), slice(None), slice(w // 2, w // 2 + 1)),
                  (0, slice(5, 5), 1, slice(None))]:  # fmt: skip
        np.testing.assert_allclose(view[index], whole[index], rtol=1e-6, atol=1e-3)
    with pytest.raises(IndexError, match="unit-step"):
        view[0, ::2, 0, :]


@pytest.mark.parametrize("mode", ["probabilities", "instances"])
def test_auto_measures_a_regions_plane_so_the_region_equals_the_whole_result(mode, seen):
    """The size measured on the region alone (fewer objects, cut by its edges) set
    another scale: zooming in changed the answer for the same pixels."""
    image, _ = disks(radii=(5, 5, 10, 10))
    model = bright_model(20.0)
    whole = run(image, model, mode=mode, diameter="auto")
    seen.clear()
    part = run(image, model, mode=mode, diameter="auto", region=(0, 40, 0, 128))
    assert seen[0] == (96, 128)  # the first pass measured the whole plane
    if mode == "probabilities":
        np.testing.assert_allclose(part, whole[:, 0:40], atol=1e-5)
    else:  # the same objects (numbered on their own)
        same = [(a, b) for a, b in zip(part.ravel(), whole[0:40].ravel())]
        assert len(set(same)) == len({a for a, _ in same}) == len({b for _, b in same})


def test_auto_measures_around_a_region_of_a_large_plane(monkeypatch):
    monkeypatch.setattr(seg, "MEASURE_AREA", 64 * 64)

    def measured(region):
        return seg._measured_region((300, 500), region)

    assert measured(None) is None
    assert measured((100, 110, 200, 220)) == (80, 144, 176, 240)  # 64 x 64 around it
    # on a grid of 16 px: panning by a few pixels keeps the window (and so the scale)
    assert measured((103, 113, 197, 217)) == (80, 144, 176, 240)
    assert measured((0, 10, 480, 500)) == (0, 64, 436, 500)  # kept inside the plane
    assert measured((0, 200, 0, 30)) == (0, 200, 0, 64)  # at least the region
    for y0 in range(0, 250, 7):  # the window always holds the region
        wy0, wy1, _, _ = measured((y0, y0 + 50, 0, 10))
        assert wy0 <= y0 and y0 + 50 <= wy1 and wy1 - wy0 == 64
    # objects a window cuts inside the image are not measured (they look smaller)
    labels = np.zeros((2, 64, 64), np.int32)
    labels[:, 0:5, 10:20] = 1  # cut by the window's top side (inside the image)
    labels[:, 20:30, 20:30] = 2  # whole
    labels[:, 20:30, 54:64] = 3  # at the plane's right edge: whole
    whole = seg._whole_objects(labels, (80, 144, 436, 500), (300, 500))
    assert set(np.unique(whole)) == {0, 2, 3}


def test_a_thin_image_keeps_a_pixel_when_shrunk():
    image = (np.random.default_rng(9).random((1, 200)) * 1000).astype(np.uint16)
    out = run(image, tiny_model("same", object_diameter=10.0), mode="labels", diameter=40)
    assert out.shape == (1, 200)


def test_min_size_counts_pixels_of_the_image_not_of_the_rescaled_one():
    image, labels = disks(radii=(3, 3, 6, 6))  # areas about 29 and 113 px
    inst = run(image, bright_model(24.0), diameter=8, min_size=60)
    found = {int(labels[inst == i].max()) for i in np.unique(inst) if i}
    assert found == {3, 4}


def test_min_size_is_exact_in_the_image_pixels_when_rescaled():
    """Rounded into the rescaled image's pixels, min_size 30 kept a 29 px object."""
    image, _ = disks(radii=(3, 4, 5, 6))
    model = bright_model(24.0)
    every = run(image, model, diameter=8)
    areas = sorted(np.bincount(every.ravel())[1:].tolist())
    assert len(areas) == 4
    for limit in sorted(set(areas)):  # an object's own area keeps it, one pixel more drops it
        for least in (limit, limit + 1):
            kept = run(image, model, diameter=8, min_size=least)
            assert sorted(np.bincount(kept.ravel())[1:].tolist()) == [
                a for a in areas if a >= least
            ]


def test_diameter_needs_a_model_that_records_its_object_size():
    image, _ = disks()
    with pytest.raises(ValueError, match="records no object diameter"):
        run(image, tiny_model("same"), diameter=10)
    with pytest.raises(ValueError, match="number of pixels or 'auto'"):
        run(image, bright_model(), diameter="big")
    with pytest.raises(ValueError, match="positive"):
        run(image, bright_model(), diameter=-3)
    with pytest.raises(ValueError, match="positive number"):  # inf: a division by zero
        run(image, bright_model(), diameter=float("inf"))
    with pytest.raises(ValueError, match="dtype complex64"):
        run(image.astype(np.complex64), bright_model(), diameter=10)


def test_a_diameter_beyond_the_rescaling_limit_warns(seen):
    image, _ = disks()
    with pytest.warns(UserWarning, match=r"resized by 4 \(the limit\)"):
        run(image, bright_model(20.0), diameter=2)  # would need 10x
    assert seen == [(4 * 96, 4 * 128)]


def test_median_diameter_counts_each_plane_of_a_stack():
    """Labels unique across planes (as instances are) or repeated in each: the same."""
    _, labels = disks(radii=(4, 8, 8, 12))
    offset = np.stack([labels, np.where(labels > 0, labels + 1000, 0)])
    repeated = np.stack([labels, labels])
    assert median_diameter(offset) == pytest.approx(median_diameter(labels))
    assert median_diameter(repeated) == pytest.approx(median_diameter(labels))


def test_rescaling_keeps_the_axes_of_a_thin_image(seen):
    """The shrunk image is not re-read: a thin (2, 200, 10) stack must stay ZYX."""
    image = np.random.default_rng(0).random((2, 200, 10)).astype(np.float32)
    out = run(image, bright_model(20.0), diameter=50, mode="probabilities")  # 10 -> 4 px wide
    assert out.shape == (3, 2, 200, 10)


def test_segment_in_one_call_is_the_generator_run_to_its_end():
    from napari_unet.core import synthetic
    from napari_unet.core.segment import segment

    image, _ = synthetic.nuclei((64, 64), n=6, seed=1)
    model = tiny_model("same")
    expected = run_to_end(segment_iter(image, model, SegmentOptions(device="cpu")))
    np.testing.assert_array_equal(segment(image, model, device="cpu"), expected)
    labels = segment(image, model, SegmentOptions(mode="labels", device="cpu"))
    assert labels.shape == image.shape and labels.max() <= 2
    with pytest.raises(TypeError, match="not both"):
        segment(image, model, SegmentOptions(), mode="labels")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": float("nan")}, "threshold must be from 0 to 1"),
        ({"threshold": 2.0}, "threshold must be from 0 to 1"),
        ({"min_confidence": 5.0}, "min_confidence must be from 0 to 1"),
        ({"min_size": -1}, "min_size must be at least 0"),
        ({"tile": 0}, "tile must be at least 1"),
        ({"batch_size": 2.5}, "batch_size must be a whole number"),
        ({"mode": "masks"}, "mode must be one of"),
    ],
)
def test_segment_options_refuse_values_that_would_answer_nothing(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SegmentOptions(**kwargs)


def test_a_nested_list_and_a_y_x_1_array_segment_as_the_2d_image():
    model = tiny_model("same")
    image = np.random.default_rng(2).random((40, 48)).astype(np.float32)
    ref = segment(image, model, mode="labels")
    np.testing.assert_array_equal(segment(image.tolist(), model, mode="labels"), ref)
    np.testing.assert_array_equal(segment(image[..., None], model, mode="labels"), ref)


def test_a_blank_image_is_said(recwarn):
    """An all-zero image gave an empty result and not a word (found by a GUI tester)."""
    model = tiny_model("same", depth=2)
    with pytest.warns(UserWarning, match=r"blank plane \(every pixel read is 0\)"):
        segment(np.zeros((40, 40), np.uint16), model, device="cpu")
    recwarn.clear()
    segment(np.random.default_rng(0).random((40, 40)), model, device="cpu")
    # nor where the plane is too large to read whole: its sample can miss the few bright
    # objects of a dark plane (a 3000 x 3000 one was said blank; found by review)
    sparse = np.zeros((1100, 1000), np.uint16)
    sparse[500:520, 20:40] = 1000
    segment(sparse, model, device="cpu")
    assert not [w for w in recwarn if "blank" in str(w.message)]


def test_the_run_record_holds_the_settings_as_they_took_effect():
    """It said ``min_confidence: None`` (not the model recipe's 0.7 that was used) and
    ``amp: True`` on a CPU, which never uses mixed precision."""
    recipe = {"method": "watershed", "seed": 1, "boundary": 2, "min_confidence": 0.7}
    model = tiny_model("same", instances=recipe)
    record = seg.run_record(model, SegmentOptions(device="cpu"))
    assert record["device"] == "cpu" and record["amp"] is False
    assert record["min_confidence"] == 0.7
    assert record["instance_recipe"] == recipe
    given = seg.run_record(model, SegmentOptions(device="cpu", min_confidence=0.2))
    assert given["min_confidence"] == 0.2 and given["instance_recipe"]["min_confidence"] == 0.2
    assert recipe["min_confidence"] == 0.7  # the model's own recipe is left as it was
    labels = seg.run_record(model, SegmentOptions(device="cpu", mode="labels"))
    assert "instance_recipe" not in labels


def test_lazy_gray_is_one_cheap_step_whatever_the_stack_and_gives_the_luminance():
    """The segment panel describes an RGB layer (its lazy gray) at every change of the
    view: dask's astype, product and sum built tasks per block and step, 0.33 s for a
    200 x 8192^2 RGB stack. One blockwise step over the read costs the same for any size."""
    import dask.array as da

    weights = np.array([0.299, 0.587, 0.114], np.float32)
    rgba = np.random.default_rng(0).integers(0, 255, (3, 600, 700, 4), np.uint8)
    for data in (rgba, rgba[..., :3], da.from_array(rgba[..., :3], chunks=(1, 256, 256, 1))):
        gray = seg.lazy_gray(data)
        assert gray.dtype == np.float32 and gray.shape == (3, 600, 700)
        expected = (rgba[..., :3].astype(np.float32) * weights).sum(axis=-1)
        np.testing.assert_array_equal(np.asarray(gray[1, 100:, 50:650]), expected[1, 100:, 50:650])
    huge = np.broadcast_to(np.zeros((1, 1, 1, 1), np.uint8), (200, 8192, 8192, 3))  # 40 GB
    gray = seg.lazy_gray(huge)
    assert gray.numblocks == (200, 16, 16)
    # the read and one conversion, no task per block (200 x 16 x 16) built: only dask's
    # one-key layer that holds the array is materialized
    layers = gray.dask.layers.values()
    assert len(layers) <= 3
    assert all(len(layer) == 1 for layer in layers if layer.is_materialized())
