"""The annotate-and-retrain loop's core: painted planes, checks, the recipe, versions."""

import copy
import functools
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import tiny_model
from napari_unet.core import synthetic
from napari_unet.core.adaptation import adapt_norm
from napari_unet.core.finetune import painted_accuracy
from napari_unet.core.painted import PaintedPlane, check_annotations, painted_planes
from napari_unet.core.targets import instances_to_classes
from napari_unet.core.training import TrainConfig, normalized_plane, train, train_iter
from napari_unet.core.versions import ModelVersions

CLASSES = ["background", "interior", "boundary"]


@pytest.fixture(scope="module")
def case():
    image, labels = synthetic.nuclei((128, 128), n=16, seed=5)
    classes = instances_to_classes(labels)
    strokes = synthetic.strokes(classes, 150, seed=1)
    return image, classes, strokes


def test_simulated_strokes_stay_in_their_class(case):
    _, classes, strokes = case
    painted = strokes > 0
    assert np.array_equal(strokes[painted] - 1, classes[painted])
    counts = np.bincount(strokes[painted], minlength=4)[1:]
    assert (counts >= 150).all() and (counts < 400).all()
    wrong = np.zeros_like(classes, bool)
    wrong[:, :40] = True
    biased = synthetic.strokes(classes, 150, seed=1, prefer=wrong)
    assert (biased[:, :40] > 0).mean() > 2 * (biased[:, 40:] > 0).mean()


class _Stack:
    """A lazy stack (as zarr or dask): it counts the planes read, and refuses to be read
    whole."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim
        self.planes_read = set()

    def __getitem__(self, index):
        self.planes_read.add(index[0])
        return self.array[index]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole stack was read")


def test_painted_planes_of_a_lazy_stack_read_only_the_planes_they_use():
    """np.asarray of a 150-plane zarr for one painted plane read all of it (600 MB)."""
    stack = np.random.default_rng(0).random((40, 24, 24)).astype(np.float32)
    ann = np.zeros(stack.shape, np.uint8)
    ann[30, 5:9, 5:9], ann[30, 15:19, 15:19] = 1, 2
    lazy = _Stack(stack)
    planes, unpainted = painted_planes([(lazy, ann, "lazy")], in_channels=1)
    assert [p.source for p in planes] == ["lazy, plane 30"]
    np.testing.assert_array_equal(planes[0].image, stack[30])
    assert len(unpainted) == 16 and len(lazy.planes_read) == 17
    # the paint is the layer's as it was read: painting on while the run trains changes
    # nothing in it (the panel no longer copies the whole layer on the GUI thread)
    ann[30, 0:4, 0:4] = 2
    assert not planes[0].annotation[0:4, 0:4].any()
    two_d, _ = painted_planes([(stack[30], ann[30], "plane")], in_channels=1)
    ann[30, 20:24, 20:24] = 1
    assert not two_d[0].annotation[20:24, 20:24].any()


def test_painted_planes_of_a_stack_and_their_errors():
    stack = np.random.default_rng(0).random((4, 30, 40)).astype(np.float32)
    ann = np.zeros((4, 30, 40), np.uint8)
    ann[1, 2:5, 2:6] = 1
    ann[3, 10, 10] = 2
    planes, unpainted = painted_planes([(stack, ann, "st")], in_channels=1)
    assert [p.source for p in planes] == ["st, plane 1", "st, plane 3"]
    np.testing.assert_array_equal(planes[0].image, stack[1])
    np.testing.assert_array_equal(planes[1].annotation, ann[3])
    assert len(unpainted) == 2
    np.testing.assert_array_equal(unpainted[0], stack[0])
    # two-channel images: the annotation has the image's shape without C
    cyx = np.random.default_rng(1).random((2, 30, 40)).astype(np.float32)
    (p,), _ = painted_planes([(cyx, ann[1], "two")], in_channels=2)
    assert p.image.shape == (2, 30, 40)
    # dense instance masks: planes with objects become full background/interior/boundary
    inst = np.zeros((4, 30, 40), np.uint16)
    inst[2, 5:15, 5:15] = 7
    (q,), rest = painted_planes([(stack, inst, "gt", "instances")], in_channels=1)
    np.testing.assert_array_equal(q.annotation, instances_to_classes(inst[2]) + 1)
    assert q.source == "gt, plane 2" and len(rest) == 3
    # ... drawn as the base model draws them: here object cores inside a wide rim
    big = np.zeros((4, 30, 40), np.uint16)
    big[1, 4:24, 4:24] = 3
    (b,), _ = painted_planes([(stack, big, "gt", "instances")], in_channels=1)
    (c,), _ = painted_planes([(stack, big, "gt", "instances")], in_channels=1, convention=(1, 0.5))
    np.testing.assert_array_equal(c.annotation, instances_to_classes(big[1], 1, 0.5) + 1)
    assert (c.annotation == 2).sum() < (b.annotation == 2).sum() / 2  # a core, not 16 x 16
    with pytest.raises(ValueError, match="kind"):
        painted_planes([(stack, inst, "gt", "dense")], in_channels=1)
    with pytest.raises(ValueError, match="shape"):
        painted_planes([(stack, ann[:, :20], "st")], in_channels=1)
    with pytest.raises(ValueError, match="integer"):
        painted_planes([(stack, ann.astype(np.float32), "st")], in_channels=1)


def test_an_annotation_of_part_of_the_image_trains_that_part_only():
    """A 'Visible region only' or 'Current plane only' result, corrected, annotates the
    pixels it lies on; the rest of the image is not annotated (not background)."""
    stack = np.random.default_rng(0).random((5, 30, 40)).astype(np.float32)
    part = np.zeros((1, 12, 10), np.uint16)  # plane 3, rows 8-19, columns 25-34
    part[0, 2:9, 2:8] = 4
    (p,), unpainted = painted_planes(
        [(stack, part, "st", "instances", "ZYX", (3, 8, 25))], in_channels=1
    )
    assert p.source == "st, plane 3" and len(unpainted) == 4
    np.testing.assert_array_equal(p.image, stack[3])
    inside = p.annotation[8:20, 25:35]
    np.testing.assert_array_equal(inside, instances_to_classes(part[0]) + 1)
    assert (inside == 1).any()  # background within the box...
    outside = p.annotation.copy()
    outside[8:20, 25:35] = 0
    assert not outside.any()  # ...and not annotated beyond it
    # painted classes of a region of a 2D image, on an image with X before Y
    strokes = np.zeros((6, 4), np.uint8)  # (X, Y)
    strokes[0, 0], strokes[5, 3] = 1, 2
    (q,), _ = painted_planes([(stack[0].T, strokes, "xy", "sparse", "XY", (30, 20))], 1)
    assert q.annotation.shape == (30, 40)
    assert q.annotation[20, 30] == 1 and q.annotation[23, 35] == 2
    assert np.count_nonzero(q.annotation) == 2
    # an object cut by the box's side (the image goes on there) is not annotated: its
    # boundary and core depend on the part the box does not hold; one on the image's
    # own edge is annotated as the whole image's mask would have it
    inst = np.zeros((30, 40), np.uint16)
    inst[10:30, 10:30], inst[2:6, 2:6] = 1, 2  # 1 reaches the image's bottom edge
    (w,), _ = painted_planes([(stack[0], inst, "w", "instances", "YX")], 1)
    (b,), _ = painted_planes([(stack[0], inst[:20], "b", "instances", "YX", (0, 0))], 1)
    assert not b.annotation[10:20, 10:30].any()  # object 1, cut at row 19
    np.testing.assert_array_equal(b.annotation[:8, :8], w.annotation[:8, :8])  # object 2
    assert (b.annotation[:20] == 1).sum() == (w.annotation[:20] == 1).sum()  # background
    (e,), _ = painted_planes([(stack[0], inst[8:], "e", "instances", "YX", (8, 0))], 1)
    np.testing.assert_array_equal(e.annotation[8:], w.annotation[8:])
    # a box without objects is background (a result whose false positives were all
    # deleted); a whole-image mask without any is not annotated (nothing to train)
    (z,), _ = painted_planes([(stack[0], inst[:8, 32:], "z", "instances", "YX", (0, 32))], 1)
    assert (z.annotation[:8, 32:] == 1).all() and z.annotation.sum() == 8 * 8
    assert painted_planes([(stack[0], inst * 0, "w", "instances", "YX")], 1)[0] == []
    # a box that reaches beyond the image is refused, saying where it lies
    with pytest.raises(ValueError, match=r"shape \(1, 12, 10\) from pixel \(3, 8, 31\) on"):
        painted_planes([(stack, part, "st", "instances", "ZYX", (3, 8, 31))], in_channels=1)
    with pytest.raises(ValueError, match="shape"):
        painted_planes([(stack, part, "st", "instances", "ZYX", (-1, 0, 0))], in_channels=1)
    for offset in [(3, 8.5, 25), (8, 25)]:  # a fraction of a pixel, an axis missing
        with pytest.raises(ValueError, match="must give a whole pixel on each of the image's 3"):
            painted_planes([(stack, part, "st", "instances", "ZYX", offset)], in_channels=1)


@pytest.mark.parametrize(
    "paint, message",
    [
        ({}, "nothing is painted"),
        ({1: 5}, "only 'background' is painted"),
        ({1: 5, 4: 3}, "label 4 is painted on img but .* erase label 4, or"),
    ],
)
def test_annotations_that_cannot_train_are_refused(paint, message):
    planes = []
    if paint:
        a = np.zeros((20, 20), np.uint8)
        for value, n in paint.items():
            a.flat[np.flatnonzero(a == 0)[:n]] = value
        planes = [PaintedPlane(np.zeros((20, 20), np.float32), a, "img")]
    with pytest.raises(ValueError, match=message):
        check_annotations(planes, CLASSES)


def test_one_class_models_are_refused_with_a_message():
    a = np.ones((10, 10), np.uint8)
    with pytest.raises(ValueError, match="1 output class .*at least two"):
        check_annotations([PaintedPlane(a.astype(np.float32), a, "x")], ["membrane"])


def test_counts_per_class():
    a = np.zeros((10, 10), np.uint8)
    a[0, :3] = 1
    a[5, :4] = 3
    assert check_annotations([PaintedPlane(a.astype(np.float32), a, "x")], CLASSES) == {
        "background": 3,
        "boundary": 4,
    }


def test_adapt_norm_crops_a_large_plane_all_over(monkeypatch):
    """One crop of 512 x 512 px per plane: a single 2048 x 2048 plane gave the statistics
    of a 16th of it (found by review)."""
    from napari_unet.core import adaptation

    seen = []
    monkeypatch.setattr(adaptation, "_forward_crop", lambda net, plane, *a: seen.append(plane))
    model = tiny_model("same", depth=2)
    # (a copy: tiny_model's networks are shared between tests, and adapt_norm resets this
    # one's statistics and leaves it training, which made a later test's measured halo 28)
    net = copy.deepcopy(model.net)
    big, small = np.zeros((1, 2048, 2048), np.float32), np.zeros((1, 64, 64), np.float32)
    adapt_norm(net, [big], model, np.random.default_rng(0), torch.device("cpu"))
    assert len(seen) == 16
    seen.clear()
    adapt_norm(net, [small] * 3, model, np.random.default_rng(0), torch.device("cpu"))
    assert len(seen) == 3  # (a plane smaller than a crop: one)
    # a stack: every plane before a second crop of any (16 crops of one plane of eight)
    seen.clear()
    stack = [np.full((1, 2048, 2048), k, np.float32) for k in range(8)]
    adapt_norm(net, stack, model, np.random.default_rng(0), torch.device("cpu"))
    assert sorted(int(p[0, 0, 0]) for p in seen) == sorted(list(range(8)) * 2)


def test_adapt_norm_sets_statistics_of_the_new_images_and_keeps_weights():
    model = tiny_model("same", depth=2)
    net = __import__("copy").deepcopy(model.net)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k}
    image = (np.random.default_rng(2).random((64, 64)) * 3000 + 500).astype(np.uint16)
    plane = normalized_plane(model, image)
    adapt_norm(net, [plane], model, np.random.default_rng(0), torch.device("cpu"))
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = {}
    handle = bn.register_forward_pre_hook(lambda m, x: seen.setdefault("x", x[0]))
    net.eval()
    with torch.no_grad():
        net(torch.from_numpy(plane)[None])
    handle.remove()
    x = seen["x"]
    np.testing.assert_allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(bn.running_var, x.var((0, 2, 3), unbiased=True), rtol=1e-3)
    for k, v in net.state_dict().items():
        if k in weights and "num_batches" not in k:
            assert torch.equal(v, weights[k]), k
    assert bn.momentum == 0.1  # restored


def test_finetune_recipe_raises_painted_accuracy_and_leaves_base_alone(case):
    image, classes, strokes = case
    model = tiny_model("same", depth=2)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    plane = [PaintedPlane(image, strokes, "img")]
    acc0 = painted_accuracy(model, plane)
    steps = []
    cfg = TrainConfig.finetune(steps=60, lr=5e-3, patch_size=64, max_seconds=None, device="cpu")
    result = train(model, [image], [strokes], "sparse", cfg, callback=steps.append)
    acc1 = painted_accuracy(result, plane)
    assert acc1 > max(acc0 + 0.25, 0.6), (acc0, acc1)
    assert np.mean([s.loss for s in steps[-10:]]) < np.mean([s.loss for s in steps[:10]])
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert result.info.provenance["train_config"]["adapt_norm"] is True


def test_painted_accuracy_predicts_only_around_the_paint_and_agrees_with_the_plane(case):
    from napari_unet.core.tiling import predict

    image, _, strokes = case
    model = tiny_model("valid", depth=2)
    y, x = np.argwhere(strokes > 0)[len(np.argwhere(strokes > 0)) // 2]
    few = np.zeros_like(strokes)  # a few of the strokes, away from the image's corner
    few[y - 8 : y + 8, x - 8 : x + 8] = strokes[y - 8 : y + 8, x - 8 : x + 8]
    assert few.any()
    for annotation in (strokes, few):
        painted = annotation > 0
        pred = predict(image, model).argmax(0)
        expected = np.mean(pred[painted] == annotation[painted].astype(np.int64) - 1)
        got = painted_accuracy(model, [PaintedPlane(image, annotation, "img")])
        assert got == pytest.approx(expected, abs=1e-12)


def test_a_run_reports_its_setup_stages_before_each_one(case):
    """Reports between the stages of seconds before the first step: a GUI's Cancel
    is seen there (it waited 20 s on a 2048^2 plane)."""
    from napari_unet.core.finetune import finetune_iter
    from napari_unet.core.training import Phase, TrainStep

    image, _, strokes = case
    cfg = TrainConfig.finetune(steps=2, patch_size=64, max_seconds=None, device="cpu")
    gen = finetune_iter(tiny_model("same", depth=2), [PaintedPlane(image, strokes, "i")], [], cfg)
    reports = []
    while True:
        try:
            reports.append(next(gen))
        except StopIteration:
            break
    kinds = [r.message if isinstance(r, Phase) else type(r).__name__ for r in reports]
    assert kinds == [
        "checking the painted pixels",
        "re-estimating the normalisation",
        "predicting the unpainted pixels",
        "training",
        "TrainStep",
        "TrainStep",
        "checking the result on the painted pixels",
    ]
    assert all(isinstance(r, (Phase, TrainStep)) for r in reports)


def test_pseudo_labels_fill_unpainted_pixels_but_never_painted_ones(case):
    from napari_unet.core.adaptation import add_pseudo_labels
    from napari_unet.core.samples import PatchSampler, prepare

    image, _, strokes = case
    model = tiny_model("same", depth=2)
    cfg = TrainConfig.finetune(pseudo_threshold=0.0, patch_size=64, device="cpu")
    (sample,) = prepare(model, [image], [strokes], "sparse", cfg)
    p = sample.pad
    painted_before = sample.target[p:-p, p:-p].copy()
    w_before = sample.weights[p:-p, p:-p].copy()
    add_pseudo_labels([sample], model, cfg, torch.device("cpu"))
    target, w = sample.target[p:-p, p:-p], sample.weights[p:-p, p:-p]
    painted = strokes > 0
    np.testing.assert_array_equal(target[painted], painted_before[painted])
    np.testing.assert_array_equal(w[painted], w_before[painted])
    assert (target[~painted] >= 0).all()  # threshold 0: every pixel gets the guess
    from napari_unet.core.tiling import predict

    guess = predict(image, model).argmax(0)
    np.testing.assert_array_equal(target[~painted], guess[~painted])
    # their total weight is pseudo_weight times the painted pixels' weight
    ratio = w[~painted].sum() / w[painted].sum()
    assert ratio == pytest.approx(cfg.pseudo_weight, rel=1e-4)
    assert len(PatchSampler([sample], model, cfg, np.random.default_rng(0)).samples) == 1


def test_time_budget_stop_request_and_paused_time(case):
    image, _, strokes = case
    model = tiny_model("same", depth=2)
    cfg = TrainConfig.finetune(steps=10_000, patch_size=64, max_seconds=1.5, device="cpu")
    steps = []
    result = train(model, [image], [strokes], "sparse", cfg, callback=steps.append)
    # the steps that fit were timed first, and the run is a run of that many steps (or
    # fewer, where the machine slowed down past 1.25 x the budget)
    n, planned = steps[-1].step, result.info.provenance["train_config"]["steps"]
    assert n <= planned < 10_000 and all(s.steps == planned for s in steps)
    assert 0.3 * 1.5 <= steps[-1].elapsed < 1.25 * 1.5 + 2 * steps[-1].elapsed / n
    assert result.info.provenance["steps"] == n
    # so the seed and the step counts repeat it exactly, without the budget
    replay = replace(cfg, steps=planned, max_seconds=None, stop_after=n if n < planned else None)
    again = train(model, [image], [strokes], "sparse", replay)
    for k, v in result.net.state_dict().items():
        assert torch.equal(v, again.net.state_dict()[k]), k
    # a stop request ends the run with a result; time spent paused at yield is not counted
    calls = []
    gen = train_iter(
        model, [image], [strokes], "sparse",
        TrainConfig.finetune(steps=50, patch_size=64, max_seconds=None, device="cpu"),
        should_stop=lambda: len(calls) >= 3,
    )  # fmt: skip
    arrived = []
    for s in gen:
        arrived.append(time.perf_counter())
        calls.append(s)
        if s.step == 2:  # a snapshot is the network as it is while suspended here
            snap = s.snapshot()
        time.sleep(0.3)
    assert len(calls) == 4
    # between steps 1 and 4 the caller slept 0.9 s: the clock of training did not count it
    # (compared with the wall clock, so a slow or busy machine does not matter)
    trained = calls[-1].elapsed - calls[0].elapsed
    assert trained < (arrived[-1] - arrived[0]) - 0.85
    assert not snap.net.training and snap.info.provenance["steps"] == 2


def test_versions_keep_the_base_and_revert_to_the_parent():
    base = tiny_model("same", depth=1)
    v = ModelVersions(base)
    a, b = tiny_model("same", depth=1, seed=1), tiny_model("same", depth=1, seed=2)
    v.add(a, 0, steps=10, accuracy_before=0.5, accuracy_after=0.8)
    v.add(b, 1, steps=20)
    assert v.model is b and v.current == 2
    assert v.revert() is a
    assert v.revert() is base and v.base is base
    assert v.revert() is base
    assert "10 steps" in v.describe(1) and "50% -> 80%" in v.describe(1)
    with pytest.raises(IndexError):
        v.select(5)
    # two versions saved to one file: the first is unsaved again (it counted as saved,
    # and the session let it go without a word)
    assert v.unsaved() == v.versions[1:] and v.describe(1).endswith("not saved")
    v.mark_saved(v.versions[1], "/tmp/x/mine.safetensors")
    assert v.unsaved() == [v.versions[2]] and v.describe(1).endswith("saved as mine.safetensors")
    v.mark_saved(v.versions[2], "/tmp/x/../x/mine.safetensors")
    assert v.unsaved() == [v.versions[1]]


def test_finetune_iter_reports_previews_and_accuracy_and_stops_on_request(case):
    from napari_unet.core.finetune import Finished, Preview, finetune_iter
    from napari_unet.core.training import TrainStep

    image, _, strokes = case
    model = tiny_model("same", depth=2)
    planes = [PaintedPlane(image, strokes, "img")]
    cfg = TrainConfig.finetune(steps=1000, patch_size=64, max_seconds=None, device="cpu")
    seen = []
    gen = finetune_iter(
        model, planes, [], cfg, preview=(image, "YX", (0, 40, 10, 60)), preview_every=5,
        should_stop=lambda: sum(isinstance(v, TrainStep) for v in seen) >= 10,
    )  # fmt: skip
    while True:
        try:
            seen.append(next(gen))
        except StopIteration as done:
            result = done.value
            break
    previews = [v for v in seen if isinstance(v, Preview)]
    # (the stop asked for after step 10 skips its preview: it is heard there)
    assert [p.step for p in previews] == [5]
    assert previews[0].labels.shape == (40, 50) and set(np.unique(previews[0].labels)) <= {1, 2, 3}
    # asked while suspended after step 10: the step under way (11) is the last one
    assert isinstance(result, Finished) and result.stopped and result.steps == 11
    assert result.accuracy_before == pytest.approx(painted_accuracy(model, planes))
    assert result.accuracy_after == pytest.approx(painted_accuracy(result.model, planes))
    # Stop pressed after the last step ended nothing early: not "stopped"
    cfg = TrainConfig.finetune(steps=3, patch_size=64, max_seconds=None, device="cpu")
    seen.clear()
    gen = finetune_iter(
        model, planes, [], cfg,
        should_stop=lambda: sum(isinstance(v, TrainStep) for v in seen) >= 3,
    )  # fmt: skip
    from napari_unet.core.tiling import run_to_end

    result = run_to_end(gen, seen.append)
    assert result.steps == 3 and not result.stopped and result.planned == 3


def test_finetune_at_the_model_object_size_rescales_planes_and_previews(case, monkeypatch):
    from napari_unet.core import training
    from napari_unet.core.finetune import Preview, finetune_iter, rescaled_plane
    from napari_unet.core.tiling import run_to_end

    image, _, strokes = case
    model = tiny_model("same", depth=2, object_diameter=24.0)
    planes = [PaintedPlane(image, strokes, "img")]
    sizes = []
    inner = training.train_iter

    def spy(model, images, labels, *args, **kw):
        sizes.extend((im.shape, lab.shape) for im, lab in zip(images, labels))
        return inner(model, images, labels, *args, **kw)

    monkeypatch.setattr(training, "train_iter", spy)
    cfg = TrainConfig.finetune(steps=4, patch_size=64, max_seconds=None, device="cpu")
    gen = finetune_iter(
        model, planes, [image], cfg, preview=(image, "YX", (0, 40, 10, 60)), preview_every=2,
        diameter=12,
    )  # fmt: skip
    seen = []
    result = run_to_end(gen, seen.append)
    assert result.scales == (2.0,)
    assert result.model.info.provenance["rescaled"] == [2.0]  # what a repeat needs
    assert sizes == [((256, 256), (256, 256))]  # the painted plane at twice its size
    previews = [v for v in seen if isinstance(v, Preview)]
    assert previews and previews[0].labels.shape == (40, 50)  # back in the image's pixels
    big = rescaled_plane(planes[0], 2.0)
    assert result.accuracy_before == pytest.approx(painted_accuracy(model, [big]))
    # paint is resized nearest: every painted pixel keeps a painted class
    assert set(np.unique(big.annotation)) == set(np.unique(strokes))
    assert np.count_nonzero(big.annotation) == pytest.approx(4 * np.count_nonzero(strokes), 0.05)
    # models without an object size, or no diameter: the planes' own scale
    plain = run_to_end(finetune_iter(tiny_model("same", depth=2), planes, [], cfg, diameter=12))
    assert plain.scales == () and sizes[-1] == ((128, 128), (128, 128))
    assert "rescaled" not in plain.model.info.provenance


def _asked(asked: list) -> bool:
    asked.append(1)
    return True


def test_a_stop_while_the_object_size_is_measured_is_heard_at_once(case):
    """The sizing pass (a whole segmentation of every painted plane, before the first
    report) did not listen: Stop and Cancel waited for it to end."""
    from napari_unet.core.cancel import Cancelled
    from napari_unet.core.finetune import finetune_iter
    from napari_unet.core.training import STOPPED_EARLY, Phase

    image, _, strokes = case
    model = tiny_model("same", depth=2, object_diameter=24.0)
    planes = [PaintedPlane(image, strokes, "img")]
    cfg = TrainConfig.finetune(steps=4, patch_size=64, max_seconds=None, device="cpu")
    for ask in ("should_stop", "should_cancel"):
        asked, seen = [], []
        now = functools.partial(_asked, asked)
        gen = finetune_iter(model, planes, [], cfg, diameter="auto", **{ask: now})
        with pytest.raises(Cancelled, match=STOPPED_EARLY):
            for report in gen:
                seen.append(report)
        assert [r.message for r in seen if isinstance(r, Phase)] == ["measuring the object size"]
        assert len(asked) == 1  # before the first tile of the first pass


def test_pairs_are_read_and_checked_inside_the_generator(case):
    from napari_unet.core.finetune import Finished, finetune_pairs_iter
    from napari_unet.core.painted import Collected
    from napari_unet.core.training import TrainStep

    image, _, strokes = case
    model = tiny_model("same", depth=2)
    cfg = TrainConfig.finetune(steps=3, patch_size=64, max_seconds=None, device="cpu")
    gen = finetune_pairs_iter(model, [(image, np.zeros_like(strokes), "img", "sparse")], cfg)
    with pytest.raises(ValueError, match="nothing is painted"):  # on the first next()
        next(gen)
    gen = finetune_pairs_iter(model, [(image, strokes, "img", "sparse")], cfg)
    first = next(gen)
    counts = np.bincount(strokes.ravel(), minlength=4)[1:]
    assert isinstance(first, Collected) and first.planes == 1
    assert first.painted == dict(zip(CLASSES, counts.tolist()))
    steps = []
    try:
        while True:
            steps.append(next(gen))
    except StopIteration as end:
        done = end.value
    assert [s.step for s in steps if isinstance(s, TrainStep)] == [1, 2, 3]
    assert isinstance(done, Finished) and done.steps == 3
    assert done.model.info.provenance["training_data"] == first.data_name
    assert first.data_name.startswith("1 painted plane(s) (") and first.data_name.endswith(": img")


def test_a_stopped_run_is_repeated_by_stop_after(case):
    """Stop & keep after 7 of 20 planned steps: the schedule was that of 20 steps, and
    stop_after=7 repeats it (provenance: train_config steps 20, steps 7)."""
    from napari_unet.core.tiling import run_to_end

    image, _, strokes = case
    model = tiny_model("same", depth=2)
    cfg = TrainConfig.finetune(steps=20, patch_size=64, max_seconds=None, device="cpu")
    made = []
    gen = train_iter(model, [image], [strokes], "sparse", cfg, should_stop=lambda: len(made) >= 6)
    stopped = run_to_end(gen, made.append)
    p = stopped.info.provenance
    assert (p["steps"], p["train_config"]["steps"]) == (7, 20)
    again = train(model, [image], [strokes], "sparse", replace(cfg, stop_after=7))
    for k, v in stopped.net.state_dict().items():
        assert torch.equal(v, again.net.state_dict()[k]), k
    with pytest.raises(ValueError, match="stop_after must be a whole number"):
        TrainConfig(stop_after=0)


def test_instance_masks_with_huge_ids_are_renumbered_before_their_targets():
    """Ids like 3e9 made per-id tables of tens of GB (the GUI's 'Use selected Labels
    layer'); above 2**63 they failed."""
    image, labels = synthetic.nuclei((64, 64), n=5, seed=1)
    for offset in (3_000_000_000, 2**63 + 5):
        huge = np.where(labels > 0, labels.astype(np.uint64) + np.uint64(offset), 0)
        planes, _ = painted_planes([(image, huge, "img", "instances")], 1, convention=(1, 0.5))
        ref, _ = painted_planes([(image, labels, "img", "instances")], 1, convention=(1, 0.5))
        np.testing.assert_array_equal(planes[0].annotation, ref[0].annotation)


def test_a_stop_during_setup_or_a_preview_is_heard_at_once(case):
    """Stop was heard only after the first step: pressed while the painted pixels were
    checked (a whole-plane prediction), it took 36 s on 2048^2; during a preview, 5 s."""
    from napari_unet.core.cancel import Cancelled
    from napari_unet.core.finetune import Finished, Preview, finetune_iter
    from napari_unet.core.tiling import run_to_end
    from napari_unet.core.training import STOPPED_EARLY, TrainStep

    image, _, strokes = case
    model = tiny_model("same", depth=2)
    planes = [PaintedPlane(image, strokes, "img")]
    cfg = TrainConfig.finetune(steps=1000, patch_size=64, max_seconds=None, device="cpu")
    asked = []

    def at_once() -> bool:
        asked.append(1)
        return True

    with pytest.raises(Cancelled, match=STOPPED_EARLY):
        list(finetune_iter(model, planes, [], cfg, should_stop=at_once))
    assert len(asked) == 1  # before the first tile of the check of the painted pixels
    # Stop pressed as the preview of step 2 begins: no preview, the run ends with a result
    seen = []
    stop = {"now": False}
    gen = finetune_iter(
        model, planes, [], cfg, preview=(image, "YX", None), preview_every=2,
        should_stop=lambda: stop["now"],
    )  # fmt: skip

    def on_report(report) -> None:
        seen.append(report)
        if isinstance(report, TrainStep) and report.step == 2:
            stop["now"] = True  # Stop pressed as the preview of step 2 begins

    result = run_to_end(gen, on_report)
    assert not any(isinstance(v, Preview) for v in seen)
    assert isinstance(result, Finished) and result.stopped and result.steps == 3


def _previewed_run(case, steps: int, **kwargs):
    """A fine-tuning run of ``steps`` on the case's strokes, previewing the whole image;
    ``(result, every report)``."""
    from napari_unet.core.finetune import finetune_iter
    from napari_unet.core.tiling import run_to_end

    image, _, strokes = case
    planes = [PaintedPlane(image, strokes, "img")]
    cfg = TrainConfig.finetune(steps=steps, patch_size=64, max_seconds=None, device="cpu")
    seen = []
    gen = finetune_iter(
        tiny_model("same", depth=2), planes, [], cfg, preview=(image, "YX", None), **kwargs
    )
    return run_to_end(gen, seen.append), seen


def test_a_pause_asked_during_a_preview_drops_only_the_preview(case):
    """Pause waited for the preview being predicted (6 s on a 2048^2 plane)."""
    from napari_unet.core.finetune import Finished, Preview

    result, seen = _previewed_run(case, 4, preview_every=2, skip_preview=lambda: True)
    assert not any(isinstance(v, Preview) for v in seen)
    assert isinstance(result, Finished) and result.steps == 4 and not result.stopped


def test_previews_take_at_most_their_share_of_the_training_time(case, monkeypatch):
    """Whole-plane previews are slow on large views: a 12 s run with a preview every 8
    steps on a 2048^2 view took 104 s. A due preview is skipped while the previews took
    more than PREVIEW_SHARE of the training time."""
    import time

    from napari_unet.core import finetune
    from napari_unet.core.finetune import Preview
    from napari_unet.core.training import TrainStep

    took = []  # seconds each preview slept

    def slow_preview(step, *args):
        # as long as the training so far: slow on any machine, however loaded
        took.append(max(0.05, step.elapsed))
        time.sleep(took[-1])
        return Preview(step.step, np.ones((4, 4), np.uint8))

    monkeypatch.setattr(finetune, "_preview", slow_preview)
    result, seen = _previewed_run(case, 20, preview_every=1)
    previews = [v for v in seen if isinstance(v, Preview)]
    assert result.steps == 20 and previews[0].step == 1  # the first one is always shown
    assert len(previews) == len(took) < 20
    # before each preview the earlier ones took <= PREVIEW_SHARE of the training time
    trained = {v.step: v.elapsed for v in seen if isinstance(v, TrainStep)}
    for k, p in enumerate(previews):
        assert sum(took[:k]) <= finetune.PREVIEW_SHARE * trained[p.step] + 1e-9, (k, p.step)


def test_a_stop_while_the_steps_are_timed_keeps_nothing(case):
    """Stop pressed while the steps were timed (four steps of a copy) made a 1-step run."""
    from napari_unet.core.cancel import Cancelled
    from napari_unet.core.training import STOPPED_EARLY, Phase

    image, _, strokes = case
    cfg = TrainConfig.finetune(steps=500, patch_size=64, max_seconds=30.0, device="cpu")
    timing = []
    gen = train_iter(
        tiny_model("same", depth=2), [image], [strokes], "sparse", cfg,
        should_stop=lambda: bool(timing), phases=True,
    )  # fmt: skip
    with pytest.raises(Cancelled, match=STOPPED_EARLY):
        for report in gen:
            if isinstance(report, Phase) and report.message == "timing the steps":
                timing.append(report)  # Stop pressed now
    assert timing


def test_cancel_cuts_the_setup_and_the_last_check_short_and_stop_does_not(case):
    # the batch-norm re-estimation and the last painted-pixel check asked nobody: a
    # Cancel waited 5 s and 21 s for them on large planes
    from napari_unet.core.cancel import Cancelled
    from napari_unet.core.finetune import finetune_iter
    from napari_unet.core.tiling import run_to_end
    from napari_unet.core.training import Phase, TrainStep

    image, _, strokes = case
    planes = [PaintedPlane(image, strokes, "img")]
    cfg = TrainConfig.finetune(steps=3, patch_size=64, max_seconds=None, device="cpu")
    model = tiny_model("same", depth=2)
    seen = []

    from napari_unet.core.adaptation import adapt_norm

    passes, asked = [], []
    net = copy.deepcopy(model.net)  # (tiny_model's networks are shared between tests)
    net.register_forward_hook(lambda *_: passes.append(1))

    def stop():
        asked.append(1)
        return len(asked) > 2

    plane = np.zeros((1, 64, 64), np.float32)
    with pytest.raises(Cancelled):
        adapt_norm(net, [plane] * 10, model, np.random.default_rng(0), "cpu", 10, stop)
    assert len(passes) == 2
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    model = tiny_model("same", depth=2)
    with pytest.raises(Cancelled):  # (the phase is announced, then stopped)
        run_to_end(finetune_iter(model, planes, [image], cfg, should_stop=stop), seen.append)
    assert any(isinstance(v, Phase) for v in seen)
    # a Cancel during the last check: the run ends at once, without the accuracy after;
    # a Stop pressed during the steps lets the check finish
    cancelled = run_to_end(finetune_iter(model, planes, [], cfg, should_cancel=lambda: True))
    assert cancelled.steps == 3 and np.isnan(cancelled.accuracy_after)
    seen.clear()

    def stop():
        return sum(isinstance(v, TrainStep) for v in seen) >= 1

    run = finetune_iter(model, planes, [], cfg, should_stop=stop, should_cancel=lambda: False)
    stopped = run_to_end(run, seen.append)
    assert stopped.stopped and 0 <= stopped.accuracy_after <= 1


def test_a_painted_plane_with_nan_is_named_and_unpainted_ones_are_left_out(case):
    # "the image contains NaN..." named no image, and all annotated images train together
    image, _, strokes = case
    stack = np.stack([image, image, image]).astype(np.float32)
    stack[2, 5, 5] = np.nan  # unpainted: only for the statistics, left out
    paint = np.zeros(stack.shape, np.uint8)
    paint[0] = strokes
    planes, unpainted = painted_planes([(stack, paint, "cells")], 1)
    assert [p.source for p in planes] == ["cells, plane 0"] and len(unpainted) == 1
    paint[2] = strokes
    with pytest.raises(ValueError, match=r"^cells, plane 2: the image contains NaN"):
        painted_planes([(stack, paint, "cells")], 1)


def test_a_preview_plane_that_cannot_be_segmented_leaves_the_run_going(case):
    """A NaN plane in view (a registered stack's padding) ended the whole run after its
    steps: the run goes on without previews, and says why."""
    from napari_unet.core.finetune import Finished, Preview, finetune_iter
    from napari_unet.core.tiling import run_to_end

    image, _, strokes = case
    model = tiny_model("same", depth=2)
    planes = [PaintedPlane(image, strokes, "img")]
    view = image.astype(np.float32).copy()
    view[:5] = np.nan
    cfg = TrainConfig.finetune(steps=6, patch_size=64, max_seconds=None, device="cpu")
    seen = []
    gen = finetune_iter(model, planes, [], cfg, preview=(view, "YX", None), preview_every=2)
    result = run_to_end(gen, seen.append)
    previews = [v for v in seen if isinstance(v, Preview)]
    assert isinstance(result, Finished) and result.steps == 6
    assert len(previews) == 1 and previews[0].labels is None  # (not tried again)
    assert "no preview" in previews[0].note and "NaN" in previews[0].note
