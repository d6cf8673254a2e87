from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import tiny_model
from napari_unet.core import synthetic
from napari_unet.core.augment import AugmentConfig, augment, elastic_field
from napari_unet.core.loss import loss_fn
from napari_unet.core.targets import (
    border_weights,
    class_weights,
    contact_weights,
    core_share,
    instances_to_classes,
    to_target,
)
from napari_unet.core.training import TrainConfig, prepare, train, train_iter
from napari_unet.io import load_model


@pytest.fixture(scope="module")
def data():
    image, labels = synthetic.nuclei((160, 160), n=25, seed=3)
    return image, labels


def _cfg(**kw):
    base = dict(
        steps=30,
        lr=5e-3,
        batch_size=4,
        patch_size=64,
        warmup=2,
        val_every=10,
        augment=AugmentConfig(elastic=0.3, zoom=0.2),
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def test_loss_decreases_and_base_model_is_untouched(data):
    image, labels = data
    model = tiny_model("same", depth=2)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    steps = []
    cfg = _cfg(steps=40, lr=1e-2, val_every=20)
    val = dict(val_images=[image], val_labels=[labels])
    result = train(model, [image], [labels], "instances", cfg, callback=steps.append, **val)
    untrained = train(model, [image], [labels], "instances", _cfg(steps=1, val_every=1), **val)
    # the same fixed validation patches: loss well below the untrained network's
    assert steps[-1].metrics["val_loss"] < 0.7 * untrained.info.metrics["val_loss"]
    assert np.mean([s.loss for s in steps[-8:]]) < np.mean([s.loss for s in steps[:8]])
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert result.net is not model.net
    assert result.info.provenance["steps"] == 40
    assert result.info.provenance["label_kind"] == "instances"


def test_sparse_strokes_train_only_on_painted_pixels_and_accuracy_rises(data):
    image, labels = data
    classes = instances_to_classes(labels)
    rng = np.random.default_rng(0)
    sparse = np.zeros_like(classes, dtype=np.uint8)
    for c in range(3):
        ys, xs = np.nonzero(classes == c)
        pick = rng.choice(len(ys), 150, replace=False)
        sparse[ys[pick], xs[pick]] = c + 1
    model = tiny_model("valid", depth=2)
    painted = sparse > 0

    def accuracy(m):
        from napari_unet.core.tiling import predict

        pred = predict(image, m).argmax(0)
        return np.mean(pred[painted] == classes[painted])

    before = accuracy(model)
    result = train(model, [image], [sparse], "sparse", _cfg(steps=60, class_weighting="balanced"))
    assert accuracy(result) > max(before + 0.15, 0.6)


def test_training_is_deterministic_with_a_seed(data):
    image, labels = data
    runs = []
    for _ in range(2):
        torch.manual_seed(123)  # the global state must not matter
        r = train(tiny_model("same", depth=2), [image], [labels], "instances", _cfg(steps=5))
        runs.append(r.net.state_dict())
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_validation_metrics_and_checkpoints(tmp_path, data):
    image, labels = data
    ckpt = tmp_path / "ckpt.safetensors"
    gen = train_iter(
        tiny_model("same", depth=2),
        [image],
        [labels],
        "instances",
        _cfg(steps=10, val_every=5, checkpoint=str(ckpt), checkpoint_every=5),
        val_images=[image[:96, :96]],
        val_labels=[labels[:96, :96]],
    )
    reports = list(gen)
    assert [bool(r.metrics) for r in reports] == [False] * 4 + [True] + [False] * 4 + [True]
    assert 0 <= reports[-1].metrics["val_pixel_accuracy"] <= 1
    assert reports[-1].eta == 0
    saved = load_model(ckpt)
    assert saved.info.provenance["steps"] == 10


def test_cancel_mid_training_leaves_base_intact(data):
    image, labels = data
    model = tiny_model("same", depth=2)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    gen = train_iter(model, [image], [labels], "instances", _cfg(steps=100))
    for _ in range(3):
        next(gen)
    gen.close()
    assert all(torch.equal(v, before[k]) for k, v in model.net.state_dict().items())


@pytest.mark.parametrize(
    "labels, kind, message",
    [
        (np.zeros((64, 64), np.uint8), "sparse", "labels are empty"),
        (np.full((64, 64), 9, np.uint8), "sparse", "only 3 classes"),
        (np.zeros((32, 64), np.uint8), "sparse", "have shape"),
        (np.full((64, 64), 0.5, np.float32), "sparse", "image 0: labels must be integers"),
        (np.ones((64, 64), np.uint8), "blobs", "label kind must be one of"),
        # -1 is the ignore value inside: a user's -1 trained silently while -2 was refused
        (
            np.r_[np.full((32, 64), -1), np.ones((32, 64))].astype(np.int16),
            "classes",
            "the labels of image 0: labels must not be negative",
        ),
    ],
)
def test_bad_labels_give_clear_errors(labels, kind, message):
    image = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        train(tiny_model("same"), [image], [labels], kind, _cfg(steps=1))


def test_whole_numbers_in_float_labels_train_as_integers():
    """Fiji's 32-bit label images: refused outright ('labels must be integers')."""
    image = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    inst = np.zeros((64, 64), np.int32)
    inst[10:30, 10:30], inst[35:55, 35:55] = 1, 2
    model = tiny_model("same")
    as_float, as_int = (
        prepare(model, [image], [lab], "instances", TrainConfig())[0]
        for lab in (inst.astype(np.float32), inst)
    )
    np.testing.assert_array_equal(as_float.target, as_int.target)


def test_an_endless_time_budget_is_refused():
    with pytest.raises(ValueError, match="finite"):
        _cfg(max_seconds=float("inf"))
    # (--stop-after 5 --steps 2 was taken without a word)
    with pytest.raises(ValueError, match=r"stop_after \(5\) is beyond the 2 steps"):
        _cfg(steps=2, stop_after=5)


def test_one_class_is_refused_even_beside_the_model_s_own_answers():
    """One class alone teaches one answer (a dense 0/1 mask read as strokes turned every
    cell into membrane): refused, with the fine-tune recipe's pseudo-labels (the model's
    confident answers where nothing is painted) too, as the fine-tune panel refuses it."""
    image = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    strokes = np.zeros((64, 64), np.uint8)
    strokes[10:20, 10:20] = 2
    with pytest.raises(ValueError, match="only one class \\('interior'\\).*--label-kind classes"):
        train(tiny_model("same"), [image], [strokes], "sparse", _cfg(steps=3))
    with pytest.raises(ValueError, match="only one class \\('background'\\): annotate"):
        everywhere = np.zeros((64, 64), np.uint8)  # one dense class: background everywhere
        train(tiny_model("same"), [image], [everywhere], "classes", _cfg(steps=3))
    cfg = TrainConfig.finetune(steps=3, patch_size=32, max_seconds=None, device="cpu")
    with pytest.raises(ValueError, match="only one class \\('interior'\\)"):
        train(tiny_model("same"), [image], [strokes], "sparse", cfg)
    strokes[30:40, 30:40] = 1  # and some background: trains
    result = train(tiny_model("same"), [image], [strokes], "sparse", cfg)
    assert result.info.provenance["steps"] == 3


def test_instances_to_classes_and_border_weights():
    inst = np.zeros((40, 40), np.int32)
    inst[5:15, 5:19] = 1
    inst[5:15, 21:35] = 2  # a 2-pixel gap between 1 and 2
    inst[30:36, 30:36] = 3  # alone
    classes = instances_to_classes(inst, boundary_width=2)
    assert set(np.unique(classes)) == {0, 1, 2}
    assert classes[10, 10] == 1 and classes[5, 10] == 2 and classes[6, 10] == 2
    assert classes[7, 10] == 1 and classes[0, 0] == 0
    w = border_weights(inst, w0=10, sigma=5)
    assert w[10, 19] > 8  # in the narrow gap: d1 + d2 = 2
    assert w[20, 2] < w[10, 20]
    assert (w[inst > 0] == 0).all()
    target = to_target(inst, "instances", 3)
    cw = class_weights([target], 3)
    counts = np.bincount(target.ravel(), minlength=3)
    np.testing.assert_allclose(cw * counts, counts.sum() / 3, rtol=1e-5)  # balanced
    soft = class_weights([target], 3, power=0.5)
    np.testing.assert_allclose((soft * counts).sum(), counts.sum(), rtol=1e-5)  # mean 1
    np.testing.assert_allclose(soft[2] / soft[1], np.sqrt(counts[1] / counts[2]), rtol=1e-5)
    np.testing.assert_allclose(class_weights([target], 3, power=0.0), 1.0, rtol=1e-6)


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535)])
def test_contact_weights_of_ids_at_the_dtypes_maximum(dtype, top):
    inst = np.zeros((12, 12), dtype)
    inst[2:6, 2:6] = 1
    inst[7:11, 7:11] = top  # apart from 1: no contact anywhere
    assert not contact_weights(inst).any()
    inst[2:6, 6:10] = top  # now touching along x = 5 | 6
    touching = np.argwhere(contact_weights(inst) > 0)
    assert set(touching[:, 1]) == {5, 6}


def test_core_targets_and_contact_weights_separate_touching_objects():
    inst = np.zeros((20, 40), np.int32)
    inst[2:18, 2:18] = 1  # 16 x 16, depth 8
    inst[2:18, 18:34] = 2  # touches 1 along x = 17 | 18
    inst[2:6, 36:40] = 3  # 4 x 4 at the image edge
    core = instances_to_classes(inst, boundary_width=1, core_fraction=0.5)
    assert (core[inst == 0] == 0).all()
    # interior = pixels at depth >= 4 of 8: a centred 8 x 8 core per big object
    assert np.count_nonzero(core[:, :18] == 1) == 64 and core[9, 9] == 1
    assert np.count_nonzero(core[:, 18:34] == 1) == 64 and core[9, 25] == 1
    assert core[9, 14] == 2 and core[9, 21] == 2  # cores 8 px apart across the contact
    assert np.count_nonzero(core[2:6, 36:40] == 1) > 0  # small objects keep a core
    plain = instances_to_classes(inst, boundary_width=1)
    np.testing.assert_array_equal(plain > 0, core > 0)
    assert np.count_nonzero(plain == 1) > np.count_nonzero(core == 1)
    w = contact_weights(inst, w0=7)
    touching = np.zeros_like(inst, bool)
    touching[2:18, 17:19] = True
    np.testing.assert_array_equal(w > 0, touching)
    assert w.max() == 7
    target = to_target(inst, "instances", 3, 1, core_fraction=0.5)
    np.testing.assert_array_equal(target, core)


def test_soft_cores_ramp_from_the_edge_to_the_centre_and_dip_at_contacts():
    inst = np.zeros((20, 40), np.int32)
    inst[2:18, 2:18] = 1  # 16 x 16: depth 0 on its inner boundary, 7 at the centre
    inst[2:18, 18:34] = 2  # touches 1 along x = 17 | 18
    q = core_share(inst, boundary_width=1, core_fraction=0.5, ramp=0.6)
    assert (q[inst == 0] == -1).all() and q[inst > 0].min() == 0 and q.max() == 1
    row = q[9, 2:18]  # across object 1: 0 at both edges (x = 17 is the contact), 1 inside
    assert row[0] == 0 and row[-1] == 0 and row[7] == 1
    assert (np.diff(row[:8]) >= 0).all() and (np.diff(row[8:]) <= 0).all()
    assert 0 < row[2] < 1  # the ramp: depth 2 of 7 -> (2/7 - 0.2) / 0.6
    np.testing.assert_allclose(row[2], (2 / 7 - 0.2) / 0.6, rtol=1e-5)
    # the hard classes are the soft targets' side of 0.5 (ties at exactly half depth aside)
    hard = instances_to_classes(inst, 1, 0.5)
    clear = (inst > 0) & (q != 0.5)
    np.testing.assert_array_equal((q > 0.5)[clear], (hard == 1)[clear])


def test_soft_core_loss_and_training_record_the_ramp(data):
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = 2.0  # p(interior) high everywhere
    target = torch.tensor([[[1, 1], [2, -1]]])
    w = torch.ones(1, 2, 2)
    hard = loss_fn(logits, target, w)
    share = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # the same as the hard targets
    np.testing.assert_allclose(
        float(loss_fn(logits, target, torch.stack([w, share], 1))), float(hard), rtol=1e-6
    )
    half = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])  # half interior: between the two
    logp = torch.log_softmax(logits[0, :, 0, 0], 0)
    expected = -(0.5 * logp[1] + 0.5 * logp[2])  # the 3 annotated pixels alike
    np.testing.assert_allclose(
        float(loss_fn(logits, target, torch.stack([w, half], 1))), float(expected), rtol=1e-5
    )
    image, inst = data
    base = tiny_model("same")
    cfg = _cfg(steps=3, core_fraction=0.5, core_ramp=0.6, border_w0=0)
    sample = prepare(base, [image], [inst], "instances", cfg)[0]
    assert sample.weights.shape == (2, *sample.target.shape)
    p = sample.pad
    np.testing.assert_allclose(sample.weights[1, p:-p, p:-p], core_share(inst, 2, 0.5, 0.6))
    trained = train(base, [image], [inst], "instances", cfg)
    assert trained.info.provenance["train_config"]["core_ramp"] == 0.6
    # continuing it keeps its soft cores, unless told otherwise or the cores go
    again = prepare(trained, [image], [inst], "instances", TrainConfig(border_w0=0))[0]
    q = again.pad
    np.testing.assert_array_equal(again.weights[1, q:-q, q:-q], sample.weights[1, p:-p, p:-p])
    for other in (TrainConfig(core_ramp=0.0), TrainConfig(core_fraction=0.0)):
        assert prepare(trained, [image], [inst], "instances", other)[0].weights.ndim == 2
    with pytest.raises(ValueError, match="core_fraction"):
        prepare(base, [image], [inst], "instances", _cfg(core_fraction=0.0, core_ramp=0.6))


def test_contact_weight_reaches_the_loss_weights():
    inst = np.zeros((64, 64), np.int32)
    inst[10:30, 10:30], inst[10:30, 30:50] = 1, 2  # touching along x = 29 | 30
    image = (inst > 0).astype(np.float32)
    model = tiny_model("same")
    plain, touch = (
        prepare(model, [image], [inst], "instances", TrainConfig(border_w0=0, contact_w0=w))[0]
        for w in (0.0, 4.0)
    )
    extra = touch.weights - plain.weights
    p = plain.pad
    expected = np.zeros_like(inst, np.float32)
    expected[10:30, 29:31] = 4.0
    np.testing.assert_allclose(extra[p:-p, p:-p], expected)


def test_unset_loss_weights_are_the_base_models_for_masks_and_balanced_for_strokes():
    """The fine-tune recipe (class weighting, separation and contact weights unset):
    balanced classes and no separation weights were right for strokes, and fine-tuning
    the nuclei model on exact masks with them lowered its F1 (held-back 20x heart: 0.83
    -> 0.61, benchmarks/finetune_masks.py)."""
    from napari_unet.core.weighting import with_weighting

    unset = TrainConfig.finetune()
    assert (unset.class_weighting, unset.border_w0, unset.contact_w0) == (None, None, None)
    record = {"class_weighting": "sqrt", "border_w0": 10.0, "contact_w0": 10.0}
    nuclei_like = tiny_model(
        "same", provenance={"train_config": record, "label_kind": "instances"}
    )

    def resolved(model, masks, cfg=unset):
        r = with_weighting(cfg, model, masks)
        return r.class_weighting, r.border_w0, r.contact_w0

    assert resolved(nuclei_like, masks=True) == ("sqrt", 10.0, 10.0)
    assert resolved(nuclei_like, masks=False) == ("balanced", 0.0, 0.0)
    assert resolved(tiny_model("same"), masks=True) == ("balanced", 10.0, 0.0)  # no record
    given = replace(unset, class_weighting="none", contact_w0=3.0)
    assert resolved(nuclei_like, True, given) == ("none", 10.0, 3.0)  # what is given stays
    odd = {"class_weighting": "square", "border_w0": -1, "contact_w0": "10"}
    assert resolved(
        tiny_model("same", provenance={"train_config": odd, "label_kind": "instances"}), True
    ) == (
        "balanced",
        10.0,
        0.0,
    )
    # what a run used is what its provenance records
    inst = np.zeros((64, 64), np.int32)
    inst[10:30, 10:30], inst[10:30, 30:50] = 1, 2
    image = (inst > 0).astype(np.float32)
    cfg = replace(unset, steps=1, patch_size=32, batch_size=1, max_seconds=None, device="cpu")
    done = train(nuclei_like, [image], [inst], "instances", cfg).info.provenance["train_config"]
    assert {k: done[k] for k in record} == record
    # a fine-tune on strokes (weighed balanced, no separation weights) passes the base's
    # weighting of masks on: strokes, then masks, weighed the masks as strokes
    strokes = np.where(inst > 0, 2, 1).astype(np.uint8)
    v1 = train(nuclei_like, [image], [strokes], "sparse", cfg)
    assert v1.info.provenance["train_config"]["class_weighting"] == "balanced"
    assert v1.info.provenance["mask_weighting"] == record
    assert resolved(v1, masks=True) == ("sqrt", 10.0, 10.0)
    # a model trained on strokes from scratch has no weighting of masks of its own
    fresh = tiny_model("same", provenance={"train_config": record, "label_kind": "sparse"})
    assert resolved(fresh, masks=True) == ("balanced", 10.0, 0.0)


def test_painted_classes_drawn_from_objects_get_their_separation_weights():
    """A mask of part of an image trains as painted classes (0 = not annotated) with
    the contact and separation weights its objects give, as instance labels have."""
    from napari_unet.core.painted import painted_planes

    inst = np.zeros((64, 64), np.int32)
    inst[10:30, 10:30], inst[10:30, 30:50] = 1, 2  # touching along x = 29 | 30
    image = (inst > 0).astype(np.float32)
    (plane,), _ = painted_planes([(image, inst[:40], "p", "instances", "YX", (0, 0))], 1)
    np.testing.assert_array_equal(plane.objects[:40], inst[:40])
    assert not plane.objects[40:].any()
    cfg = TrainConfig(border_w0=0, contact_w0=4.0, class_weighting="none")
    model = tiny_model("same")
    strokes, drawn = (
        prepare(model, [image], [plane.annotation], "sparse", cfg, objects=[ids])[0]
        for ids in (None, plane.objects)
    )
    p = strokes.pad
    extra = (drawn.weights - strokes.weights)[p:-p, p:-p]
    expected = np.zeros_like(inst, np.float32)
    expected[10:30, 29:31] = 4.0
    np.testing.assert_allclose(extra, expected)
    assert not drawn.weights[p + 40 :, p:-p].any()  # not annotated: no weight at all
    with pytest.raises(ValueError, match=r"objects of image 0 have shape \(40, 64\)"):
        prepare(model, [image], [plane.annotation], "sparse", cfg, objects=[inst[:40]])


def test_instance_targets_follow_the_base_models_convention(data):
    """Continuing a model trained on cores (or a 1-px rim) draws its targets the same way."""
    from dataclasses import replace

    from napari_unet.core.targets import convention

    image, inst = data
    base = tiny_model("same")
    assert convention(base.info) == (2, 0.0)  # no training record: the defaults
    trained = train(base, [image], [inst], "instances", _cfg(steps=2, core_fraction=0.4))
    recorded = trained.info.provenance["train_config"]
    assert (recorded["boundary_width"], recorded["core_fraction"]) == (2, 0.4)
    assert convention(trained.info) == (2, 0.4)
    p_cores = prepare(trained, [image], [inst], "instances", TrainConfig(border_w0=0))[0]
    p = p_cores.pad
    np.testing.assert_array_equal(p_cores.target[p:-p, p:-p], instances_to_classes(inst, 2, 0.4))
    # an explicit setting wins over the base model's
    p_rim = prepare(trained, [image], [inst], "instances", TrainConfig(core_fraction=0.0))[0]
    np.testing.assert_array_equal(p_rim.target[p:-p, p:-p], instances_to_classes(inst, 2, 0.0))
    assert (p_rim.target == 1).sum() > (p_cores.target == 1).sum()
    # a fine-tune of the fine-tune keeps the convention in its provenance
    again = train(trained, [image], [inst], "instances", _cfg(steps=1))
    assert convention(again.info) == (2, 0.4)
    odd = replace(trained.info, provenance={"train_config": {"boundary_width": 1}})
    assert convention(odd) == (1, 0.0)


def test_augment_keeps_image_and_labels_aligned():
    rng = np.random.default_rng(0)
    target = np.zeros((48, 48), np.int64)
    target[10:20, 30:40] = 1
    image = target[None].astype(np.float32) * 5
    for _ in range(10):
        maps = np.stack([np.ones_like(target, np.float32), target.astype(np.float32)])
        img, t, w = augment(
            image, target, maps, rng, AugmentConfig(intensity=0, noise=0, elastic=1.0, zoom=0.2)
        )
        inside = t == 1
        assert inside.any()
        assert img[0][inside].mean() > img[0][t == 0].mean() + 3
        assert w.shape == (2, *t.shape)  # float maps (weights, soft targets) follow too
        assert w[1][inside].mean() > 0.9 and w[1][t == 0].mean() < 0.1
    dy, dx = elastic_field((100, 100), np.random.default_rng(1), sigma=10)
    assert dy.shape == (100, 100) and 2 < dy.std() < 30
    assert np.abs(np.diff(dy, axis=0)).max() < 2  # smooth: from a coarse 3x3 grid


def test_gamma_and_blur_change_the_image_only_and_keep_its_range():
    rng = np.random.default_rng(2)
    target = np.zeros((40, 40), np.int64)
    target[10:30, 10:30] = 1
    image = np.stack([target * 1.0 + rng.normal(0, 0.1, target.shape)]).astype(np.float32)
    weights = np.ones(target.shape, np.float32)
    plain = AugmentConfig(flips=False, rotations=False, intensity=0, noise=0)
    gamma = replace(plain, gamma=1.0)
    out, t, w = augment(image, target, weights, np.random.default_rng(0), gamma)
    np.testing.assert_array_equal(t, target)
    assert not np.allclose(out, image)  # a gamma other than 1 was drawn
    np.testing.assert_allclose([out.min(), out.max()], [image.min(), image.max()], rtol=1e-5)
    order = np.argsort(image.ravel())  # a monotonic map: the pixels' order is kept
    assert np.all(np.diff(out.ravel()[order]) >= -1e-6)
    blurred, t, _ = augment(
        image, target, weights, np.random.default_rng(0), replace(plain, blur=1.0)
    )
    np.testing.assert_array_equal(t, target)
    assert np.std(np.diff(blurred[0], axis=1)) < 0.6 * np.std(np.diff(image[0], axis=1))
    same, _, _ = augment(image, target, weights, np.random.default_rng(0), plain)
    np.testing.assert_array_equal(same, image)  # neither without being asked for
    with pytest.raises(ValueError, match="gamma must be from 0 to 1"):
        AugmentConfig(gamma=2.0)


def test_calibrate_threshold_moves_the_decision():
    from napari_unet.core.adaptation import calibrate_threshold
    from napari_unet.core.tiling import predict

    model = tiny_model("same", depth=2, classes=2)
    image = np.random.default_rng(0).random((48, 48)).astype(np.float32)
    before = predict(image, model, device="cpu")
    calibrated = calibrate_threshold(model, 1, 0.3)
    after = predict(image, calibrated, device="cpu")
    np.testing.assert_array_equal(after.argmax(0), before[1] > 0.3)
    assert (before[1] > 0.3).sum() > (before[1] > 0.5).sum()  # the test can tell
    assert calibrated.info.provenance["calibrated_threshold"]["threshold"] == 0.3
    np.testing.assert_array_equal(predict(image, model, device="cpu"), before)  # original kept


def test_bf16_autocast_trains_deterministically_and_keeps_float32_weights(data):
    image, labels = data
    val = dict(val_images=[image], val_labels=[labels])
    runs = [
        train(tiny_model("same", depth=2), [image], [labels], "instances", _cfg(**kw), **val)
        for kw in (
            dict(steps=40, lr=1e-2, bf16=True),
            dict(steps=40, lr=1e-2, bf16=True),
            dict(steps=40, lr=1e-2),
        )
    ]
    untrained = train(
        tiny_model("same", depth=2),
        [image],
        [labels],
        "instances",
        _cfg(steps=1, val_every=1),
        **val,
    )
    bf16, again, fp32 = (r.net.state_dict() for r in runs)
    assert all(v.dtype == torch.float32 for k, v in bf16.items() if v.is_floating_point())
    assert all(torch.equal(bf16[k], again[k]) for k in bf16)
    # the flag changes the arithmetic (so it is applied) ...
    assert any(not torch.equal(bf16[k], fp32[k]) for k in bf16 if bf16[k].is_floating_point())
    # ... and the network still learns as well as in float32
    assert runs[0].info.metrics["val_loss"] < 0.7 * untrained.info.metrics["val_loss"]
    assert runs[0].info.metrics["val_loss"] < 1.5 * runs[2].info.metrics["val_loss"]


def test_bf16_auto_follows_the_device_and_bad_values_are_refused(data):
    from napari_unet.core.device import fast_bf16

    image, labels = data
    r = train(
        tiny_model("same", depth=2), [image], [labels], "instances", _cfg(steps=2, bf16="auto")
    )
    # the provenance records what was used, not "auto"
    assert r.info.provenance["train_config"]["bf16"] is fast_bf16(torch.device("cpu"))
    with pytest.raises(ValueError, match="bf16 must be"):
        train(tiny_model("same", depth=2), [image], [labels], "instances", _cfg(bf16="yes"))


@pytest.mark.parametrize("native", [False, True])
def test_bf16_forced_on_a_device_without_native_bf16_warns(data, monkeypatch, native):
    import warnings

    import napari_unet.core.training as training

    monkeypatch.setattr(training, "fast_bf16", lambda device: native)
    image, labels = data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = train(
            tiny_model("same", depth=2), [image], [labels], "instances", _cfg(steps=1, bf16=True)
        )
    slow = [w for w in caught if "no native bfloat16" in str(w.message)]
    assert len(slow) == (0 if native else 1)
    assert r.info.provenance["train_config"]["bf16"] is True  # still done as asked
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = train(
            tiny_model("same", depth=2), [image], [labels], "instances", _cfg(steps=1, bf16="auto")
        )
    assert not [w for w in caught if "no native bfloat16" in str(w.message)]
    assert r.info.provenance["train_config"]["bf16"] is native


def test_bootstrapped_loss_averages_the_hardest_annotated_pixels(data):
    logits = torch.zeros(1, 3, 2, 3)
    logits[0, 1] = torch.tensor([[3.0, 0.0, -3.0], [1.0, 2.0, 0.0]])
    target = torch.tensor([[[1, 1, 1], [0, 2, -1]]])  # one pixel not annotated
    w = torch.tensor([[[1.0, 1.0, 2.0], [1.0, 1.0, 5.0]]])
    per = torch.nn.functional.cross_entropy(logits, target.clamp(min=0), reduction="none") * w
    annotated = per[target >= 0]  # the ignored pixel's weight 5 must not count
    top2 = annotated.topk(2).values.mean()  # ceil(0.4 * 5) = 2 pixels
    np.testing.assert_allclose(float(loss_fn(logits, target, w, hard=0.4)), float(top2), rtol=1e-6)
    np.testing.assert_allclose(
        float(loss_fn(logits, target, w, hard=1.0)), float(annotated.mean()), rtol=1e-6
    )
    assert float(loss_fn(logits, target, w, hard=0.4)) > float(annotated.mean())
    with pytest.raises(ValueError, match="hard_fraction"):
        loss_fn(logits, target, w, hard=0.0)
    image, inst = data
    with pytest.raises(ValueError, match="hard_fraction"):
        train(tiny_model("same"), [image], [inst], config=TrainConfig(steps=1, hard_fraction=1.5))
    gen = train_iter(
        tiny_model("same"),
        [image],
        [inst],
        "instances",
        TrainConfig(steps=3, batch_size=2, patch_size=32, hard_fraction=0.25, val_every=0),
    )
    losses = [s.loss for s in gen]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_huge_patches_and_binary_masks_as_instances_are_caught():
    image, labels = synthetic.nuclei((64, 64), n=5, seed=3)
    with pytest.raises(ValueError, match="far larger than the images"):
        train(tiny_model("same"), [image], [labels], config=TrainConfig(steps=1, patch_size=8000))
    # a batch or patch no machine holds is refused before anything is allocated
    with pytest.raises(ValueError, match="patch_size must be at most 8192"):
        TrainConfig(patch_size=100000)
    with pytest.raises(ValueError, match="batch_size must be at most 1024"):
        TrainConfig(batch_size=10**9)
    binary = np.where(labels > 0, 255, 0).astype(np.uint8)
    with pytest.warns(UserWarning, match="one id \\(255\\) for .* separate regions"):
        train(tiny_model("same"), [image], [binary], config=TrainConfig(steps=1, patch_size=32))


def test_a_diverging_run_is_an_error_and_returns_no_model(data):
    image, labels = data
    with pytest.raises(ValueError, match="training diverged by step .* lower the learning rate"):
        train(tiny_model("same"), [image], [labels], config=_cfg(steps=20, lr=1e8, warmup=0))
    with pytest.raises(ValueError, match="finite number above 0"):
        _cfg(lr=float("inf"))


def test_a_network_that_predicts_nan_is_never_returned_or_checkpointed(data, tmp_path):
    """Finite weights can still overflow: one step at lr 1e6 gave a model whose every
    prediction was NaN, returned and saved as done; checkpoints of diverged networks
    were written although the error said nothing was saved."""
    image, labels = data
    with pytest.raises(ValueError, match="training diverged by step 1"):
        train(tiny_model("same"), [image], [labels], config=_cfg(steps=1, lr=1e6, warmup=0))
    ckpt = tmp_path / "c.safetensors"
    cfg = _cfg(steps=3, lr=1e8, warmup=0, checkpoint=str(ckpt), checkpoint_every=1)
    with pytest.raises(ValueError, match="training diverged"):
        train(tiny_model("same"), [image], [labels], config=cfg)
    assert not ckpt.exists()


def test_a_frozen_encoder_is_frozen_for_its_run_only(data):
    image, labels = data
    base = tiny_model("same")
    cfg = _cfg(steps=5, freeze_encoder=True)
    frozen = train(base, [image], [labels], config=cfg)
    for name, value in base.net.enc0.state_dict().items():  # batch-norm statistics too
        assert torch.equal(frozen.net.enc0.state_dict()[name], value), name
    assert all(p.requires_grad for p in frozen.net.parameters())
    again = train(frozen, [image], [labels], config=replace(cfg, freeze_encoder=False))
    # trained again without freezing, the encoder learns (it stayed frozen before)
    assert not torch.equal(next(again.net.enc0.parameters()), next(frozen.net.enc0.parameters()))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"checkpoint": "c.pt"}, "end in .safetensors"),
        ({"seed": -1}, "seed"),
        ({"schedule": "linear"}, "schedule"),
        ({"dice": float("nan")}, "dice"),
        ({"anchor": -1.0}, "anchor"),
        ({"pseudo_threshold": 5.0}, "pseudo_threshold"),
        ({"weight_decay": -1e-4}, "weight_decay"),
    ],
)
def test_settings_out_of_range_are_refused_up_front(change, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**change)
    with pytest.raises(ValueError, match="augmentation zoom"):
        AugmentConfig(zoom=1.0)


def test_only_trainable_u_nets_with_two_classes_are_trained(tmp_path, data):
    import json

    from napari_unet.io.files import TORCHSCRIPT_META

    image, labels = data
    model = tiny_model("same", depth=2)
    traced = torch.jit.trace(model.net, torch.rand(1, 1, 64, 64))
    extra = {TORCHSCRIPT_META: json.dumps(model.info.to_dict())}
    torch.jit.save(traced, str(tmp_path / "m.pt"), _extra_files=extra)
    with pytest.raises(ValueError, match="only napari-unet U-Nets can be trained"):
        train(load_model(tmp_path / "m.pt"), [image], [labels], config=_cfg(steps=2))
    one = tiny_model("same", depth=2, classes=1)
    with pytest.raises(ValueError, match="one output class"):
        train(one, [image], [labels > 0], "classes", config=_cfg(steps=2))


def test_instance_ids_of_any_size_give_the_same_targets(data):
    """Ids like 3e9 or 2**63 are renumbered (per-id tables of them took tens of GB)."""
    image, labels = data
    huge = np.where(labels > 0, labels.astype(np.uint64) + np.uint64(2**63), 0)
    a = prepare(tiny_model("same"), [image], [labels], "instances", _cfg())[0]
    b = prepare(tiny_model("same"), [image], [huge], "instances", _cfg())[0]
    np.testing.assert_array_equal(a.target, b.target)
    np.testing.assert_array_equal(a.weights, b.weights)


def test_patches_focus_on_the_rarest_painted_class():
    """A class nobody painted is not 'the rarest' (patches then focused on nothing)."""
    image = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    strokes = np.zeros((64, 64), np.uint8)
    strokes[5:30, 5:40] = 1  # background, 875 px
    strokes[40:44, 40:45] = 2  # interior, 20 px; no boundary painted
    (sample,) = prepare(tiny_model("same"), [image], [strokes], "sparse", _cfg())
    assert len(sample.focus) == 20


def test_fine_tuned_models_keep_their_lineage_not_their_bases_card(data):
    image, labels = data
    base = tiny_model("same", depth=2, name="base")
    base.info.provenance = {
        "validation": "11 held-back images",
        "model_card": "docs/models/base.md",
        "calibrated_threshold": {"class": "interior", "threshold": 0.3},
        "license": "BSD-3-Clause",
    }
    first = train(base, [image], [labels], config=_cfg(steps=2))
    second = train(first.with_info(name="first"), [image], [labels], config=_cfg(steps=2))
    p = second.info.provenance
    assert p["base_model"] == "first" and p["lineage"] == "base -> first"
    assert p["license"] == "BSD-3-Clause"
    assert not {"validation", "model_card", "calibrated_threshold"} & set(p)
    # the card says how many steps were planned (what `train --steps` repeats the run by)
    assert "steps planned: 2" in second.info.card().splitlines()


def test_small_images_fine_tune_with_batch_norm_re_estimated():
    """A 20 x 20 image: the statistics crops were 16 px, a 1 x 1 bottleneck at depth 4,
    which batch norm refuses; tiny patches in batches of 1 are refused with a message."""
    image, labels = synthetic.nuclei((20, 20), n=2, seed=1)
    model = tiny_model("same", depth=4)
    cfg = _cfg(steps=2, patch_size=32, batch_size=2, adapt_norm=True, val_every=0)
    assert train(model, [image], [labels], config=cfg).info.provenance["steps"] == 2
    with pytest.raises(ValueError, match="batches of 1 leave batch norm one value"):
        train(model, [image], [labels], config=_cfg(steps=2, patch_size=16, batch_size=1))


def test_channel_last_images_train_as_they_segment(data):
    from napari_unet.core.training import normalized_plane

    model = tiny_model("same", depth=2, channels=2)
    rng = np.random.default_rng(0)
    cyx = rng.random((2, 40, 48), dtype=np.float32)
    yxc = np.moveaxis(cyx, 0, -1)
    np.testing.assert_array_equal(normalized_plane(model, yxc), normalized_plane(model, cyx))
    with pytest.raises(ValueError, match="image 0: the image is empty"):
        normalized_plane(tiny_model("same"), np.zeros((0, 5), np.float32), "image 0")
    with pytest.raises(ValueError, match="train on 2D planes"):
        normalized_plane(tiny_model("same"), np.zeros((3, 20, 20), np.float32))
    # (1, Y, X) and (Y, X, 1): one plane of a one-channel image, as the message says
    gray = rng.random((20, 24), dtype=np.float32)
    one = normalized_plane(tiny_model("same"), gray)
    for shaped in (gray[None], gray[..., None]):
        np.testing.assert_array_equal(normalized_plane(tiny_model("same"), shaped), one)
    # ... and their labels may be (1, Y, X) or (Y, X, 1) too
    from napari_unet.core.training import prepare

    labels = (gray > 0.5).astype(np.uint8)
    cfg = _cfg(steps=1, patch_size=16)
    for img, lab in ((gray[None], labels[None]), (gray[..., None], labels[..., None])):
        assert prepare(tiny_model("same"), [img], [lab], "classes", cfg)


def test_short_runs_reach_the_learning_rate_and_validation_errors_say_so(data):
    from napari_unet.core.train_step import learning_rate as _lr

    cfg = _cfg(steps=5, warmup=20, lr=1e-3)
    assert max(_lr(cfg, s) for s in range(1, 6)) == pytest.approx(1e-3)
    assert _lr(_cfg(steps=1000, warmup=20, lr=1e-3), 10) == pytest.approx(5e-4)
    image, labels = data
    with pytest.raises(ValueError, match="validation data: the labels are empty"):
        train(
            tiny_model("same"),
            [image],
            [np.where(labels > 0, 2, 1)],  # painted: background and interior
            "sparse",
            config=_cfg(steps=2),
            val_images=[image],
            val_labels=[np.zeros_like(labels)],  # nothing painted
        )


def test_a_0_255_mask_is_told_how_to_become_classes_or_instances():
    """ISBI's labels are 0 / 255: as classes, as strokes and as instances, each message
    sent the user to another kind that failed or trained one object."""
    from napari_unet.core.targets import sequential_instances, to_target

    mask = np.zeros((20, 20), np.uint8)
    mask[2:8, 2:8] = mask[12:18, 12:18] = 255
    for kind in ("classes", "sparse"):
        with pytest.raises(
            ValueError, match="a binary mask of 0 and 255.*as 0 / 1 \\(mask > 0\\)"
        ):
            to_target(mask, kind, 2)
    with pytest.warns(UserWarning, match="scipy.ndimage.label\\(mask > 0\\).*as 0 / 1"):
        sequential_instances(mask)


def test_a_config_is_rebuilt_from_its_own_dict():
    """TrainConfig(**cfg.to_dict()) (a model's provenance has that form) kept augment a
    dict, and the first training step failed on 'dict' object has no attribute 'elastic'."""
    from napari_unet.core.augment import AugmentConfig
    from napari_unet.core.training import TrainConfig

    cfg = TrainConfig.finetune(steps=7, augment=AugmentConfig(elastic=0.3, intensity=0.1))
    again = TrainConfig(**cfg.to_dict())
    assert again == cfg and isinstance(again.augment, AugmentConfig)
    with pytest.raises(ValueError, match="unknown augmentation setting"):
        TrainConfig(augment={"flip": True})
    with pytest.raises(ValueError, match="augment must be"):
        TrainConfig(augment=0.5)


def test_warped_weights_stay_with_their_labels():
    """Under elastic deformation and zoom the labels were taken from the nearest pixel and
    the weights interpolated: a painted pixel beside unpainted ones lost up to half its
    weight (found by review)."""
    _, lab = synthetic.nuclei((64, 64), n=6, seed=1)
    strokes = synthetic.strokes(instances_to_classes(lab), 200, seed=0).astype(np.int64) - 1
    class_w = np.array([1.0, 2.0, 4.0], np.float32)
    weights = np.where(strokes >= 0, class_w[np.clip(strokes, 0, None)], 0).astype(np.float32)
    image = np.random.default_rng(0).random((1, 64, 64)).astype(np.float32)
    cfg = AugmentConfig(intensity=0, noise=0, elastic=1.0, zoom=0.3, rotations=False, flips=False)
    for seed in range(5):
        _, t, w = augment(image, strokes, weights, np.random.default_rng(seed), cfg)
        painted = t >= 0
        assert painted.sum() > 50
        np.testing.assert_array_equal(w[painted], class_w[t[painted]])


def test_a_stop_after_beyond_what_the_time_budget_holds_ends_with_the_budget(data):
    """It was refused after all the setup, naming a step count never given (review)."""
    image, labels = data
    cfg = _cfg(steps=5000, max_seconds=1.0, stop_after=4000, patch_size=32, batch_size=1)
    result = train(tiny_model("same", depth=2), [image], [labels], "instances", cfg)
    made = result.info.provenance["steps"]
    assert 1 <= made <= result.info.provenance["train_config"]["steps"] < 4000


def test_images_are_drawn_by_their_objects_when_asked():
    from napari_unet.core.samples import PatchSampler

    dense, sparse = np.zeros((96, 96), np.int32), np.zeros((96, 96), np.int32)
    for k in range(9):  # nine small nuclei against one large one, same image size
        y, x = divmod(k, 3)
        dense[8 + 30 * y : 20 + 30 * y, 8 + 30 * x : 20 + 30 * x] = k + 1
    sparse[20:70, 20:70] = 1
    images = [(m > 0).astype(np.float32) for m in (dense, sparse)]
    model = tiny_model("same")
    draws = {}
    for how in ("pixels", "objects"):
        cfg = _cfg(border_w0=0, draw_images=how)
        samples = prepare(model, images, [dense, sparse], "instances", cfg)
        assert [s.objects for s in samples] == [9, 1]
        sampler = PatchSampler(samples, model, cfg, np.random.default_rng(0))
        draws[how] = sampler.p_image
    np.testing.assert_allclose(draws["pixels"], [0.5, 0.5])  # all pixels annotated alike
    np.testing.assert_allclose(draws["objects"], [0.9, 0.1])
    # an image of background only is still drawn, as one object
    empty = np.zeros_like(dense)
    cfg = _cfg(border_w0=0, draw_images="objects")
    samples = prepare(model, images + [images[0] * 0], [dense, sparse, empty], "instances", cfg)
    np.testing.assert_allclose(
        PatchSampler(samples, model, cfg, np.random.default_rng(0)).p_image,
        [9 / 11, 1 / 11, 1 / 11],
    )
    with pytest.raises(ValueError, match="counts the objects of instance labels"):
        prepare(model, images, [dense > 0, sparse > 0], "classes", cfg)
    with pytest.raises(ValueError, match="draw_images must be"):
        _cfg(draw_images="nuclei")


def test_a_checkpoint_never_overwrites_the_base_model_and_a_failed_one_loses_no_run(
    data, tmp_path
):
    from napari_unet.io.files import save_model

    image, labels = data
    base_file = tmp_path / "base.safetensors"
    save_model(tiny_model("same", depth=2), base_file)
    before = base_file.read_bytes()
    base = load_model(base_file)
    # refused before the first step, the base file as it was
    with pytest.raises(ValueError, match="checkpoint: .*one of the inputs"):
        next(train_iter(base, [image], [labels], "instances", _cfg(checkpoint=str(base_file))))
    assert base_file.read_bytes() == before
    with pytest.raises(ValueError, match="checkpoint: nuclei.safetensors is a bundled model"):
        ckpt = str(load_model("nuclei").info.source)
        next(train_iter(base, [image], [labels], "instances", _cfg(checkpoint=ckpt)))
    blocked = tmp_path / "a file"
    blocked.write_text("")
    with pytest.raises(ValueError, match="checkpoint: cannot write"):
        ckpt = str(blocked / "ck.safetensors")
        next(train_iter(base, [image], [labels], "instances", _cfg(checkpoint=ckpt)))
    # a checkpoint that cannot be written mid-run (its folder gone): said, the run goes on
    folder = tmp_path / "ck"
    cfg = _cfg(steps=4, val_every=0, checkpoint=str(folder / "ck.safetensors"), checkpoint_every=2)
    gen = train_iter(base, [image], [labels], "instances", cfg)
    next(gen)
    folder.rmdir()
    folder.write_text("")  # (a file where the folder was)
    with pytest.warns(RuntimeWarning, match="checkpoint at step 2 could not be written"):
        reports = list(gen)
    assert reports[-1].step == 4
