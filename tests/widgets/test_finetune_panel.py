"""Fine-tune panel under Xvfb: annotation layers, training, stop, cancel, versions."""

import numpy as np
import pytest
import torch

from conftest import plugin_viewer, tiny_model
from napari_unet._widgets._layers import viewer_camera
from napari_unet.core import synthetic
from napari_unet.core.targets import instances_to_classes

pytest.importorskip("napari")


@pytest.fixture(scope="module")
def nuclei():
    image, labels = synthetic.nuclei((96, 96), n=10, seed=2)
    strokes = synthetic.strokes(instances_to_classes(labels), 120, seed=0)
    return image, strokes


@pytest.fixture
def panel(make_napari_viewer, qtbot):
    from napari_unet._widgets._state import state_for
    from napari_unet._widgets.finetune import FinetunePanel

    viewer = make_napari_viewer()
    state = state_for(viewer)
    state.model = tiny_model("same", depth=2)
    state.device = "cpu"
    widget = FinetunePanel(plugin_viewer(viewer))  # as the Plugins menu opens it
    viewer.window.add_dock_widget(widget)
    widget.settings.patch_spin.setValue(64)
    widget.settings.steps_spin.setValue(20)
    widget.preview_spin.setValue(10)
    return viewer, widget, state


def _painted(viewer, widget, image, strokes):
    """The image chosen in the panel, with the strokes on a new annotation layer."""
    src = viewer.add_image(image, name="img")
    widget.layer_combo.setCurrentText("img")
    ann = widget.new_annotation_layer()
    ann.data = strokes.copy()
    return src, ann


def _train(qtbot, widget, timeout=60000):
    widget._on_run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


def _save_a_trained_v1(qtbot, viewer, widget, state, nuclei, path):
    """Strokes painted, a run trained (unet-v1, unsaved), then saved to ``path``: the
    save is started, not waited for."""
    image, strokes = nuclei
    _painted(viewer, widget, image, strokes)
    widget.preview_spin.setValue(0)
    _train(qtbot, widget)
    assert state.unsaved == ["unet-v1"]
    widget.version_list.setCurrentRow(1)
    widget._on_save(str(path))


def test_annotation_layer_has_class_names_and_colours(panel, nuclei):
    viewer, widget, _ = panel
    image, _ = nuclei
    viewer.add_image(image, name="img", scale=(0.5, 0.5), translate=(3, 4))
    widget.layer_combo.setCurrentText("img")
    ann = widget.new_annotation_layer()
    assert ann.data.shape == image.shape and not ann.data.any()
    assert list(ann.features["class"]) == ["not annotated", "background", "interior", "boundary"]
    assert tuple(ann.scale) == (0.5, 0.5) and tuple(ann.translate) == (3, 4)
    assert ann.metadata["napari_unet_annotates"] == "img"
    assert ann.mode == "paint"
    colors = [tuple(np.round(ann.colormap.map(k), 3)) for k in (1, 2, 3)]
    assert len(set(colors)) == 3
    assert ann.colormap.map(0)[3] == 0  # not annotated is transparent
    assert widget.new_annotation_layer().name == "img annotations 2"


def test_empty_and_single_class_annotations_are_refused(panel, nuclei, qtbot):
    viewer, widget, state = panel
    viewer.add_image(nuclei[0], name="img")
    widget.layer_combo.setCurrentText("img")
    widget._on_run()
    assert "no annotation layer" in widget.status.text()
    ann = widget.new_annotation_layer()
    # the paint is read and checked in the worker (large stacks never block the GUI)
    widget._on_run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10000)
    assert "nothing is painted" in widget.status.text()
    ann.data[5:10, 5:10] = 1
    widget._on_run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10000)
    assert "only 'background' is painted" in widget.status.text()
    assert len(widget.versions.versions) == 1 and widget.run_button.isEnabled()


def test_train_adds_a_version_previews_and_leaves_base_and_layers_alone(panel, nuclei, qtbot):
    viewer, widget, state = panel
    image, strokes = nuclei
    src, ann = _painted(viewer, widget, image.copy(), strokes)
    base = state.model
    weights = {k: v.clone() for k, v in base.net.state_dict().items()}
    _train(qtbot, widget)
    assert len(widget.versions.versions) == 2
    v1 = widget.versions.versions[1]
    assert state.model is v1.model and state.model.info.name == "unet-v1"
    assert v1.details["steps"] == 20 and not v1.details["stopped"]
    names = ["background", "interior", "boundary"]
    assert v1.details["painted"] == {c: int((strokes == k + 1).sum()) for k, c in enumerate(names)}
    assert 0 <= v1.details["accuracy_before"] <= 1 and 0 <= v1.details["accuracy_after"] <= 1
    assert "painted plane" in v1.model.info.provenance["training_data"]
    assert len(widget.loss_plot.losses) == 20
    preview = viewer.layers["img [fine-tune preview]"]
    # the image shows through the preview's background (a blue plane hid it)
    assert preview.colormap.map(1)[3] == 0 and preview.colormap.map(2)[3] == 1
    # the strokes stay on top and selected, in paint mode: the next strokes go into the
    # annotations, not into the preview napari selected as it was added
    order = [layer.name for layer in viewer.layers]
    assert order.index("img") < order.index(preview.name) < order.index(ann.name)
    assert viewer.layers.selection.active is ann and ann.mode == "paint"
    assert preview not in viewer.layers.selection
    # the image renamed since: a new preview takes its name now and lies just above it
    from napari_unet.core.finetune import Preview

    src.name = "renamed"
    viewer.layers.remove(preview)
    widget._show_preview(Preview(20, np.ones(image.shape, np.uint8)))
    order = [layer.name for layer in viewer.layers]
    assert order[order.index("renamed") + 1] == "renamed [fine-tune preview]", order
    src.name = "img"
    # the field of view (here the whole 96 x 96 image) of the current plane
    assert preview.data.shape == image.shape and set(np.unique(preview.data)) <= {1, 2, 3}
    # zoomed in: only the visible region is previewed, placed where it is
    viewer_camera(viewer).zoom *= 8
    viewer_camera(viewer).center = (20, 30)
    job = widget._preview_region(src, state.model)
    y0, y1, x0, x1 = job.region
    assert y1 - y0 < 96 and x1 - x0 < 96 and y0 <= 20 < y1 and x0 <= 30 < x1
    assert job.translate == (y0, x0)
    np.testing.assert_array_equal(src.data, image)
    np.testing.assert_array_equal(ann.data, strokes)
    for k, v in base.net.state_dict().items():
        assert torch.equal(v, weights[k]), k
    # revert goes back to the base; "use selected" picks any version
    widget._on_revert()
    assert state.model is base and widget.status.text().startswith("Reverted to v0")
    widget._on_revert()  # the base has no parent: said, not "Reverted to v0" again
    assert state.model is base and "no parent to revert to" in widget.status.text()
    widget.version_list.setCurrentRow(1)
    widget._on_use()
    assert state.model is v1.model


def test_each_image_and_model_gets_its_own_preview_layer(panel):
    # a run on another image (or with another model) wrote into the last preview layer:
    # it moved over that image, under it, and kept the first model's classes
    from napari_unet.core.finetune import Preview

    viewer, widget, state = panel
    rng = np.random.default_rng(0)
    a = viewer.add_image(rng.random((40, 48)).astype(np.float32), name="a")
    b = viewer.add_image(
        rng.random((3, 30, 36)).astype(np.float32), name="b", translate=(0, 300, 0)
    )

    def show(image, value):
        job = widget._preview_job = widget._preview_region(image, state.model)
        widget._preview_source = widget.source_of(image)
        widget._show_preview(Preview(1, np.full(job.output_shape(), value, np.uint8)))

    show(a, 1)
    show(b, 2)
    pa, pb = viewer.layers["a [fine-tune preview]"], viewer.layers["b [fine-tune preview]"]
    assert pa.data.shape == (40, 48) and (pa.data == 1).all()
    assert pb.data.ndim == 3 and tuple(pb.translate)[1] == 300 and (pb.data == 2).all()
    order = [layer.name for layer in viewer.layers]
    assert order.index("a") + 1 == order.index(pa.name) and order[-1] == pb.name
    show(a, 3)  # the same image and model: its layer is updated
    assert (pa.data == 3).all() and len(viewer.layers) == 4
    state.model = tiny_model("same", depth=2, classes=2)
    show(a, 1)
    other = viewer.layers["a [fine-tune preview] [1]"]
    assert list(other.features["class"]) == ["-", "background", "interior"]
    assert (pa.data == 3).all()


def test_previews_never_write_into_an_edited_or_paired_preview_layer(panel, nuclei, qtbot):
    viewer, widget, _ = panel
    image, strokes = nuclei
    _painted(viewer, widget, image, strokes)
    _train(qtbot, widget)
    first = viewer.layers["img [fine-tune preview]"]
    first.data[0:4, 0:4] = 3  # the user corrects the preview, to train on it
    first.events.data(value=first.data)
    corrected = first.data.copy()
    _train(qtbot, widget)
    np.testing.assert_array_equal(first.data, corrected)
    second = viewer.layers["img [fine-tune preview] [1]"]
    # the panel's own (unedited) preview layer is updated, not multiplied
    _train(qtbot, widget)
    assert viewer.layers["img [fine-tune preview] [1]"] is second
    assert "img [fine-tune preview] [2]" not in viewer.layers
    # paired as annotations: not written into either
    viewer.layers.selection.active = second
    widget.use_selected_labels()
    before = second.data.copy()
    _train(qtbot, widget)
    np.testing.assert_array_equal(second.data, before)


def test_stop_keeps_cancel_discards(panel, nuclei, qtbot):
    viewer, widget, state = panel
    image, strokes = nuclei
    _painted(viewer, widget, image, strokes)
    widget.settings.steps_spin.setValue(5000)
    widget.preview_spin.setValue(0)
    base = state.model
    widget._on_run()
    qtbot.waitUntil(lambda: len(widget.loss_plot.losses) >= 3, timeout=30000)
    # greyed out while it trains: they were ignored, and said so in a line the run's
    # progress wrote over at once
    assert not widget.save_button.isEnabled() and not widget.fill_button.isEnabled()
    widget._on_cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert widget.save_button.isEnabled() and widget.fill_button.isEnabled()
    assert len(widget.versions.versions) == 1 and state.model is base
    assert "discarded" in widget.status.text()
    assert not widget.stop_button.isEnabled() and not widget.pause_button.isEnabled()
    widget._on_stop()  # nothing to stop: the message stays
    assert "discarded" in widget.status.text()
    widget._on_run()
    qtbot.waitUntil(lambda: len(widget.loss_plot.losses) >= 3, timeout=30000)
    widget._on_pause()
    qtbot.waitUntil(lambda: widget.worker.is_paused, timeout=10000)
    n = len(widget.loss_plot.losses)
    qtbot.wait(300)
    assert len(widget.loss_plot.losses) <= n + 1  # at most the step already on its way
    assert widget.status.text().startswith("Paused")  # not overwritten by that step
    widget._on_stop()  # while paused: it resumes, so that the run can end
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert len(widget.versions.versions) == 2
    v1 = widget.versions.versions[1]
    assert v1.details["stopped"] and 3 <= v1.details["steps"] < 5000
    assert state.model is v1.model


def test_stop_or_resume_before_a_pause_takes_effect(panel, nuclei, qtbot):
    """Pause is taken after the step going on: Stop or Resume pressed before then used
    to leave the run paused for good ('Stopping...' with nothing running)."""
    viewer, widget, state = panel
    image, strokes = nuclei
    _painted(viewer, widget, image, strokes)
    widget.settings.steps_spin.setValue(5000)
    widget.preview_spin.setValue(0)
    widget._on_run()
    widget._on_pause()  # still reading the annotations: the pause is pending
    assert widget.status.text().startswith("Pausing")
    widget._on_pause()  # Resume before it took effect
    qtbot.waitUntil(lambda: len(widget.loss_plot.losses) >= 3, timeout=30000)
    assert not widget.worker.is_paused and widget.pause_button.text() == "Pause"
    widget._on_pause()
    widget._on_stop()  # before the pause took effect
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert len(widget.versions.versions) == 2 and widget.versions.versions[1].details["stopped"]
    assert widget.status.text().startswith("Stopped")


def test_loading_another_model_during_training_discards_the_run(panel, nuclei, qtbot):
    viewer, widget, state = panel
    image, strokes = nuclei
    _painted(viewer, widget, image, strokes)
    widget.preview_spin.setValue(0)
    widget._on_run()
    other = tiny_model("same", depth=2, seed=1)
    state.model = other  # e.g. the model panel loads another model
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60000)
    assert state.model is other and len(widget.versions.versions) == 1
    assert widget.versions.base is other and "discarded" in widget.status.text()


def test_loading_another_model_asks_before_unsaved_versions_are_lost(
    panel, nuclei, qtbot, tmp_path
):
    from napari_unet._widgets.model_panel import ModelPanel

    viewer, widget, state = panel
    _save_a_trained_v1(qtbot, viewer, widget, state, nuclei, tmp_path / "v1.safetensors")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert state.unsaved == []
    _train(qtbot, widget)
    assert state.unsaved == ["unet-v2"]
    loader = ModelPanel(plugin_viewer(viewer))
    assert loader.status.text() == "In use: unet-v2"
    loader.model_combo.setCurrentText("nuclei")
    loader._on_run()  # first press: a warning, nothing loaded
    assert loader.worker is None and "unsaved versions (unet-v2)" in loader.status.text()
    assert len(widget.versions.versions) == 3
    loader._on_run()  # second press confirms
    qtbot.waitUntil(lambda: loader.worker is None, timeout=30000)
    assert state.model.info.name == "nuclei" and len(widget.versions.versions) == 1
    assert "unet-v2 are gone" in widget.status.text() and state.unsaved == []


def test_save_version_and_start_from_prediction_on_a_stack(panel, qtbot, tmp_path):
    from napari_unet.core.tiling import predict
    from napari_unet.io import load_model

    viewer, widget, state = panel
    stack = (np.random.default_rng(3).random((3, 40, 48)) * 1000).astype(np.uint16)
    viewer.add_image(stack, name="stack")
    widget.layer_combo.setCurrentText("stack")
    viewer.dims.set_point(0, 1)
    ann = widget.new_annotation_layer()
    ann.data[1, 0:3, 0:3] = 3  # a correction the fill must keep
    widget.start_from_prediction()
    viewer.dims.set_point(0, 2)  # moving on meanwhile: the fill still lands on plane 1
    widget.start_from_prediction()  # refused while the first one runs
    assert "A run is going on" in widget.status.text()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    expected = predict(stack[1], state.model).argmax(0) + 1
    filled = ann.data[1].copy()
    assert (filled[0:3, 0:3] == 3).all()
    np.testing.assert_array_equal(filled[3:], expected[3:])
    assert not ann.data[0].any() and not ann.data[2].any()
    ann.undo()  # the fill is one step of the layer's undo history
    assert (ann.data[1] == 0).sum() == ann.data[1].size - 9 and (ann.data[1, 0:3, 0:3] == 3).all()
    ann.redo()
    np.testing.assert_array_equal(ann.data[1], filled)
    widget.version_list.setCurrentRow(0)
    out = tmp_path / "v0.safetensors"
    widget._on_save(str(out))
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert load_model(out).info.classes == state.model.info.classes
    assert "Saved" in widget.status.text()
    # a bioimage.io package is written in the worker (tracing took seconds on the GUI)
    widget._on_save(str(tmp_path / "v0.zip"))
    assert widget.worker is not None and "Saving" in widget.status.text()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60000)
    assert "Saved" in widget.status.text() and load_model(tmp_path / "v0.zip")
    from napari_unet.io import registry

    widget._on_save(str(registry.bundled_path("nuclei")))
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert "refusing to overwrite the bundled model" in widget.status.text()


def test_the_version_saved_stays_selected(panel, nuclei, qtbot, tmp_path):
    """The list jumped back to the version in use: the next Save wrote that one."""
    viewer, widget, state = panel
    image, strokes = nuclei
    _painted(viewer, widget, image, strokes)
    widget.preview_spin.setValue(0)
    _train(qtbot, widget)
    assert widget.versions.current == 1
    widget.version_list.setCurrentRow(0)
    widget._on_save(str(tmp_path / "base.safetensors"))
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert "Saved v0" in widget.status.text()
    assert widget.version_list.currentRow() == 0 and widget.versions.current == 1


def test_fine_tuning_on_instance_masks_weighs_as_the_base_model_was_trained(panel):
    """'auto' class weights (the default): strokes balanced, instance masks as the base
    model's own training (for the bundled nuclei: sqrt, and weights on the gaps and
    contacts between nuclei)."""
    _, widget, _ = panel
    assert widget.settings.weights_combo.currentText() == "auto"
    assert widget.config().class_weighting is None and widget.config().contact_w0 is None
    widget.settings.weights_combo.setCurrentText("sqrt")
    assert widget.config().class_weighting == "sqrt"


def test_start_from_prediction_leaves_a_layer_of_part_of_the_image_alone(panel, qtbot):
    """It fills the plane shown, whole: into a new annotation layer when the paired ones
    cover part of the image (it was refused: planes of another size)."""
    viewer, widget, _ = panel
    viewer.add_image(np.random.default_rng(3).random((64, 64)).astype(np.float32), name="img")
    widget.layer_combo.setCurrentText("img")
    other = viewer.add_labels(np.zeros((30, 40), np.uint8), name="my labels")
    viewer.layers.selection.active = other
    widget.use_selected_labels()
    assert "It covers image pixels (0, 0) to (29, 39) of (64, 64)" in widget.status.text()
    widget.start_from_prediction()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert not other.data.any()
    filled = viewer.layers["img annotations"]
    assert filled.data.shape == (64, 64) and filled.data.all(), widget.status.text()
    assert "'my labels' covers part of the image: the fill went to a new layer" in (
        widget.status.text()
    )
    widget.kind_combo.setCurrentText("as instance masks")  # (said of its part, not planes)
    viewer.layers.selection.active = other
    widget.use_selected_labels()
    assert "all of it is used, but objects its sides cut" in widget.status.text()


def test_start_from_prediction_into_a_layer_removed_meanwhile(panel, qtbot):
    viewer, widget, _ = panel
    viewer.add_image(np.random.default_rng(3).random((64, 64)).astype(np.float32), name="img")
    widget.layer_combo.setCurrentText("img")
    ann = widget.new_annotation_layer()
    widget.start_from_prediction()
    viewer.layers.remove(ann)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert "was removed meanwhile" in widget.status.text()


class _Reads:
    """An array that records the planes read from it (a file read lazily)."""

    def __init__(self, array) -> None:
        self.array, self.planes = array, []
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, index):
        first = index[0]  # (dask passes the plane's slice, or its index)
        self.planes += range(self.shape[0])[first] if isinstance(first, slice) else [int(first)]
        return self.array[index]


def test_start_from_prediction_into_a_lazily_read_layer_writes_its_plane_only(panel, qtbot):
    """A dask Labels layer (a file read lazily, as napari paints it) is filled in its
    plane: the whole stack was read on the GUI thread and the layer's data replaced by
    that copy. A read-only one is refused before the model runs, and left as it is."""
    import dask.array as da

    viewer, widget, _ = panel
    stack = np.random.default_rng(3).random((4, 48, 48)).astype(np.float32)
    viewer.add_image(stack, name="img")
    widget.layer_combo.setCurrentText("img")
    viewer.dims.set_point(0, 1)
    disk = _Reads(np.zeros((4, 48, 48), np.uint8))
    lazy = da.from_array(disk, chunks=(1, 48, 48), name=False, meta=disk.array[:0])
    labels = viewer.add_labels(lazy, name="lazy")
    viewer.layers.selection.active = labels
    widget.use_selected_labels()
    disk.planes.clear()
    widget.start_from_prediction()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert labels.data is lazy and set(disk.planes) == {1}, widget.status.text()
    assert np.asarray(lazy[1]).all() and not np.asarray(lazy[[0, 2, 3]]).any()
    assert "Written into its dask array, one plane, in memory" in widget.status.text()
    assert not disk.array.any()  # (the array behind it is not written)
    # read-only: refused, said why and what to do
    frozen = np.zeros((4, 48, 48), np.uint8)
    frozen.setflags(write=False)
    viewer.layers.remove(labels)
    labels = viewer.add_labels(frozen, name="frozen")
    viewer.layers.selection.active = labels
    widget.use_selected_labels()
    widget.start_from_prediction()
    assert widget.worker is None and labels.data is frozen and not frozen.any()
    assert widget.status.text().startswith("Not filled: 'frozen' holds a read-only numpy")
    assert "'New annotation layer'" in widget.status.text()
    assert [la.name for la in viewer.layers] == ["img", "frozen"]


def test_start_from_prediction_refuses_a_zarr_layer_opened_read_only(panel, tmp_path):
    zarr = pytest.importorskip("zarr")
    viewer, widget, _ = panel
    viewer.add_image(np.zeros((2, 32, 32), np.float32), name="img")
    widget.layer_combo.setCurrentText("img")
    store = zarr.open(str(tmp_path / "l.zarr"), mode="w", shape=(2, 32, 32), dtype=np.uint8)
    store[:] = 0
    labels = viewer.add_labels(zarr.open(str(tmp_path / "l.zarr"), mode="r"), name="on disk")
    viewer.layers.selection.active = labels
    widget.use_selected_labels()
    widget.start_from_prediction()
    assert widget.worker is None
    assert "'on disk' holds a read-only zarr array" in widget.status.text()


def test_existing_instance_mask_layer_trains_as_dense_classes(panel, qtbot):
    from napari_unet.core.targets import instances_to_classes

    viewer, widget, state = panel
    image, labels = synthetic.nuclei((96, 96), n=10, seed=4)
    viewer.add_image(image, name="img")
    widget.layer_combo.setCurrentText("img")
    masks = viewer.add_labels(labels.copy(), name="ground truth")
    viewer.layers.selection.active = masks
    widget.kind_combo.setCurrentText("as instance masks")
    widget.use_selected_labels()
    assert "instance masks" in widget.status.text()
    planes, _, painted = widget.collect(state.model)
    expected = instances_to_classes(labels) + 1
    np.testing.assert_array_equal(planes[0].annotation, expected)
    assert sum(painted.values()) == labels.size  # dense: every pixel is a target
    widget.settings.steps_spin.setValue(5)
    widget.preview_spin.setValue(0)
    _train(qtbot, widget)
    assert len(widget.versions.versions) == 2
    np.testing.assert_array_equal(masks.data, labels)  # the user's layer is untouched


def test_a_model_with_an_object_size_sees_painted_images_at_that_size(
    panel, nuclei, qtbot, monkeypatch
):
    from napari_unet._widgets import _annotation_controls, finetune
    from napari_unet.core.segment import SegmentOptions, segment_iter
    from napari_unet.core.tiling import run_to_end

    # a random network's objects say little: a fixed diameter instead of "auto"
    assert finetune.diameter_option(tiny_model("same", object_diameter=24.0)) == "auto"
    assert finetune.diameter_option(tiny_model("same")) is None
    fixed = lambda m: 12.0 if m.info.object_diameter else None  # noqa: E731
    monkeypatch.setattr(finetune, "diameter_option", fixed)  # training
    monkeypatch.setattr(_annotation_controls, "diameter_option", fixed)  # the fill
    viewer, widget, state = panel
    image, strokes = nuclei
    state.model = tiny_model("same", depth=2, object_diameter=24.0)
    src, ann = _painted(viewer, widget, image.copy(), strokes)
    _train(qtbot, widget)
    assert len(widget.versions.versions) == 2, widget.status.text()
    assert "planes rescaled x2 to the model's object size" in widget.status.text()
    assert viewer.layers["img [fine-tune preview]"].data.shape == image.shape
    # start from prediction: the segment panel's rescaled answer, in the image's pixels
    widget._on_revert()
    ann.data = np.zeros_like(strokes)
    widget.start_from_prediction()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    options = SegmentOptions(mode="probabilities", diameter=12.0, device="cpu")
    expected = run_to_end(segment_iter(image, state.model, options)).argmax(0) + 1
    np.testing.assert_array_equal(ann.data, expected)
    np.testing.assert_array_equal(src.data, image)


def test_annotations_follow_their_image_when_it_is_renamed(panel, nuclei, qtbot):
    viewer, widget, _ = panel
    image, strokes = nuclei
    src, ann = _painted(viewer, widget, image, strokes)
    src.name = "well B3"
    assert ann.metadata["napari_unet_annotates"] == "well B3"
    assert widget.layer_combo.currentText() == "well B3"
    widget.settings.steps_spin.setValue(3)
    widget.preview_spin.setValue(0)
    _train(qtbot, widget)
    assert len(widget.versions.versions) == 2


def test_rotated_or_sheared_layers_are_refused_not_misplaced(panel, nuclei):
    viewer, widget, _ = panel
    viewer.add_image(nuclei[0], name="tilted", rotate=30)
    widget.layer_combo.setCurrentText("tilted")
    assert widget.new_annotation_layer() is None
    assert "'tilted' is rotated" in widget.status.text()
    viewer.add_image(nuclei[0], name="sheared", shear=[0.3])
    widget.layer_combo.setCurrentText("sheared")
    assert widget.new_annotation_layer() is None
    assert "is sheared" in widget.status.text() and len(viewer.layers) == 2


def test_closing_the_panel_cancels_its_run_and_keeps_the_versions(panel, nuclei, qtbot):
    """napari's close button takes the panel out of its dock (no closeEvent): the run went
    on, and its result later became the viewer's model from a panel no one could see."""
    from napari_unet._widgets.finetune import FinetunePanel
    from napari_unet._widgets.model_panel import ModelPanel

    viewer, widget, state = panel
    image, strokes = nuclei
    _painted(viewer, widget, image, strokes)
    widget.preview_spin.setValue(0)
    _train(qtbot, widget)
    v1 = state.model
    assert v1.info.name == "unet-v1" and state.unsaved == ["unet-v1"]
    widget.settings.seconds_spin.setValue(30)
    widget.settings.steps_spin.setValue(5000)
    widget._on_run()
    assert state.training
    loader = ModelPanel(plugin_viewer(viewer))
    loader.model_combo.setCurrentText("nuclei")
    loader._on_run()  # first press: it asks, the run goes on
    assert loader.worker is None and "fine-tune run is going on" in loader.status.text()
    assert "unsaved versions (unet-v1)" in loader.status.text()
    qtbot.waitUntil(lambda: len(widget.loss_plot.losses) >= 2, timeout=30000)
    worker = widget.worker
    viewer.window.remove_dock_widget(widget)  # what the panel's close button does
    assert worker.abort_requested
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert state.model is v1 and len(state.versions.versions) == 2 and not state.training
    assert [la.name for la in viewer.layers] == ["img", "img annotations"]
    reopened = FinetunePanel(plugin_viewer(viewer))  # the versions are still there
    assert reopened.version_list.count() == 2 and reopened.versions is state.versions
    reopened.version_list.setCurrentRow(0)
    reopened._on_use()
    assert state.model is state.versions.versions[0].model
    assert len(state.versions.versions) == 2  # the closed panel did not start anew


def test_a_save_cannot_be_cancelled_half_way(panel, nuclei, qtbot, tmp_path):
    viewer, widget, state = panel
    widget._on_save(str(tmp_path / "base.safetensors"))
    assert widget.worker is not None and not widget.cancel_button.isEnabled()
    widget._on_cancel()  # nothing to cancel: the file is written, and said to be
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert (tmp_path / "base.safetensors").exists()
    assert widget.status.text().startswith("Saved ")
    assert state.versions.versions[0].saved_to == str(tmp_path / "base.safetensors")


def test_the_save_dialog_s_file_type_gives_a_bare_name_its_suffix(
    panel, qtbot, tmp_path, monkeypatch
):
    import napari_unet._widgets._versions as fmod
    from napari_unet._widgets._versions import with_suffix as _with_suffix

    viewer, widget, state = panel
    chosen = str(tmp_path / "typed"), "bioimage.io package (*.zip)"
    monkeypatch.setattr(fmod.QFileDialog, "getSaveFileName", lambda *a, **k: chosen)
    widget._on_save()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60000)
    assert (tmp_path / "typed.zip").is_file(), widget.status.text()
    assert _with_suffix("/a/m.ZIP", ".safetensors") == "/a/m.zip"
    assert _with_suffix("/a/m.v2", ".safetensors") == "/a/m.v2.safetensors"
    assert _with_suffix("", ".zip") == ""


def test_the_viewer_keeps_the_books_while_the_panel_is_closed(panel, nuclei, qtbot, tmp_path):
    """A save finishing after its panel was closed stayed 'unsaved'; another model loaded
    while the panel was closed left the discarded versions asked about again and again."""
    import gc

    viewer, widget, state = panel
    _save_a_trained_v1(qtbot, viewer, widget, state, nuclei, tmp_path / "v1.safetensors")
    worker = widget.worker
    viewer.window.remove_dock_widget(widget)  # closed while the file is written
    del widget
    gc.collect()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=30000)
    qtbot.waitUntil(lambda: state.unsaved == [], timeout=5000)
    assert state.versions.versions[1].saved_to == str(tmp_path / "v1.safetensors")
    state.versions.versions[1].saved_to = ""  # as if never saved
    state.record_unsaved()
    assert state.unsaved == ["unet-v1"]
    state.model = tiny_model("same", depth=2, seed=3)  # loaded with no fine-tune panel open
    assert state.versions is None and state.unsaved == []


@pytest.mark.parametrize("order", ["ZCYX", "CZYX"])
def test_multichannel_stacks_are_annotated_and_trained_on_the_planes_shown(panel, qtbot, order):
    """The annotation layer lies on the image's planes whatever the channel axis, and
    training reads the image with the axes the segment panel uses."""
    viewer, widget, state = panel
    state.model = tiny_model("same", depth=2, channels=2)
    rng = np.random.default_rng(6)
    zc = rng.random((3, 2, 48, 48)).astype(np.float32)
    data = zc if order == "ZCYX" else zc.transpose(1, 0, 2, 3)
    viewer.add_image(data.copy(), name="img")
    widget.layer_combo.setCurrentText("img")
    ann = widget.new_annotation_layer()
    assert ann.data.shape == ((3, 1, 48, 48) if order == "ZCYX" else (3, 48, 48))
    # painted where the viewer shows z = 2 (at channel 1 for Z, C, Y, X)
    point = (2, 1, 20, 30) if order == "ZCYX" else (1, 2, 20, 30)
    index = tuple(np.round(ann.world_to_data(point)).astype(int))
    assert index[0] == 2 and index[-2:] == (20, 30)
    plane = ann.data[index[:-2]]
    plane[10:20, 10:20], plane[30:40, 30:40] = 1, 2
    ann.refresh()
    planes, _, painted = widget.collect(state.model)
    assert len(planes) == 1 and painted == {"background": 100, "interior": 100}
    np.testing.assert_array_equal(planes[0].image, zc[2])  # (C, Y, X) of plane z = 2
    widget.settings.steps_spin.setValue(3)
    widget.preview_spin.setValue(0)
    _train(qtbot, widget)
    assert state.model.info.name == "unet-v1", widget.status.text()
    np.testing.assert_array_equal(viewer.layers["img"].data, data)


def test_a_failed_start_from_prediction_leaves_no_empty_layer(panel, qtbot):
    viewer, widget, _ = panel
    image = np.random.default_rng(3).random((64, 64)).astype(np.float32)
    image[5, 5] = np.inf
    viewer.add_image(image, name="img")
    widget.layer_combo.setCurrentText("img")
    widget.start_from_prediction()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert "Error" in widget.status.text()
    assert [la.name for la in viewer.layers] == ["img"]
    # a layer the user has keeps existing, painted or not
    ann = widget.new_annotation_layer()
    widget.start_from_prediction()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert ann in viewer.layers


def test_a_version_is_never_saved_over_the_base_model_s_file(panel, nuclei, qtbot, tmp_path):
    from napari_unet.io import load_model, save_model

    viewer, widget, state = panel
    base_file = save_model(tiny_model("same", depth=2), tmp_path / "base.safetensors")
    before = base_file.read_bytes()
    state.model = load_model(base_file)
    image, strokes = nuclei
    _painted(viewer, widget, image, strokes)
    widget.preview_spin.setValue(0)
    _train(qtbot, widget)
    widget.version_list.setCurrentRow(1)
    widget._on_save(str(tmp_path / "." / "base.safetensors"))
    assert widget.worker is None and "never overwritten" in widget.status.text()
    assert base_file.read_bytes() == before


def test_a_fill_of_a_z_c_y_x_image_lands_on_the_plane_shown(panel, qtbot, monkeypatch):
    """In the panel's own layer (Z, 1, Y, X) and in a (Z, Y, X) Labels layer of the
    user's, which napari lines up by its last axes (its planes then follow C)."""
    from napari_unet._widgets import _annotations

    viewer, widget, state = panel
    state.model = tiny_model("same", depth=2, channels=2)
    data = np.random.default_rng(6).random((3, 2, 32, 32)).astype(np.float32)
    viewer.add_image(data, name="img")
    widget.layer_combo.setCurrentText("img")
    viewer.dims.point = (2, 0, 10, 10)  # z = 2, channel 0
    mine = viewer.add_labels(np.zeros((3, 32, 32), np.uint8), name="mine")
    viewer.layers.selection.active = mine
    widget.use_selected_labels()
    monkeypatch.setattr(_annotations, "UNDOABLE_FILL", 10)  # a plane past it: written directly
    widget.start_from_prediction()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert mine.data[2].all() and not mine.data[:2].any(), widget.status.text()
    assert "not in the undo history" in widget.status.text()


def test_annotations_painted_for_other_classes_are_refused(panel, nuclei, qtbot):
    """Strokes painted for background / interior / boundary trained em-membrane's
    membrane / cell without a word (background strokes became membrane)."""
    viewer, widget, state = panel
    image, strokes = nuclei
    _, ann = _painted(viewer, widget, image, strokes)
    state.model = tiny_model("same", depth=2, classes=2, seed=1)
    state.model.info.classes = ["membrane", "cell"]
    widget._on_run()
    assert widget.worker is None
    text = widget.status.text()
    assert "painted for the classes background, interior, boundary" in text
    assert "membrane, cell" in text
    # a fill for the new model makes its own layer, and leaves the old one as it was
    before = ann.data.copy()
    widget.start_from_prediction()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    np.testing.assert_array_equal(ann.data, before)
    made = widget.annotation_layers("img")[-1]
    assert made is not ann and list(made.features["class"])[1:] == ["membrane", "cell"]
    assert set(np.unique(made.data)) <= {1, 2}


def test_a_class_labels_result_trains_the_classes_it_shows(panel):
    """The segment panel's class labels are class + 1, like annotation layers: paired
    as painted classes, they teach the classes they show (they were one class off)."""
    from napari_unet._widgets._layers import job_for_layer
    from napari_unet._widgets._results import add_or_update

    viewer, widget, state = panel
    rng = np.random.default_rng(7)
    src = viewer.add_image(rng.random((48, 48)).astype(np.float32), name="img")
    widget.layer_combo.setCurrentText("img")
    classes = rng.integers(0, 3, (48, 48)).astype(np.uint8)  # as segment_iter's labels
    job = job_for_layer(src, state.model, viewer)
    names, _ = add_or_update(viewer, job, state.model, "labels", classes)
    result = viewer.layers[names[0]]
    np.testing.assert_array_equal(result.data, classes + 1)
    assert list(result.features["class"]) == ["-", "background", "interior", "boundary"]
    assert result.colormap.map(np.array([1]))[0][3] > 0  # the first class is drawn
    viewer.layers.selection.active = result
    widget.use_selected_labels()
    _, _, painted = widget.collect(state.model)
    counts = np.bincount(classes.ravel(), minlength=3)
    assert [painted.get(c, 0) for c in ("background", "interior", "boundary")] == list(counts)


def test_a_run_cut_short_by_its_budget_says_so():
    """A 10 s budget made 5 of 6 planned steps and said 'Done' as if all were made."""
    from napari_unet._widgets.finetune import _short_of_plan
    from napari_unet.core.finetune import Finished

    model = tiny_model("same")
    cut = Finished(model, 0.5, 0.6, steps=5, seconds=13.0, stopped=False, planned=6)
    assert "ran out after 5 of the 6 steps planned" in _short_of_plan(cut)
    for done in (
        Finished(model, 0.5, 0.6, steps=6, seconds=9.0, stopped=False, planned=6),
        Finished(model, 0.5, 0.6, steps=3, seconds=4.0, stopped=True, planned=6),  # Stop
    ):
        assert _short_of_plan(done) == ""


def test_stop_before_the_first_step_keeps_nothing_and_says_so(panel, nuclei, qtbot):
    viewer, widget, state = panel
    image, strokes = nuclei
    _painted(viewer, widget, image, strokes)
    widget.preview_spin.setValue(0)
    base = state.model
    widget._on_run()
    widget._on_stop()  # while the annotations are read and checked
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert len(widget.versions.versions) == 1 and state.model is base
    assert widget.status.text() == (
        "Stopped before the first training step: nothing was learned; "
        "the current version is unchanged."
    )


def test_a_labels_result_updated_in_place_names_the_new_model_s_classes(panel):
    """Another model of the same name with other classes updated the layer's labels
    but left the old class names (hover, and the class check of fine-tuning)."""
    from napari_unet._widgets._layers import job_for_layer
    from napari_unet._widgets._results import add_or_update

    viewer, widget, state = panel
    src = viewer.add_image(np.zeros((32, 32), np.float32), name="img")
    first = tiny_model("same", depth=2)
    add_or_update(viewer, job_for_layer(src, first, viewer), first, "labels", np.zeros((32, 32)))
    other = tiny_model("same", depth=2, classes=2, seed=1)
    other.info.classes = ["background", "membrane"]
    names, _ = add_or_update(
        viewer, job_for_layer(src, other, viewer), other, "labels", np.ones((32, 32))
    )
    layer = viewer.layers[names[0]]
    assert names == ["img [unet labels]"] and len(viewer.layers) == 2  # updated in place
    assert list(layer.features["class"]) == ["-", "background", "membrane"]
    assert (layer.data == 2).all() and layer.colormap.map(np.array([2]))[0][3] > 0


def test_the_loss_plot_starts_empty_and_is_cleared_for_a_new_run(qtbot):
    from napari_unet._widgets._loss_plot import LossPlot

    plot = LossPlot(min_interval=0.0)
    assert plot._ax.get_xlim() == (0, 10) and plot._ax.get_ylim() == (0, 1)
    for step in range(1, 30):
        plot.add(step, 1.0 / step)
    assert len(plot._line.get_xdata()) == 29 and plot._ax.get_xlim()[1] > 10
    plot.reset()
    assert len(plot._line.get_xdata()) == 0 and plot._ax.get_xlim() == (0, 10)


def test_a_layer_that_cannot_train_is_left_out_and_the_others_train(panel, nuclei, qtbot):
    """The advice 'paint on a new annotation layer' did not unblock Train: the old layer,
    painted for other classes, refused every run until the user deleted it."""
    viewer, widget, state = panel
    image, strokes = nuclei
    _, old = _painted(viewer, widget, image, strokes)
    state.model = tiny_model("same", depth=2, classes=2, seed=1)
    state.model.info.classes = ["membrane", "cell"]
    widget._on_run()
    assert widget.worker is None and "painted for the classes" in widget.status.text()
    new = widget.new_annotation_layer()
    new.data = np.clip(strokes, 0, 2)  # membrane / cell strokes for this model
    widget.settings.steps_spin.setValue(3)
    widget.preview_spin.setValue(0)
    texts, set_text = [], widget.status.setText
    widget.status.setText = lambda text: (texts.append(text), set_text(text))
    _train(qtbot, widget)
    assert len(widget.versions.versions) == 2, widget.status.text()
    assert any("left out: 'img annotations' was painted for the classes" in t for t in texts)
    assert "Left out: 'img annotations' was painted for the classes" in widget.status.text()
    np.testing.assert_array_equal(old.data, strokes)  # left as it was
    # an image rotated since its layer was painted, or replaced by one of another size:
    # its layer is left out, the others train
    other = viewer.add_image(image, name="other")
    widget.layer_combo.setCurrentText("other")
    widget.new_annotation_layer().data = np.clip(strokes, 0, 2)
    other.rotate = 30
    _train(qtbot, widget)
    assert len(widget.versions.versions) == 3, widget.status.text()
    assert "'other annotations' annotates 'other': layer 'other' is rotated" in (
        widget.status.text()
    )
    other.rotate = 0
    other.data = image[:50]
    _train(qtbot, widget)
    assert len(widget.versions.versions) == 4, widget.status.text()
    assert "'other annotations' reaches beyond 'other' (its (96, 96) pixels" in (
        widget.status.text()
    )
    viewer.layers.remove(other)  # and replaced by another kind of layer
    viewer.add_points(np.zeros((3, 2)), name="other")
    _train(qtbot, widget)
    assert len(widget.versions.versions) == 5, widget.status.text()
    assert "'other annotations' belongs to image 'other', now not an image layer" in (
        widget.status.text()
    )


def test_labels_that_do_not_lie_on_the_image_are_not_paired_nor_trained(panel, nuclei):
    """A Labels layer of the image's shape but another scale / translate trained its pixel
    (i, j) against the image's pixel (i, j), which lies elsewhere on screen."""
    viewer, widget, _ = panel
    image, strokes = nuclei
    viewer.add_image(image, name="img", scale=(0.5, 0.5))
    widget.layer_combo.setCurrentText("img")
    mine = viewer.add_labels(strokes.copy(), name="my labels", translate=(10, 10))
    viewer.layers.selection.active = mine
    widget.use_selected_labels()
    assert "Not paired: 'my labels' does not lie on 'img'" in widget.status.text()
    assert "napari_unet_annotates" not in mine.metadata
    # napari draws layers in other units at their size: 500 nm pixels lie on 0.5 um ones
    viewer.layers["img"].units = ("um", "um")
    in_nm = viewer.add_labels(strokes.copy(), name="in nm", scale=(500, 500), units=("nm", "nm"))
    viewer.layers.selection.active = in_nm
    widget.use_selected_labels()
    assert "'in nm' annotates 'img'" in widget.status.text()
    in_nm.scale = (0.5, 0.5)  # 0.5 nm: a thousand times too small
    viewer.layers.selection.active = in_nm
    widget.use_selected_labels()
    assert "Not paired: 'in nm' does not lie on 'img'" in widget.status.text()
    viewer.layers.remove(in_nm)
    # an annotation layer whose image is moved after it was made: refused at Train
    ann = widget.new_annotation_layer()
    ann.data = strokes.copy()
    viewer.layers["img"].translate = (5, 0)  # 10 pixels down: its top rows lie above
    widget._on_run()
    assert widget.worker is None
    assert "'img annotations' reaches beyond 'img'" in widget.status.text()
    viewer.layers["img"].translate = (5.25, 0)  # between the image's pixels
    widget._on_run()
    assert "'img annotations' does not lie on 'img'" in widget.status.text()


def test_an_instances_result_paired_as_classes_gets_a_hint(panel):
    viewer, widget, _ = panel
    viewer.add_image(np.zeros((32, 32), np.float32), name="img")
    widget.layer_combo.setCurrentText("img")
    objects = viewer.add_labels(
        np.arange(32 * 32).reshape(32, 32) % 7,
        name="img [unet instances]",
        metadata={"napari_unet_result": None},
    )
    viewer.layers.selection.active = objects
    widget.use_selected_labels()
    assert "choose 'as instance masks'" in widget.status.text()
    widget.kind_combo.setCurrentText("as instance masks")
    widget.use_selected_labels()
    assert "choose 'as instance masks'" not in widget.status.text()


def test_strokes_of_a_label_beyond_the_classes_are_drawn_not_hidden(panel, nuclei):
    viewer, widget, _ = panel
    image, strokes = nuclei
    _, ann = _painted(viewer, widget, image, strokes)
    assert ann.colormap.map(4)[3] == 1  # napari's label +1 key paints 4: seen, and erased
    assert ann.colormap.map(0)[3] == 0


def test_a_torchscript_model_is_refused_before_any_work(panel, nuclei):
    from napari_unet.model.info import LoadedModel

    viewer, widget, state = panel
    image, strokes = nuclei
    _painted(viewer, widget, image, strokes)
    model = tiny_model("same", depth=2)
    state.model = LoadedModel(torch.jit.trace(model.net, torch.zeros(1, 1, 32, 32)), model.info)
    widget._on_run()
    assert widget.worker is None
    assert "only napari-unet U-Nets can be trained" in widget.status.text()


def test_a_view_without_a_plane_of_the_image_trains_without_previews(panel, nuclei, qtbot):
    # a Y-Z view (axes rolled): Train was refused, naming the segment panel's options
    viewer, widget, _ = panel
    image, strokes = nuclei
    viewer.add_image(np.stack([image, image]), name="img")
    widget.layer_combo.setCurrentText("img")
    ann = widget.new_annotation_layer()
    painted = np.zeros(ann.data.shape, ann.data.dtype)
    painted[1] = strokes
    ann.data = painted
    viewer.dims.order = (1, 0, 2)
    _train(qtbot, widget)
    assert len(widget.versions.versions) == 2, widget.status.text()
    assert "Left out: previews (the view shows no plane of the image)" in widget.status.text()
    assert "img [fine-tune preview]" not in viewer.layers


def test_a_partial_result_annotates_the_pixels_it_lies_on(panel, nuclei, qtbot):
    """A corrected 'Visible region only' or 'Current plane only' result trains on the
    image's pixels under it (it was refused: segment the whole image first); labels
    that reach beyond the image or lie between its pixels are refused when paired."""
    from napari_unet.core.painted import collect_planes

    viewer, widget, state = panel
    image, strokes = nuclei  # 96 x 96
    viewer.add_image(np.stack([image, image[::-1], image.T]), name="img", scale=(1, 0.5, 0.5))
    widget.layer_combo.setCurrentText("img")
    refused = {
        "larger": dict(data=np.zeros((3, 100, 96), np.uint8), scale=(1, 0.5, 0.5)),
        "shifted": dict(
            data=np.zeros((3, 96, 96), np.uint8), scale=(1, 0.5, 0.5), translate=(0, 2.5, 0)
        ),
        "between": dict(
            data=np.zeros((3, 96, 96), np.uint8), scale=(1, 0.5, 0.5), translate=(0, 1.25, 0)
        ),
    }
    said = {}
    for name, kw in refused.items():
        viewer.layers.selection.active = viewer.add_labels(name=name, **kw)
        widget.use_selected_labels()
        said[name] = widget.status.text()
        why = "does not lie on 'img'" if name == "between" else "reaches beyond 'img'"
        assert f"Not paired: '{name}' {why}" in said[name], said[name]
        assert "napari_unet_annotates" not in viewer.layers[name].metadata
    assert "its (3, 96, 96) pixels from image pixel (0, 5, 0) on" in said["shifted"]
    # plane 2, rows 10-69, columns 20-79, as the segment panel places such a result
    region = viewer.add_labels(
        strokes[None, 10:70, 20:80].astype(np.int32),
        name="img [unet labels]",
        scale=(1, 0.5, 0.5),
        translate=(2, 5, 10),
        metadata={"napari_unet_result": None},
    )
    viewer.layers.selection.active = region
    widget.use_selected_labels()
    text = widget.status.text()
    assert "'img [unet labels]' annotates 'img'" in text
    assert "It covers image pixels (2, 10, 20) to (2, 69, 79) of (3, 96, 96)" in text
    pairs = widget.annotation_pairs(state.model)
    assert len(pairs) == 1 and pairs[0][5] == (2, 10, 20)
    (plane,), _, _ = collect_planes(state.model, pairs)
    assert plane.source == "img, plane 2"
    np.testing.assert_array_equal(plane.image, image.T)
    np.testing.assert_array_equal(plane.annotation[10:70, 20:80], strokes[10:70, 20:80])
    assert np.count_nonzero(plane.annotation) == np.count_nonzero(strokes[10:70, 20:80])
    widget.preview_spin.setValue(0)
    _train(qtbot, widget)
    assert len(widget.versions.versions) == 2, widget.status.text()


def test_a_preview_that_cannot_be_made_is_said_and_adds_no_layer(panel, monkeypatch):
    import napari.utils.notifications as notifications

    from napari_unet.core.finetune import Preview

    viewer, widget, _ = panel
    said = []
    monkeypatch.setattr(notifications, "show_warning", said.append)
    layers = len(viewer.layers)
    widget._on_yielded(Preview(10, None, "no preview of the plane in view: NaN"))
    assert len(viewer.layers) == layers
    assert said == [
        "napari-unet: no preview of the plane in view: NaN; training goes on without previews"
    ]
