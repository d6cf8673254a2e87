import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import plugin_viewer, tiny_model
from napari_unet._widgets._layers import job_for_layer, viewer_camera
from napari_unet._widgets._results import RUN_KEY
from napari_unet.core.axes import resolve_axes
from napari_unet.core.postprocess import instances
from napari_unet.core.tiling import predict

pytest.importorskip("napari")


@pytest.fixture
def panel(make_napari_viewer, qtbot):
    from napari_unet._widgets._state import state_for
    from napari_unet._widgets.segment import SegmentPanel

    viewer = make_napari_viewer()
    state_for(viewer).model = tiny_model("valid")
    widget = SegmentPanel(plugin_viewer(viewer))  # as the Plugins menu opens it
    viewer.window.add_dock_widget(widget)
    return viewer, widget


def _run(qtbot, widget, timeout=30000):
    with qtbot.waitSignal(widget.run_button.clicked, timeout=1000, raising=False):
        pass
    widget._on_run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


@pytest.fixture
def image():
    return (np.random.default_rng(0).random((70, 90)) * 1000).astype(np.uint16)


def test_instances_layer_matches_core_and_keeps_source(panel, qtbot, image):
    viewer, widget = panel
    src = viewer.add_image(image.copy(), name="nuclei", scale=(0.5, 0.25), translate=(10, 20))
    widget.layer_combo.setCurrentText("nuclei")
    assert "70 x 90 pixels" in widget.axes_label.text()
    _run(qtbot, widget)
    out = viewer.layers["nuclei [unet instances]"]
    model = tiny_model("valid")
    expected = instances(predict(image, model), model.info.instances, model.info.classes)
    np.testing.assert_array_equal(out.data, expected)
    assert tuple(out.scale) == (0.5, 0.25) and tuple(out.translate) == (10, 20)
    np.testing.assert_array_equal(src.data, image)  # the source is never modified


def test_min_confidence_follows_the_model_and_reaches_the_result(panel, qtbot, image):
    viewer, widget = panel
    assert widget.confidence_spin.value() == 0.0  # the tiny model's recipe has none
    # seeds anywhere: one object over the image, mean confidence ~0.56
    recipe = {"method": "watershed", "seed_threshold": 0.0, "min_confidence": 0.9}
    widget.state.model = tiny_model("valid", instances=recipe)
    assert widget.confidence_spin.value() == 0.9
    viewer.add_image(image, name="img")
    _run(qtbot, widget)
    assert viewer.layers["img [unet instances]"].data.max() == 0  # dropped
    widget.confidence_spin.setValue(0.5)
    _run(qtbot, widget)
    assert viewer.layers["img [unet instances]"].data.max() == 1
    # a fine-tuned version (same recipe) keeps what the user set; another recipe resets it
    widget.state.model = tiny_model("valid", seed=1, instances=recipe, name="unet-v1")
    assert widget.confidence_spin.value() == 0.5
    widget.state.model = tiny_model("valid", instances={**recipe, "min_confidence": 0.7})
    assert widget.confidence_spin.value() == 0.7


def test_probabilities_and_rerun_updates_instead_of_duplicating(panel, qtbot, image):
    viewer, widget = panel
    viewer.add_image(image, name="img")
    widget.mode_combo.setCurrentText("probabilities")
    _run(qtbot, widget)
    names = [layer.name for layer in viewer.layers]
    assert names == ["img", "img [unet background]", "img [unet interior]", "img [unet boundary]"]
    np.testing.assert_allclose(
        viewer.layers["img [unet interior]"].data,
        predict(image, tiny_model("valid"))[1],
        atol=1e-6,
    )
    _run(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == names
    widget.tta_check.setChecked(True)  # mirrored-tile averaging reaches the layers
    _run(qtbot, widget)
    np.testing.assert_allclose(
        viewer.layers["img [unet interior]"].data,
        predict(image, tiny_model("valid"), tta=True)[1],
        atol=5e-5,
    )


def test_stack_current_plane_only_lands_on_its_plane(panel, qtbot):
    viewer, widget = panel
    stack = (np.random.default_rng(1).random((5, 40, 50)) * 100).astype(np.float32)
    viewer.add_image(stack, name="stack", scale=(2.0, 1.0, 1.0))
    viewer.dims.set_point(0, 6.0)  # world z = 6 -> plane 3
    widget.mode_combo.setCurrentText("labels")
    widget.plane_check.setChecked(True)
    assert "Z: 5" in widget._describe() and "current plane only" in widget._describe()
    _run(qtbot, widget)
    out = viewer.layers["stack [unet labels]"]
    assert out.data.shape == (1, 40, 50)
    assert tuple(out.translate) == (6.0, 0.0, 0.0)
    np.testing.assert_array_equal(
        out.data[0], predict(stack[3], tiny_model("valid")).argmax(0) + 1
    )


def test_a_layer_that_is_not_rgb_is_read_as_napari_shows_it(panel, qtbot):
    """napari shows a non-RGB layer's last two axes as Y and X: a (64, 64, 4) stack is
    64 planes of 64 x 4 there, not an RGBA image to refuse."""
    viewer, widget = panel
    data = np.random.default_rng(0).random((6, 40, 4)).astype(np.float32)
    viewer.add_image(data, name="thin", rgb=False)
    assert "40 x 4 pixels; Z: 6 planes" in widget.axes_label.text()
    widget.mode_combo.setCurrentText("labels")
    _run(qtbot, widget)
    assert viewer.layers["thin [unet labels]"].data.shape == (6, 40, 4)


def test_whole_stack_then_a_plane_that_never_replaces_it(panel, qtbot):
    viewer, widget = panel
    stack = np.random.default_rng(1).random((4, 40, 50)).astype(np.float32)
    viewer.add_image(stack, name="stack")
    widget.mode_combo.setCurrentText("labels")
    _run(qtbot, widget)
    whole = viewer.layers["stack [unet labels]"]
    assert "4 planes, processed one by one" in widget.axes_label.text()
    widget.plane_check.setChecked(True)
    _run(qtbot, widget)
    assert whole.data.shape == (4, 40, 50)
    assert viewer.layers["stack [unet labels] [1]"].data.shape == (1, 40, 50)
    assert "another extent" in widget.status.text()
    _run(qtbot, widget)  # the plane result is updated in place, not duplicated
    assert len(viewer.layers) == 3
    # a result paired as fine-tuning annotations is the user's now: never written into
    from napari_unet._widgets._results import ANNOTATION_KEY

    plane = viewer.layers["stack [unet labels] [1]"]
    plane.metadata[ANNOTATION_KEY] = "stack"
    _run(qtbot, widget)
    assert len(viewer.layers) == 4 and plane.metadata[ANNOTATION_KEY] == "stack"


def test_current_plane_in_the_3d_view_keeps_the_volume_on_screen(panel, qtbot):
    """A (T, Z, Y, X) series in 3D: the current time point, with all its Z planes."""
    viewer, widget = panel
    series = np.random.default_rng(2).random((2, 3, 40, 50)).astype(np.float32)
    viewer.add_image(series, name="series")
    viewer.dims.ndisplay = 3
    viewer.dims.set_point(0, 1)
    widget.plane_check.setChecked(True)
    assert "T=1, all Z" in widget.axes_label.text()  # the description follows the box
    widget.mode_combo.setCurrentText("labels")
    _run(qtbot, widget)
    out = viewer.layers["series [unet labels]"]
    assert out.data.shape == (1, 3, 40, 50) and tuple(out.translate)[:2] == (1.0, 0.0)
    np.testing.assert_array_equal(
        out.data[0, 2], predict(series[1, 2], tiny_model("valid")).argmax(0) + 1
    )
    viewer.dims.ndisplay = 2
    viewer.dims.set_point(0, 0)
    assert "T=0, Z=" in widget.axes_label.text()  # and the plane shown


def test_cancel_leaves_no_layer(panel, qtbot):
    viewer, widget = panel
    viewer.add_image(
        np.random.default_rng(3).random((20, 400, 400)).astype(np.float32), name="big"
    )
    widget.tile_spin.setValue(60)
    widget._on_run()
    qtbot.waitUntil(lambda: "tile" in widget.status.text(), timeout=20000)
    widget._on_cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=20000)
    assert [layer.name for layer in viewer.layers] == ["big"]
    assert "Cancelled" in widget.status.text()


def test_result_follows_the_settings_and_model_of_its_run(panel, qtbot):
    viewer, widget = panel
    stack = np.random.default_rng(4).random((6, 200, 200)).astype(np.float32)
    viewer.add_image(stack, name="stack")
    widget.mode_combo.setCurrentText("labels")
    widget.tile_spin.setValue(60)
    model = widget.state.model
    widget._on_run()
    qtbot.waitUntil(lambda: "tile" in widget.status.text(), timeout=20000)
    # changed while it runs: neither the output kind nor the model of this run change
    widget.mode_combo.setCurrentText("probabilities")
    widget.state.model = tiny_model("same")
    widget._on_run()  # a second run is refused while the first goes on
    assert "A run is going on" in widget.status.text()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60000)
    assert [layer.name for layer in viewer.layers] == ["stack", "stack [unet labels]"]
    out = viewer.layers["stack [unet labels]"].data
    np.testing.assert_array_equal(out[2], predict(stack[2], model).argmax(0) + 1)


@pytest.mark.parametrize(
    "data, message",
    [
        (np.array([[np.nan, 1.0], [1.0, 1.0]] * 4, np.float32), "NaN"),
        (np.zeros((1, 1), np.float32), None),
    ],
)
def test_bad_and_tiny_images(panel, qtbot, data, message):
    viewer, widget = panel
    viewer.add_image(data, name="x")
    widget.mode_combo.setCurrentText("labels")
    _run(qtbot, widget)
    if message:
        assert message in widget.status.text()
        assert [layer.name for layer in viewer.layers] == ["x"]
    else:
        assert viewer.layers["x [unet labels]"].data.shape == (1, 1)


def test_wrong_channel_count_is_explained(make_napari_viewer):
    from napari_unet._widgets._state import state_for
    from napari_unet._widgets.segment import SegmentPanel

    viewer = make_napari_viewer()
    state_for(viewer).model = tiny_model("same", channels=2)
    widget = SegmentPanel(viewer)
    viewer.add_image(np.zeros((5, 30, 30), np.float32), name="three")
    assert "the model takes 2 channels, and no axis" in widget._describe()
    widget._on_run()
    assert "the model takes 2 channels, and no axis" in widget.status.text()
    assert len(viewer.layers) == 1
    # channels last, not RGB: napari shows 30 x 2 as the image, so it is refused, not
    # answered with results lying on the image's X and channel axes
    viewer.add_image(np.zeros((30, 30, 2), np.float32), name="yxc")
    widget.layer_combo.setCurrentText("yxc")
    assert "its last two axes (30 x 2)" in widget._describe()


def test_rgb_layer_is_converted_to_gray(panel, qtbot):
    viewer, widget = panel
    rgb = (np.random.default_rng(4).random((40, 40, 3)) * 255).astype(np.uint8)
    viewer.add_image(rgb, name="rgb", rgb=True)
    widget.mode_combo.setCurrentText("labels")
    assert "RGB converted to grayscale" in widget._describe()
    _run(qtbot, widget)
    gray = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_array_equal(
        viewer.layers["rgb [unet labels]"].data, predict(gray, tiny_model("valid")).argmax(0) + 1
    )
    # a stack: nothing is converted until the worker reads a plane
    from napari_unet._widgets._layers import job_for_layer

    movie = np.random.default_rng(5).integers(0, 255, (50, 64, 64, 3), np.uint8)
    job = job_for_layer(viewer.add_image(movie, name="movie", rgb=True), widget.state.model)
    assert hasattr(job.data, "dask") and job.data.shape == (50, 64, 64)
    np.testing.assert_allclose(
        np.asarray(job.data[7]), movie[7].astype(np.float32) @ [0.299, 0.587, 0.114], rtol=1e-5
    )
    # nor copied: dask copies a numpy array it wraps (a second copy of a large RGB stack,
    # made on the GUI thread), so a change to the layer's array shows in the job's planes
    movie[7] = 0
    assert not np.asarray(job.data[7]).any()


def test_viewer_stays_responsive_during_prediction(panel, qtbot):
    from qtpy.QtCore import QTimer

    viewer, widget = panel
    viewer.add_image(
        np.random.default_rng(5).random((12, 300, 300)).astype(np.float32), name="stack"
    )
    widget.mode_combo.setCurrentText("labels")
    widget.tile_spin.setValue(100)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    start = time.perf_counter()
    widget._on_run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120000)
    timer.stop()
    duration = time.perf_counter() - start
    stall = float(np.max(np.diff(ticks))) if len(ticks) > 1 else duration
    print(f"\nprediction {duration:.2f} s, longest event-loop stall {stall * 1000:.0f} ms")
    assert duration > 1.0  # a real multi-second run
    assert stall < 0.5 * duration  # the GUI kept processing events throughout


def _labels_of_view(qtbot, viewer, widget, center):
    """Class labels of the visible region of the layer 'wide', zoomed in at ``center``."""
    viewer_camera(viewer).center = center
    viewer_camera(viewer).zoom = 8
    widget.mode_combo.setCurrentText("labels")
    widget.visible_check.setChecked(True)
    _run(qtbot, widget)
    return viewer.layers["wide [unet labels]"]


def test_visible_region_only(panel, qtbot, monkeypatch):
    viewer, widget = panel
    image = np.random.default_rng(6).random((300, 300)).astype(np.float32)
    viewer.add_image(image, name="wide", scale=(2.0, 2.0))
    out = _labels_of_view(qtbot, viewer, widget, (200, 200))  # world: pixel (100, 100)
    h, w = out.data.shape
    assert 0 < h < 300 and 0 < w < 300
    y0, x0 = (np.asarray(out.translate) / 2).astype(int)
    assert y0 <= 100 < y0 + h and x0 <= 100 < x0 + w
    full = predict(image, tiny_model("valid")).argmax(0) + 1
    np.testing.assert_array_equal(out.data, full[y0 : y0 + h, x0 : x0 + w])
    # the description says so, and follows the view once it is still: a pan or zoom
    # sends dozens of camera events a second, and each described the layer again
    assert f"visible region {h} x {w}" in widget.axes_label.text()
    described = []
    describe = widget._describe
    monkeypatch.setattr(widget, "_describe", lambda: described.append(1) or describe())
    camera = viewer_camera(viewer)
    for k in range(12):  # a pan and a zoom, the event loop running between the moves
        camera.center = (200 + 5 * k, 200 - 3 * k)
        camera.zoom = 8 + k
        qtbot.wait(10)
    assert len(described) <= 1  # (a heavily loaded machine may pause past the delay)
    region = job_for_layer(viewer.layers["wide"], widget.state.model, viewer, visible=True)
    assert region.describe != f"visible region {h} x {w}"
    qtbot.waitUntil(lambda: widget.axes_label.text() == region.describe, timeout=2000)
    assert 1 <= len(described) <= 2
    widget.visible_check.setChecked(False)
    assert "visible region" not in widget.axes_label.text()
    camera.zoom = 4  # (the region is not said when not asked for)
    qtbot.wait(500)  # (past the delay)
    assert "visible region" not in widget.axes_label.text()


def test_object_size_rescaling_follows_the_model(panel, qtbot, image):
    from napari_unet.core.segment import SegmentOptions, segment_iter
    from napari_unet.core.tiling import run_to_end

    viewer, widget = panel
    assert not widget.rescale_check.isEnabled() and widget.options().diameter is None
    assert "records no size" in widget.rescale_check.text()
    widget.state.model = tiny_model("same", object_diameter=20.0)
    assert widget.rescale_check.isChecked() and "(20 px)" in widget.rescale_check.text()
    assert widget.options().diameter == "auto"
    widget.diameter_spin.setValue(10.0)
    assert widget.options().diameter == 10.0
    widget.mode_combo.setCurrentText("probabilities")
    viewer.add_image(image, name="img")
    _run(qtbot, widget)
    options = SegmentOptions(mode="probabilities", diameter=10.0)
    expected = run_to_end(segment_iter(image, tiny_model("same", object_diameter=20.0), options))
    out = viewer.layers["img [unet interior]"].data
    assert out.shape == image.shape
    np.testing.assert_allclose(np.asarray(out), expected[1], atol=1e-5)
    # the size used is said, and recorded with the result
    assert "objects given at 10.0 px, model's 20.0 px: image resized by 2" in widget.status.text()
    run = viewer.layers["img [unet interior]"].metadata[RUN_KEY]
    assert run["diameter"] == 10.0 and run["object_diameter"] == 10.0
    assert run["resized_by"] == 2.0 and "sizing" not in run
    widget.rescale_check.setChecked(False)
    assert widget.options().diameter is None and not widget.diameter_spin.isEnabled()


def test_a_runs_warning_reaches_the_user(panel, qtbot, image, monkeypatch):
    # an object diameter past the 4x resizing limit: the core warns, and napari shows no
    # worker's warnings, so the panel does (notification and status line)
    shown = []
    monkeypatch.setattr(
        "napari.utils.notifications.show_warning", lambda message: shown.append(message)
    )
    viewer, widget = panel
    widget.state.model = tiny_model("same", object_diameter=20.0)
    widget.diameter_spin.setValue(1000.0)
    viewer.add_image(image, name="img")
    _run(qtbot, widget)
    assert widget.status.text().startswith("Done: ")
    assert "Warning: objects of 1000.0 px would need the image resized" in widget.status.text()
    assert len(shown) == 1 and "resized by 0.25 (the limit)" in shown[0]
    widget.diameter_spin.setValue(20.0)  # the next run, within the limit: no warning left
    _run(qtbot, widget)
    assert "Warning" not in widget.status.text() and len(shown) == 1


@pytest.mark.parametrize(
    "shape, scale, translate, placed",
    [
        # Z, C, Y, X: outputs get one channel plane stretched over the two channels
        ((3, 2, 40, 50), (5, 1, 2, 3), (100, 0, 10, 20), ((5, 2, 2, 3), (100, 0.5, 10, 20))),
        ((2, 3, 40, 50), (1, 5, 2, 3), (0, 100, 10, 20), ((5, 2, 3), (100, 10, 20))),  # CZYX
        # C nearest Y and X (Z, C, Y, X)
        ((2, 2, 40, 50), (1, 5, 2, 3), (0, 100, 10, 20), ((1, 10, 2, 3), (0, 102.5, 10, 20))),
        ((2, 40, 50), (1, 2, 3), (0, 10, 20), ((2, 3), (10, 20))),  # CYX
    ],
)
def test_results_of_multichannel_layers_land_on_the_image(shape, scale, translate, placed):
    from napari.layers import Image

    from napari_unet._widgets._layers import _visible_region, job_for_layer

    data = np.random.default_rng(7).random(shape).astype(np.float32)
    layer = Image(data, rgb=False, scale=scale, translate=translate)
    model = tiny_model("same", channels=2)
    job = job_for_layer(layer, model)
    assert (job.scale, job.translate) == placed
    if job.axes.endswith("YX"):  # shown in 2D: the region (no viewer: the layer's corner
        axes = resolve_axes(shape, job.axes, 2)  # pixels) is in Y and X, not C
        assert _visible_region(layer, axes, None) == (0, 40, 0, 50)


def test_a_result_corrected_by_hand_or_a_user_layer_is_never_overwritten(panel, qtbot, image):
    viewer, widget = panel
    viewer.add_image(image, name="img")
    widget.mode_combo.setCurrentText("labels")
    _run(qtbot, widget)
    first = viewer.layers["img [unet labels]"]
    first.data[0:5, 0:5] = 7  # a painted correction (in place, as napari's brush does)
    corrected = first.data.copy()
    _run(qtbot, widget)
    assert viewer.layers["img [unet labels]"] is first
    np.testing.assert_array_equal(first.data, corrected)
    assert "img [unet labels] [1]" in widget.status.text()
    assert "'img [unet labels]', edited since it was written" in widget.status.text()
    # an unedited result is updated in place
    _run(qtbot, widget)
    assert len(viewer.layers) == 3
    # a layer of the user's that happens to have a result's name is kept too
    viewer.add_points(np.zeros((1, 2)), name="img [unet instances]")
    widget.mode_combo.setCurrentText("instances")
    _run(qtbot, widget)
    assert viewer.layers["img [unet instances]"]._type_string == "points"
    assert "img [unet instances] [1]" in [layer.name for layer in viewer.layers]


def test_image_list_holds_every_input_image_and_follows_renames(panel, qtbot, image):
    viewer, widget = panel
    viewer.add_image(image, name="well")
    viewer.add_image(image, name="well")  # napari calls the second one "well [1]"
    items = lambda: [widget.layer_combo.itemText(i) for i in range(widget.layer_combo.count())]  # noqa: E731
    assert items() == ["well", "well [1]"]
    widget.layer_combo.setCurrentText("well [1]")
    widget.mode_combo.setCurrentText("probabilities")
    _run(qtbot, widget)
    assert "well [1] [unet interior]" in viewer.layers
    assert items() == ["well", "well [1]"]  # results are not inputs
    viewer.layers["well [1]"].name = "well B"
    assert items() == ["well", "well B"]
    # the renamed layer stays the chosen one (not the first in the list)
    assert widget.layer_combo.currentText() == "well B"
    assert widget.image_layer() is viewer.layers["well B"]


def test_a_transposed_view_is_refused_for_the_current_plane(panel, qtbot):
    """With the axis order rolled the view shows a Z-X plane: 'current plane only' would
    segment the Y-X plane at the shown Z instead, so it says so and writes nothing."""
    viewer, widget = panel
    stack = np.random.default_rng(1).random((6, 40, 50)).astype(np.float32)
    viewer.add_image(stack, name="stack")
    viewer.dims.order = (1, 0, 2)
    widget.plane_check.setChecked(True)
    widget._on_run()
    assert "transposed or rolled" in widget.status.text() and widget.worker is None
    assert [layer.name for layer in viewer.layers] == ["stack"]
    viewer.dims.order = (0, 1, 2)
    widget.mode_combo.setCurrentText("labels")
    _run(qtbot, widget)
    assert viewer.layers["stack [unet labels]"].data.shape == (1, 40, 50)


def test_visible_region_with_y_and_x_swapped_on_screen(panel, qtbot):
    viewer, widget = panel
    image = np.random.default_rng(6).random((300, 200)).astype(np.float32)
    viewer.add_image(image, name="wide")
    viewer.dims.order = (1, 0)  # X drawn vertically
    out = _labels_of_view(qtbot, viewer, widget, (150, 50))  # (vertical, horizontal) = (x, y)
    h, w = out.data.shape
    y0, x0 = np.asarray(out.translate).astype(int)
    assert y0 <= 50 < y0 + h and x0 <= 150 < x0 + w
    assert 0 < h < 300 and 0 < w < 200


def test_a_result_is_dropped_when_its_image_is_removed_or_replaced_meanwhile(panel, qtbot):
    viewer, widget = panel
    image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    layer = viewer.add_image(image, name="img")
    widget._on_run()
    viewer.layers.remove(layer)  # before the worker's result reaches the GUI thread
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert "removed while it was segmented" in widget.status.text() and not len(viewer.layers)
    layer = viewer.add_image(image, name="img")
    widget._on_run()
    layer.data = image[:20]
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert "data was replaced" in widget.status.text() and len(viewer.layers) == 1
    _run(qtbot, widget)
    assert viewer.layers["img [unet instances]"].data.shape == (20, 40)
    # moved or rescaled: the result, placed for where the image was, would lie elsewhere
    widget._on_run()
    layer.scale, layer.translate = (2, 0.5), (0, 100)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert "scale or translate changed while it was segmented" in widget.status.text()
    assert tuple(viewer.layers["img [unet instances]"].scale) == (1, 1)  # not updated


def test_an_image_renamed_meanwhile_gets_a_result_under_its_new_name(panel, qtbot):
    viewer, widget = panel
    layer = viewer.add_image(np.random.default_rng(0).random((40, 40)), name="before")
    widget._on_run()
    layer.name = "after"
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert [la.name for la in viewer.layers] == ["after", "after [unet instances]"]


def test_a_tile_size_typed_in_shows_as_the_run_will_use_it(panel):
    from napari_unet.core.tile_plan import plan_tiles

    viewer, widget = panel
    g = widget.state.model.info.geometry
    for typed in (8, 2 * g.halo + 3 * g.multiple + 5):
        widget.tile_spin.setValue(typed)
        widget._on_tile_edited()
        shown = widget.tile_spin.value()
        assert shown == plan_tiles((1000, 1000), g, typed).y.tile, typed
        assert g.snap(shown, "nearest") == shown


def test_results_of_a_z_c_y_x_layer_show_on_its_planes_at_every_channel(panel, qtbot):
    """napari lines layers up by their last axes: a (Z, Y, X) result of a (Z, C, Y, X)
    image would put its Z on the image's C (plane 0 shown at z = 3, channel 0)."""
    viewer, widget = panel
    data = np.random.default_rng(3).random((4, 2, 40, 48)).astype(np.float32)
    src = viewer.add_image(data, name="zc", scale=(5, 1, 2, 3), translate=(100, 0, 10, 20))
    widget.state.model = tiny_model("same", channels=2)
    widget.layer_combo.setCurrentText("zc")
    widget.mode_combo.setCurrentText("labels")
    _run(qtbot, widget)
    out = viewer.layers["zc [unet labels]"]
    assert out.data.shape == (4, 1, 40, 48)
    expected = predict(data, widget.state.model, axes="ZCYX").argmax(0) + 1
    np.testing.assert_array_equal(out.data[:, 0], expected)
    for z in range(4):
        for c in range(2):
            viewer.dims.point = (100 + 5 * z, c, 10 + 2 * 7, 20 + 3 * 9)
            assert np.round(src.world_to_data(viewer.dims.point)).tolist() == [z, c, 7, 9]
            assert np.round(out.world_to_data(viewer.dims.point)).tolist() == [z, 0, 7, 9]
    # current plane: the plane shown, placed on it
    widget.plane_check.setChecked(True)
    viewer.dims.point = (100 + 5 * 2, 1, 10, 20)
    _run(qtbot, widget)
    plane = viewer.layers["zc [unet labels] [1]"]
    assert plane.data.shape == (1, 1, 40, 48)
    np.testing.assert_array_equal(plane.data[0, 0], expected[2])
    assert np.round(plane.world_to_data(viewer.dims.point)).tolist() == [0, 0, 0, 0]


def test_another_plane_gets_a_result_layer_of_its_own(panel, qtbot):
    viewer, widget = panel
    data = np.random.default_rng(4).random((4, 40, 48)).astype(np.float32)
    viewer.add_image(data, name="stack")
    widget.mode_combo.setCurrentText("labels")
    widget.plane_check.setChecked(True)
    viewer.dims.set_current_step(0, 1)
    _run(qtbot, widget)
    viewer.dims.set_current_step(0, 3)
    _run(qtbot, widget)
    first, second = viewer.layers["stack [unet labels]"], viewer.layers["stack [unet labels] [1]"]
    assert (first.translate[0], second.translate[0]) == (1, 3)
    assert "'stack [unet labels]', it covers another extent" in widget.status.text()
    # the same plane again updates its own layer, and says why the first one is kept
    _run(qtbot, widget)
    assert len(viewer.layers) == 3
    assert "'stack [unet labels]', it covers another extent" in widget.status.text()


def test_current_plane_refuses_a_plane_napari_does_not_show(panel, qtbot):
    viewer, widget = panel
    viewer.add_image(np.zeros((8, 30, 30), np.float32), name="far", translate=(0, 0, 0))
    viewer.add_image(np.zeros((3, 30, 30), np.float32), name="near", translate=(-3, 0, 0))
    widget.layer_combo.setCurrentText("near")
    widget.plane_check.setChecked(True)
    viewer.dims.set_current_step(0, 6)  # 'near' ends at Z = -1: napari shows none of it
    widget._on_run()
    assert widget.worker is None
    assert "has no plane at the viewer's Z position" in widget.status.text()
    assert [la.name for la in viewer.layers] == ["far", "near"]
    # channels a one-channel model reads as planes are named so, not by a letter of ours
    viewer.add_image(np.zeros((2, 30, 30), np.float32), name="cyx", axis_labels=("c", "y", "x"))
    widget.layer_combo.setCurrentText("cyx")
    widget._on_run()
    assert "has no plane at the viewer's channel position" in widget.status.text()


def test_units_of_the_image_carry_over_to_its_results_and_its_plane(panel, qtbot):
    viewer, widget = panel
    if not hasattr(viewer.dims, "units"):
        pytest.skip("napari < 0.6 has no layer units")
    rng = np.random.default_rng(5)
    um = viewer.add_image(
        rng.random((6, 30, 30)).astype(np.float32), name="um", scale=(2, 0.5, 0.5), units="um"
    )
    viewer.add_image(
        rng.random((6, 30, 30)).astype(np.float32), name="nm", scale=(1000, 500, 500), units="nm"
    )
    assert viewer.layers.extent.units is not None  # consistent: both shown in nm
    widget.layer_combo.setCurrentText("um")
    widget.mode_combo.setCurrentText("labels")
    widget.plane_check.setChecked(True)
    viewer.dims.point = (6000, 5000, 5000)  # nm: plane 3 of 'um', as napari shows it
    assert "Z=3" in widget.axes_label.text()
    _run(qtbot, widget)
    out = viewer.layers["um [unet labels]"]
    assert tuple(str(u) for u in out.units) == tuple(str(u) for u in um.units)
    assert viewer.layers.extent.units is not None  # still consistent
    assert out.translate[0] == 6.0


def test_rgb_layers_and_multichannel_models(panel, qtbot):
    viewer, widget = panel
    rgba = (np.random.default_rng(8).random((40, 48, 4)) * 255).astype(np.uint8)
    viewer.add_image(rgba, name="rgba", rgb=True)
    widget.state.model = tiny_model("same", channels=3)
    widget.layer_combo.setCurrentText("rgba")
    widget.mode_combo.setCurrentText("labels")
    assert "alpha channel left out" in widget.axes_label.text()
    _run(qtbot, widget)
    expected = predict(rgba[..., :3], widget.state.model, axes="YXC").argmax(0) + 1
    np.testing.assert_array_equal(viewer.layers["rgba [unet labels]"].data, expected)
    widget.state.model = tiny_model("same", channels=2)
    widget._on_run()
    assert widget.worker is None
    assert "is an RGB image (3 colour channels), but the model takes 2" in widget.status.text()


def test_a_zarr_layer_is_read_in_the_worker_not_when_a_plane_is_chosen(panel):
    zarr = pytest.importorskip("zarr")
    from napari_unet._widgets._layers import job_for_layer

    viewer, widget = panel
    store = zarr.zeros((5, 64, 64), chunks=(1, 32, 32), dtype="float32")
    store[3] = 1.0
    layer = viewer.add_image(store, name="z")
    viewer.dims.set_current_step(0, 3)
    job = job_for_layer(layer, widget.state.model, viewer, current_plane=True)
    assert hasattr(job.data, "dask") and job.data.shape == (1, 64, 64)  # not read yet
    assert float(np.asarray(job.data).mean()) == 1.0


def test_a_runtime_error_in_a_run_is_shown_and_the_panel_is_free_again(panel, qtbot):
    """napari's worker takes a RuntimeError (torch's out of memory) for its own deletion
    and ends without 'errored' or 'finished': the panel waited for ever."""
    viewer, widget = panel

    def run():
        yield from ()
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")

    widget.start(run)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10000)
    assert widget.status.text().startswith("Error: out of memory: use a smaller batch")
    assert widget.run_button.isEnabled()


def test_a_typed_tile_size_follows_a_model_change(panel):
    viewer, widget = panel
    widget.state.model = tiny_model("same", depth=2)  # sizes 4 k
    widget.tile_spin.setValue(101)
    widget._on_tile_edited()
    assert widget.tile_spin.value() == 100
    widget.state.model = tiny_model("same", depth=3)  # sizes 8 k
    assert widget.tile_spin.value() % 8 == 0 and abs(widget.tile_spin.value() - 100) <= 4


def test_a_region_at_a_far_stage_position_gets_its_own_layer(panel, qtbot):
    """Translates compared to a hundredth of a pixel: at 42000 um with 0.1 um pixels a
    relative tolerance let a region 3 px away go into the first one's layer."""
    from napari_unet._widgets._layers import job_for_layer
    from napari_unet._widgets._results import add_or_update

    viewer, widget = panel
    image = viewer.add_image(
        np.zeros((40, 40), np.float32), name="scan", scale=(0.1, 0.1), translate=(35000, 42000)
    )
    model = widget.state.model
    job = job_for_layer(image, model)
    result = np.zeros((40, 40), np.uint8)
    add_or_update(viewer, job, model, "labels", result)
    moved = replace(job, translate=(35000.0, 42000.3))
    names, kept = add_or_update(viewer, moved, model, "labels", result)
    assert names == ["scan [unet labels] [1]"] and kept
    assert viewer.layers["scan [unet labels] [1]"].translate[1] == pytest.approx(42000.3)
    assert viewer.layers["scan [unet labels]"].translate[1] == 42000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": np.float32(0.5)},
        {"min_confidence": np.float16(0.25)},
        {"min_size": 10.0},
        {"min_size": np.int64(3)},
    ],
)
def test_numpy_numbers_are_settings_too(kwargs):
    from napari_unet.core.segment import SegmentOptions

    SegmentOptions(**kwargs)


class _Slow(torch.nn.Module):
    """A layer that takes a while and counts its calls."""

    calls = 0

    def forward(self, x):
        type(self).calls += 1
        time.sleep(0.05)
        return x


def test_cancel_stops_inside_a_tile(panel, qtbot):
    """Cancel does not wait for the tile: the network stops before its next layer."""
    from napari_unet.model.info import LoadedModel

    viewer, widget = panel
    info = tiny_model("same").info
    net = torch.nn.Sequential(*[_Slow() for _ in range(200)], torch.nn.Conv2d(1, 3, 1)).eval()
    widget.state.model = LoadedModel(net, info)
    viewer.add_image(np.random.default_rng(5).random((64, 64)).astype(np.float32), name="img")
    widget.layer_combo.setCurrentText("img")
    widget.tile_spin.setValue(0)  # one tile
    _Slow.calls = 0
    widget._on_run()
    qtbot.waitUntil(lambda: _Slow.calls >= 5, timeout=20000)
    widget._on_cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=20000)
    assert _Slow.calls < 100  # of the 200 layers of the tile's one forward pass
    assert [layer.name for layer in viewer.layers] == ["img"]
    assert "Cancelled" in widget.status.text()
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_cancel_after_the_run_ended_adds_nothing(panel, qtbot):
    """The result already on its way when Cancel was pressed was added all the same."""
    from qtpy.QtCore import QThreadPool

    viewer, widget = panel
    viewer.add_image(np.random.default_rng(8).random((40, 40)).astype(np.float32), name="img")
    widget.layer_combo.setCurrentText("img")
    widget._on_run()
    assert QThreadPool.globalInstance().waitForDone(30000)  # ended, result not delivered
    widget._on_cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=20000)
    assert [layer.name for layer in viewer.layers] == ["img"]
    assert widget.status.text() == "Cancelled: nothing was changed."


def test_redo_after_an_update_in_place_brings_back_nothing_old(panel, qtbot):
    """A stroke painted into a result and undone came back with Redo after the result
    was updated in place: written into the new result."""
    viewer, widget = panel
    viewer.add_image(np.random.default_rng(9).random((40, 40)).astype(np.float32), name="img")
    widget.layer_combo.setCurrentText("img")
    widget.mode_combo.setCurrentText("labels")
    _run(qtbot, widget)
    out = viewer.layers["img [unet labels]"]
    out.paint((5, 5), 77)
    out.undo()  # back to the result as written: it may be updated in place
    _run(qtbot, widget)
    assert viewer.layers["img [unet labels]"] is out
    written = out.data.copy()
    out.redo()
    np.testing.assert_array_equal(out.data, written)
    assert 77 not in out.data


def test_model_loaded_clears_the_ask_for_one_and_precision_follows_the_device(
    make_napari_viewer, monkeypatch
):
    from napari_unet._widgets._state import state_for
    from napari_unet._widgets.segment import SegmentPanel
    from napari_unet.core import device as dmod

    viewer = make_napari_viewer()
    state = state_for(viewer)
    widget = SegmentPanel(plugin_viewer(viewer))
    viewer.add_image(np.zeros((40, 40), np.float32), name="img")
    widget._on_run()
    assert widget.status.text().startswith("Load a model")
    state.model = tiny_model("valid")
    assert widget.status.text() == ""  # (it said to load a model after one was loaded)
    # mixed precision is a CUDA option: greyed out where the device is the CPU
    state.device = "cpu"
    assert not widget.amp_check.isEnabled()
    with_cuda = {"auto": torch.device("cuda"), "cpu": torch.device("cpu")}
    monkeypatch.setattr(dmod, "resolve_device", with_cuda.__getitem__)  # as on a GPU machine
    state.device = "auto"
    assert widget.amp_check.isEnabled()
    state.device = "cpu"
    assert not widget.amp_check.isEnabled()


def test_the_layers_axis_labels_name_its_axes(panel, qtbot):
    """A layer labelled ('z', 't', 'y', 'x') was described as 'T x Z', and one labelled
    ('c', 'y', 'x') as 'Z: 3 planes', by guessing from the shape alone."""
    viewer, widget = panel
    data = np.random.default_rng(3).random((4, 5, 40, 50)).astype(np.float32)
    viewer.add_image(data, name="zt", axis_labels=("z", "t", "y", "x"))
    assert "Z x T: 4 x 5 = 20 planes" in widget.axes_label.text()
    viewer.add_image(data[0, :3], name="cyx", axis_labels=("c", "y", "x"))
    widget.layer_combo.setCurrentText("cyx")
    text = widget.axes_label.text()
    assert "3 planes" in text and "the axis labelled 'c'" in text and "one by one" in text
    widget.mode_combo.setCurrentText("labels")
    _run(qtbot, widget)
    # each channel segmented on its own, the result as the layer (channels as planes)
    model = tiny_model("valid")
    expected = np.stack([predict(c, model).argmax(0) + 1 for c in data[0, :3]])
    np.testing.assert_array_equal(viewer.layers["cyx [unet labels]"].data, expected)
    assert tuple(viewer.layers["cyx [unet labels]"].axis_labels) == ("c", "y", "x")  # not -3
    # napari's default labels ('-3', ...) name nothing: the shape is read as before
    viewer.add_image(data[0, :3], name="plain")
    widget.layer_combo.setCurrentText("plain")
    assert "Z: 3 planes" in widget.axes_label.text()
    # a two-channel model takes the labelled channel axis, not the one nearest to Y, X
    widget.state.model = tiny_model("valid", channels=2)
    both = np.random.default_rng(4).random((2, 2, 40, 50)).astype(np.float32)
    viewer.add_image(both, name="cz", axis_labels=("c", "z", "y", "x"))
    widget.layer_combo.setCurrentText("cz")
    assert "2 channel(s) on axis C; Z: 2 planes" in widget.axes_label.text()
    _run(qtbot, widget)
    two = tiny_model("valid", channels=2)
    expected = np.stack([predict(both[:, z], two, axes="CYX").argmax(0) + 1 for z in range(2)])
    out = viewer.layers["cz [unet labels]"].data
    np.testing.assert_array_equal(np.squeeze(out), expected)
    assert tuple(viewer.layers["cz [unet labels]"].axis_labels)[-3:] == ("z", "y", "x")
    # labels that name every axis but no channel axis are not overruled by a guess (the
    # labelled z planes were fed to the network as its two channels)
    viewer.add_image(both, name="tz", axis_labels=("t", "z", "y", "x"))
    widget.layer_combo.setCurrentText("tz")
    assert "name no channel axis, but the model takes 2" in widget.axes_label.text()
    viewer.layers["tz"].axis_labels = ("c", "z", "y", "x")  # as the refusal advises
    assert "2 channel(s) on axis C" in widget.axes_label.text()  # described anew
    # an RGB layer's labels name its planes too
    widget.state.model = tiny_model("valid")
    rgb = np.zeros((3, 40, 50, 3), np.uint8)
    viewer.add_image(rgb, name="rgb", rgb=True, axis_labels=("t", "y", "x"))
    widget.layer_combo.setCurrentText("rgb")
    assert "T: 3 planes" in widget.axes_label.text()
    # labels that put the channels after y and x: napari shows (x, c) as the image, and
    # each 40 x 2 sliver was segmented on its own and reported done; refused, said why
    viewer.add_image(both[:, 0].transpose(1, 2, 0), name="yxc", axis_labels=("y", "x", "c"))
    widget.layer_combo.setCurrentText("yxc")
    assert "put 'y' and 'x' before other axes" in widget.axes_label.text()
    widget._on_run()
    assert widget.worker is None and "before other axes" in widget.status.text()
    assert "yxc [unet labels]" not in viewer.layers


def test_an_older_result_of_the_same_name_and_another_dimensionality(panel, qtbot):
    # a 2D image segmented, closed, and a Z-stack of the same name opened: its result
    # was compared with the 2D one's translate (a ValueError; the result was lost)
    viewer, widget = panel
    rng = np.random.default_rng(0)
    viewer.add_image(rng.random((40, 48)).astype(np.float32), name="cells")
    widget.mode_combo.setCurrentText("labels")
    _run(qtbot, widget)
    viewer.layers.remove("cells")
    stack = rng.random((3, 40, 48)).astype(np.float32)
    viewer.add_image(stack, name="cells")
    widget.layer_combo.setCurrentText("cells")
    _run(qtbot, widget)
    new = viewer.layers["cells [unet labels] [1]"]
    assert viewer.layers["cells [unet labels]"].data.shape == (40, 48)
    expected = predict(stack, widget.state.model, axes="ZYX").argmax(0) + 1
    np.testing.assert_array_equal(new.data, expected)
    assert "it covers another extent" in widget.status.text()


def test_a_one_output_model_s_layers_name_its_class_and_every_result_its_run(panel, qtbot):
    # a sigmoid model's class labels were 1 = background (named as its class) and 2 =
    # its objects (unnamed, white); its only probability map was hidden; a result's
    # metadata said nothing of the model or settings that made it
    from napari_unet._widgets._results import RUN_KEY

    viewer, widget = panel
    model = tiny_model("same", classes=1).with_info(classes=["nucleus"], name="one")
    widget.state.model = model
    data = np.random.default_rng(8).random((40, 48)).astype(np.float32)
    viewer.add_image(data, name="img")
    widget.layer_combo.setCurrentText("img")
    widget.mode_combo.setCurrentText("labels")
    widget.threshold_spin.setValue(0.4)
    _run(qtbot, widget)
    layer = viewer.layers["img [one labels]"]
    p = predict(data, model)[0]
    np.testing.assert_array_equal(layer.data, (p > 0.5).astype(np.uint8))
    assert list(layer.features["class"]) == ["background", "nucleus"]
    run = layer.metadata[RUN_KEY]
    assert run["model"] == "one" and run["mode"] == "labels" and run["threshold"] == 0.4
    assert "should_stop" not in run
    widget.mode_combo.setCurrentText("probabilities")
    _run(qtbot, widget)
    assert viewer.layers["img [one nucleus]"].visible
    assert viewer.layers["img [one nucleus]"].metadata[RUN_KEY]["mode"] == "probabilities"
