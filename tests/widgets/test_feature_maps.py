import numpy as np
import pytest

from conftest import plugin_viewer, tiny_model

pytest.importorskip("napari")


@pytest.fixture
def panel(make_napari_viewer):
    from napari_unet._widgets._state import state_for
    from napari_unet._widgets.feature_maps import FeatureMapPanel

    viewer = make_napari_viewer()
    state_for(viewer).model = tiny_model("valid", depth=2)
    return viewer, FeatureMapPanel(plugin_viewer(viewer))  # as the Plugins menu opens it


def test_all_stages_appear_aligned_with_the_image(panel, qtbot):
    from napari_unet.core.features import capture

    viewer, widget = panel
    image = np.random.default_rng(0).random((64, 80)).astype(np.float32)
    viewer.add_image(image, name="img", scale=(0.5, 0.5), translate=(3.0, 4.0))
    assert widget.stages() == ["enc0", "enc1", "bottleneck", "dec1", "dec0", "head"]
    widget.region_combo.setCurrentText("whole plane")
    widget._on_run()
    qtbot.waitUntil(widget.idle, timeout=30000)
    ref = capture(image, tiny_model("valid", depth=2))
    for name, fm in ref.items():
        layer = viewer.layers[f"img [features {name}]"]
        np.testing.assert_allclose(layer.data, fm.data, atol=1e-6)
        assert layer.scale[-1] == 0.5 * fm.scale
        assert layer.translate[-2] == pytest.approx(3.0 + 0.5 * fm.origin[0])
        assert layer.visible == (name == "head")  # the last stage shows, the rest wait
    np.testing.assert_array_equal(viewer.layers["img"].data, image)
    # a second run with fewer channels updates the same layers in place
    before = {la.name: la for la in viewer.layers}
    widget.channels_spin.setValue(2)
    widget._on_run()
    qtbot.waitUntil(widget.idle, timeout=30000)
    assert [la.name for la in viewer.layers] == list(before)
    enc0 = viewer.layers["img [features enc0]"]
    assert enc0 is before["img [features enc0]"] and enc0.data.shape[0] == 2
    np.testing.assert_allclose(enc0.data, ref["enc0"].data[enc0.metadata["channels"]], atol=1e-6)
    # the layers are added one per turn of the event loop (ten at once froze the viewer)
    widget._on_returned(ref)
    assert len(widget._pending) == len(ref) - 1 and not widget.idle()
    assert widget.busy() and "A run is going on" in widget.status.text()
    qtbot.waitUntil(widget.idle, timeout=10000)
    assert "6 stage(s) added" in widget.status.text()


def test_stage_choice_stays_for_a_version_of_the_same_network(panel, qtbot):
    viewer, widget = panel
    widget.stage_list.clearSelection()
    widget.stage_list.item(1).setSelected(True)
    widget.state.model = tiny_model("valid", depth=2, seed=4)  # e.g. a fine-tuned version
    assert widget.stages() == ["enc1"]
    widget.state.model = tiny_model("valid", depth=3)  # another network: all its stages
    assert len(widget.stages()) == 8


def test_maps_of_an_image_removed_meanwhile_are_dropped(panel, qtbot):
    viewer, widget = panel
    viewer.add_image(np.zeros((48, 48), np.float32), name="img")
    widget.region_combo.setCurrentText("whole plane")
    widget._on_run()
    viewer.layers.remove("img")
    qtbot.waitUntil(widget.idle, timeout=30000)
    assert len(viewer.layers) == 0 and "its feature maps were dropped" in widget.status.text()


def test_memory_limit_asks_for_fewer_channels(panel, monkeypatch):
    import napari_unet._widgets.feature_maps as fmod

    viewer, widget = panel
    viewer.add_image(np.zeros((64, 64), np.float32), name="img")
    widget.region_combo.setCurrentText("whole plane")
    monkeypatch.setattr(fmod, "MEMORY_LIMIT_MB", 0.001)
    widget._on_run()
    assert "MB of feature maps" in widget.status.text() and widget.worker is None
    assert "'field of view' and zoom in" in widget.status.text()  # not "a smaller view"
    widget.channels_spin.setValue(4)  # a few top channels are counted too, not waved through
    widget._on_run()
    assert "MB of feature maps" in widget.status.text() and widget.worker is None
    assert len(viewer.layers) == 1


def test_a_network_pass_that_cannot_fit_in_memory_is_refused(panel, monkeypatch):
    import napari_unet.core.device as dmod

    viewer, widget = panel
    viewer.add_image(np.zeros((64, 64), np.float32), name="img")
    widget.region_combo.setCurrentText("whole plane")
    widget.channels_spin.setValue(2)
    monkeypatch.setattr(dmod, "free_memory", lambda device: 1 << 20)  # 1 MB free
    widget._on_run()
    assert "One pass of the network over 64 x 64 pixels needs" in widget.status.text()
    assert "more than half of the 0.0 GB free" in widget.status.text()
    assert widget.worker is None and len(viewer.layers) == 1
    # said first: the maps' own limit offered top channels and float16, which cannot help
    import napari_unet._widgets.feature_maps as fmod

    monkeypatch.setattr(fmod, "MEMORY_LIMIT_MB", 0.001)
    widget.channels_spin.setValue(0)
    widget._on_run()
    assert "One pass of the network" in widget.status.text()


def test_maps_of_a_stack_opened_after_a_2d_image_s_name_one_axis_as_theirs(panel, qtbot):
    """The stack's Z shares the slider of the 2D image's maps (napari lines axes up from
    the right); its own maps were labelled ('channel', 'channel', ...)."""
    viewer, widget = panel
    image = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    viewer.add_image(image, name="img")
    widget.region_combo.setCurrentText("whole plane")
    widget.stage_list.clearSelection()
    widget.stage_list.item(0).setSelected(True)  # enc0
    for name in ("img", "stack"):
        if name == "stack":
            viewer.add_image(np.stack([image] * 3), name="stack")
        widget.layer_combo.setCurrentText(name)
        widget._on_run()
        qtbot.waitUntil(widget.idle, timeout=30000)
    labels = tuple(viewer.layers["stack [features enc0]"].axis_labels)
    assert labels.count("feature channel") == 1 and labels[0] == "feature channel", labels


def test_channels_get_an_axis_of_their_own_beside_a_stack(panel, qtbot):
    viewer, widget = panel
    image = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    viewer.add_image(
        np.zeros((4, 64, 64), np.float32), name="stack", scale=(5, 1, 1), axis_labels="zyx"
    )
    viewer.add_image(image, name="img")
    widget.layer_combo.setCurrentText("img")
    widget.region_combo.setCurrentText("whole plane")
    widget.stage_list.clearSelection()
    widget.stage_list.item(0).setSelected(True)  # enc0
    for _ in range(2):  # the same on a second run (maps are not counted as world axes)
        widget._on_run()
        qtbot.waitUntil(widget.idle, timeout=30000)
        layer = viewer.layers["img [features enc0]"]
        assert layer.ndim == 4 and layer.data.shape[1] == 1  # C, (Z), Y, X
        assert viewer.dims.ndim == 4  # the channel slider is not the stack's Z slider
        # and says so (it was '-4'); the other axes keep the names they have
        assert tuple(layer.axis_labels) == ("feature channel", "z", "y", "x")
        assert tuple(viewer.dims.axis_labels) == ("feature channel", "z", "y", "x")
        # shown at every plane of the stack, as the 2D image is (not only at Z = 0)
        for z in (0.0, 10.0, 15.0):
            viewer.dims.set_point(1, z)
            assert layer._slice.image.view.shape[-2:] == (64, 64), z
    np.testing.assert_array_equal(viewer.layers["img"].data, image)


def test_the_3d_view_of_a_stack_is_refused_with_what_to_do(panel, qtbot):
    """Maps are of one plane: in the 3D view the stack's Z is shown whole (the maps were
    silently of plane 0), and the field of view has no 2D box."""
    viewer, widget = panel
    viewer.add_image(np.random.default_rng(1).random((3, 40, 40)).astype(np.float32), name="s")
    viewer.dims.set_point(0, 2)
    viewer.dims.ndisplay = 3
    widget._on_run()  # 'field of view', the default
    assert "'field of view' needs the 2D view" in widget.status.text()
    widget.region_combo.setCurrentText("whole plane")
    widget._on_run()
    assert "switch to the 2D view" in widget.status.text() and widget.worker is None
    assert len(viewer.layers) == 1
    viewer.dims.ndisplay = 2  # plane 2 as shown
    widget._on_run()
    qtbot.waitUntil(widget.idle, timeout=30000)
    assert viewer.layers["s [features head]"].translate[1] == 2.0


@pytest.mark.parametrize("rgb", [False, True])
def test_multichannel_images_show_the_maps_of_their_plane(make_napari_viewer, qtbot, rgb):
    """The channel axis is not a plane axis (every multichannel image failed with 'plane
    (0,) is not a plane of this image')."""
    from napari_unet._widgets._state import state_for
    from napari_unet._widgets.feature_maps import FeatureMapPanel
    from napari_unet.core.features import capture

    viewer = make_napari_viewer()
    rng = np.random.default_rng(3)
    if rgb:  # Y, X, RGB for a three-channel model
        model = tiny_model("same", depth=2, channels=3)
        data = rng.random((40, 48, 3)).astype(np.float32)
        plane, axes = data, "YXC"
    else:  # C, Z, Y, X for a two-channel model, at Z = 2
        model = tiny_model("same", depth=2, channels=2)
        data = rng.random((2, 3, 40, 48)).astype(np.float32)
        plane, axes = data[:, 2], "CYX"
    state_for(viewer).model = model
    widget = FeatureMapPanel(plugin_viewer(viewer))
    viewer.add_image(data, name="img", rgb=rgb)
    if not rgb:
        viewer.dims.set_point(1, 2)
    widget.region_combo.setCurrentText("whole plane")
    widget._on_run()
    qtbot.waitUntil(widget.idle, timeout=30000)
    assert "stage(s) added" in widget.status.text(), widget.status.text()
    ref = capture(plane, model, axes=axes)
    layer = viewer.layers["img [features enc0]"]
    np.testing.assert_allclose(
        layer.data.reshape(ref["enc0"].data.shape), ref["enc0"].data, atol=1e-5
    )
    if not rgb:
        assert layer.translate[-3] == 2.0  # on the plane it came from


def test_maps_of_a_z_c_y_x_plane_show_on_that_plane_at_every_channel(make_napari_viewer, qtbot):
    """Z, C, Y, X: the maps' plane axes are Z and a channel plane stretched over C (they
    lay on the C axis, shown nowhere)."""
    from napari_unet._widgets._state import state_for
    from napari_unet._widgets.feature_maps import FeatureMapPanel
    from napari_unet.core.features import capture

    viewer = make_napari_viewer()
    model = tiny_model("same", depth=2, channels=2)
    data = np.random.default_rng(4).random((3, 2, 40, 48)).astype(np.float32)
    state_for(viewer).model = model
    widget = FeatureMapPanel(plugin_viewer(viewer))
    viewer.add_image(data, name="img", scale=(4, 1, 1, 1))
    viewer.dims.set_point(0, 8)  # z = 2
    widget.region_combo.setCurrentText("whole plane")
    widget._on_run()
    qtbot.waitUntil(widget.idle, timeout=30000)
    layer = viewer.layers["img [features enc0]"]
    ref = capture(data[2], model, axes="CYX")
    np.testing.assert_allclose(
        layer.data.reshape(ref["enc0"].data.shape), ref["enc0"].data, atol=1e-5
    )
    for c in (0, 1):
        viewer.dims.set_point(2, c)  # (the maps added an axis before the image's)
        point = np.round(layer.world_to_data(viewer.dims.point)).astype(int)
        assert point[1:3].tolist() == [0, 0]  # (its Z plane, its channel plane)


def test_a_network_that_cannot_be_looked_into_offers_no_stages(panel, tmp_path):
    """TorchScript (bare, or inside a bioimage.io package) has no forward hooks: the panel
    says so up front instead of listing stages and failing with torch's words."""
    import torch

    viewer, widget = panel
    model = tiny_model("valid", depth=2)
    traced = torch.jit.trace(model.net.eval(), torch.rand(1, 1, 48, 48))
    widget.state.model = type(model)(traced, model.info)
    assert widget.stage_list.count() == 0 and not widget.run_button.isEnabled()
    assert "TorchScript or ONNX" in widget.status.text()
    widget.state.model = tiny_model("valid", depth=2)
    assert widget.stage_list.count() == 6 and widget.run_button.isEnabled()
    assert widget.status.text() == ""


def test_maps_are_added_when_the_layers_units_disagree(panel, qtbot):
    """Layers in um beside one without units: napari drops the units (dims.units None),
    and the maps are added without them (placing them failed on None)."""
    viewer, widget = panel
    rng = np.random.default_rng(0)
    viewer.add_image(
        rng.random((48, 48)).astype(np.float32), name="um", scale=(0.5, 0.5), units="um"
    )
    viewer.add_image(rng.random((48, 48)).astype(np.float32), name="px")
    widget.layer_combo.setCurrentText("um")
    widget.region_combo.setCurrentText("whole plane")
    widget._on_run()
    qtbot.waitUntil(widget.idle, timeout=30000)
    assert "stage(s) added" in widget.status.text(), widget.status.text()
    assert "um [features head]" in viewer.layers


class _Ended:
    """A worker that has returned its result but not yet said 'finished'."""

    abort_requested = False

    def quit(self) -> None:
        self.abort_requested = True


def _adding(qtbot, widget):
    widget._on_run()
    qtbot.waitUntil(lambda: "Adding stage layers" in widget.status.text(), timeout=30000)


def _maps(viewer):
    return [la.name for la in viewer.layers if "[features" in la.name]


def test_stage_layers_stop_coming_when_their_image_goes(panel, qtbot):
    """The stage layers added one by one kept coming over an image that was gone; Run
    looked ready meanwhile but said 'a run is going on', and Cancel was off."""
    viewer, widget = panel
    viewer.add_image(np.random.default_rng(1).random((48, 48)).astype(np.float32), name="img")
    _adding(qtbot, widget)
    assert not widget.run_button.isEnabled() and widget.cancel_button.isEnabled()
    viewer.layers.remove("img")
    qtbot.waitUntil(widget.idle, timeout=10000)
    assert "img was removed" in widget.status.text()
    assert 1 <= len(_maps(viewer)) < 6 and widget.run_button.isEnabled()
    # Cancel while they are added: the rest stay out
    viewer.add_image(np.zeros((48, 48), np.float32), name="other")
    _adding(qtbot, widget)
    before = len(_maps(viewer))
    finished = widget.worker  # (its 'finished' may still be on its way, as in a busy GUI)
    widget.worker = widget.worker or _Ended()
    widget._on_cancel()
    assert not widget._pending and widget.status.text().startswith("Cancelled: ")
    widget.worker = finished
    if finished is None:
        widget._on_finished()  # as the worker's 'finished' would
    qtbot.waitUntil(widget.idle, timeout=10000)
    assert widget.status.text().startswith("Cancelled: ")
    assert "left out" in widget.status.text()
    qtbot.wait(200)
    assert len(_maps(viewer)) == before  # none added after Cancel
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_stage_layers_take_the_image_s_new_name(panel, qtbot):
    viewer, widget = panel
    viewer.add_image(np.random.default_rng(2).random((48, 48)).astype(np.float32), name="img")
    widget._on_run()
    viewer.layers["img"].name = "renamed"  # during the capture
    qtbot.waitUntil(widget.idle, timeout=30000)
    assert len(_maps(viewer)) == 6
    assert all(name.startswith("renamed [features ") for name in _maps(viewer))


def test_the_view_stays_and_an_earlier_run_s_stages_are_hidden(panel, qtbot):
    # the first maps' channel axis made napari reset the camera (a zoomed-in view jumped
    # out to the whole image), and a rerun of one stage left the last run's shown
    from napari_unet._widgets._layers import viewer_camera

    viewer, widget = panel
    viewer.add_image(np.random.default_rng(1).random((200, 240)).astype(np.float32), name="img")
    camera = viewer_camera(viewer)
    camera.zoom, camera.center = 4.0, (50.0, 60.0)
    widget.region_combo.setCurrentText("field of view")
    widget._on_run()
    qtbot.waitUntil(widget.idle, timeout=30000)
    assert camera.zoom == 4.0 and tuple(camera.center)[-2:] == (50.0, 60.0)
    head = viewer.layers["img [features head]"]
    assert head.visible and head.metadata["model"] == widget.state.model.info.name
    y0, y1, x0, x1 = head.metadata["region"]
    assert y0 <= 50 < y1 and x0 <= 60 < x1 and y1 - y0 < 200
    widget.stage_list.clearSelection()
    widget.stage_list.item(0).setSelected(True)
    widget._on_run()
    qtbot.waitUntil(widget.idle, timeout=30000)
    assert viewer.layers["img [features enc0]"].visible and not head.visible


def test_a_transposed_view_is_refused_with_advice_this_panel_can_follow(panel):
    viewer, widget = panel
    viewer.add_image(np.zeros((4, 48, 56), np.float32), name="stack")
    viewer.dims.order = (1, 0, 2)
    widget.region_combo.setCurrentText("whole plane")
    widget._on_run()
    text = widget.status.text()
    assert "transposed or rolled" in text and "roll and transpose buttons" in text
    assert not [la for la in viewer.layers if "features" in la.name]
