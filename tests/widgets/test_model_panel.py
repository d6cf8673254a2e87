import pytest

from conftest import tiny_model
from napari_unet.io import save_model

pytest.importorskip("napari")


def test_load_file_shares_model_with_segment_panel(make_napari_viewer, qtbot, tmp_path):
    from napari_unet._widgets.model_panel import FILE_ENTRY, ModelPanel
    from napari_unet._widgets.segment import SegmentPanel

    path = save_model(tiny_model("valid"), tmp_path / "mine.safetensors")
    viewer = make_napari_viewer()
    panel = ModelPanel(viewer)
    segment = SegmentPanel(viewer)
    panel.model_combo.setCurrentText(FILE_ENTRY)
    panel.path_edit.setText(str(path))
    panel._on_run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=20000)
    assert panel.state.model is not None and segment.state is panel.state
    assert "background, interior, boundary" in panel.card.toPlainText()
    assert "halo 20 px" in panel.card.toPlainText()
    assert panel.card.font().fixedPitch()  # the card's columns line up
    viewer.add_image(__import__("numpy").zeros((30, 30)), name="img")
    assert "30 x 30 pixels" in segment.axes_label.text()


def test_bad_file_gives_message_and_keeps_previous_model(make_napari_viewer, qtbot, tmp_path):
    from napari_unet._widgets.model_panel import FILE_ENTRY, ModelPanel

    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"12345678{garbage")
    viewer = make_napari_viewer()
    panel = ModelPanel(viewer)
    before = tiny_model("same")
    panel.state.model = before
    panel.model_combo.setCurrentText(FILE_ENTRY)
    panel.path_edit.setText(str(bad))
    panel._on_run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=20000)
    assert "corrupt or truncated" in panel.status.text()
    assert panel.status.text().endswith(f"(still using {before.info.name})")
    assert panel.state.model is before


def test_state_is_per_viewer(make_napari_viewer):
    from napari_unet._widgets._state import state_for

    a, b = make_napari_viewer(), make_napari_viewer()
    state_for(a).model = tiny_model("same")
    assert state_for(b).model is None
    assert state_for(a) is state_for(a)


def test_device_choice_goes_to_state(make_napari_viewer):
    from napari_unet._widgets.model_panel import ModelPanel

    panel = ModelPanel(make_napari_viewer())
    panel.device_combo.setCurrentText("cpu")
    assert panel.state.device == "cpu"


def test_a_reopened_panel_shows_the_model_and_device_in_use(make_napari_viewer, tmp_path):
    from napari_unet._widgets.model_panel import FILE_ENTRY, ModelPanel
    from napari_unet.io import load_model

    viewer = make_napari_viewer()
    panel = ModelPanel(viewer)
    panel.device_combo.setCurrentText("cpu")
    panel.state.model = load_model("em-membrane")
    again = ModelPanel(viewer)
    assert again.model_combo.currentText() == "em-membrane"
    assert again.device_combo.currentText() == "cpu"
    path = save_model(tiny_model("valid"), tmp_path / "mine.safetensors")
    panel.state.model = load_model(path)
    third = ModelPanel(viewer)
    assert third.model_combo.currentText() == FILE_ENTRY
    assert third.path_edit.text() == str(path) and third.path_edit.isEnabled()


def test_bioimageio_package_loads_from_the_panel(make_napari_viewer, qtbot, tmp_path):
    from napari_unet._widgets.model_panel import FILE_ENTRY, ModelPanel
    from napari_unet.io.bioimageio import export_package

    pkg = export_package(tiny_model("same"), tmp_path / "pkg.zip")
    panel = ModelPanel(make_napari_viewer())
    panel.model_combo.setCurrentText(FILE_ENTRY)
    panel.path_edit.setText(str(pkg))
    assert not panel.trust_check.isChecked()  # package code never runs by default
    panel._on_run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60000)
    assert panel.state.model is not None
    assert panel.state.model.info.format == "bioimageio"
    assert "bioimageio" in panel.card.toPlainText()


def test_panels_opened_from_the_plugins_menu_share_one_model(make_napari_viewer, qtbot):
    """napari gives each dock widget its own proxy of the viewer; the panels must still
    share the viewer's model (one state per viewer, not per proxy)."""
    viewer = make_napari_viewer()
    _, model_panel = viewer.window.add_plugin_dock_widget("napari-unet", "U-Net model")
    _, segment = viewer.window.add_plugin_dock_widget("napari-unet", "U-Net segment")
    _, features = viewer.window.add_plugin_dock_widget("napari-unet", "U-Net feature maps")
    assert segment.state is model_panel.state is features.state
    model_panel.state.model = tiny_model("same")
    viewer.add_image(__import__("numpy").zeros((30, 30)), name="img")
    assert "30 x 30 pixels" in segment.axes_label.text()


def test_panels_opened_from_the_plugins_menu_keep_the_chosen_image(make_napari_viewer):
    """Through napari's proxy every layer read is a new proxy object: the chosen image
    must still be followed when layers are added, removed or renamed (it fell back to
    the first image, so the next run segmented or filled another image)."""
    import numpy as np

    viewer = make_napari_viewer()
    _, segment = viewer.window.add_plugin_dock_widget("napari-unet", "U-Net segment")
    _, finetune = viewer.window.add_plugin_dock_widget("napari-unet", "U-Net fine-tune")
    viewer.add_image(np.zeros((30, 30)), name="first")
    second = viewer.add_image(np.ones((30, 30)), name="second")
    for panel in (segment, finetune):
        panel.layer_combo.setCurrentText("second")
    viewer.add_labels(np.zeros((30, 30), np.uint8), name="result")
    viewer.add_points(name="points")
    second.name = "renamed"
    viewer.layers.remove("points")
    for panel in (segment, finetune):
        assert panel.layer_combo.currentText() == "renamed"
        assert panel.image_layer() is second


@pytest.mark.parametrize("screen", [1080, 768])
def test_four_docked_panels_fit_a_laptop_screen_and_keep_their_text(
    make_napari_viewer, qtbot, monkeypatch, screen
):
    """All four panels docked in one column made napari's window at least 1,915 px high:
    on a screen of 1,080 the panels were squeezed and wrapped text cut to a line. They
    scroll now, as wide as their controls, with their text whole. Then the window was
    still 958 px high: on a 768-px laptop screen the fine-tune panel's Train button lay
    below its edge (found by a GUI tester)."""
    import numpy as np

    from napari_unet._widgets import _scroll

    monkeypatch.setattr(_scroll, "available_height", lambda widget: screen)
    viewer = make_napari_viewer(show=True)
    panels = [
        viewer.window.add_plugin_dock_widget("napari-unet", name)[1]
        for name in ("U-Net model", "U-Net segment", "U-Net feature maps", "U-Net fine-tune")
    ]
    panels[0].state.model = tiny_model("same")
    viewer.add_image(np.zeros((3, 5, 40, 40), np.float32), name="a_rather_long_layer_name" * 2)
    segment = panels[1]
    segment.status.setText("Error: " + "a message long enough to wrap over several lines " * 4)
    qtbot.wait(200)
    # the window's title bar (about 32 px) comes on top
    assert viewer.window._qt_window.minimumSizeHint().height() <= screen - 32
    assert segment.axes_label.height() >= segment.axes_label.heightForWidth(
        segment.axes_label.width()
    )
    # squeezed on a small screen, a status cut short holds its text in its tooltip
    status = segment.status
    if screen == 768:
        assert status.cut() and status.toolTip() == status.text()
    else:
        assert not status.cut() and status.toolTip() == ""
    for panel in panels:
        assert panel._inner.width() >= panel._inner.minimumSizeHint().width()


def test_the_card_takes_the_panels_room(make_napari_viewer, qtbot):
    """The card sat in 190 px with a scroll bar above 560 px of nothing."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 1000)
    model = viewer.window.add_plugin_dock_widget("napari-unet", "U-Net model")[1]
    model.state.model = tiny_model("same")
    qtbot.wait(200)
    assert model.card.height() > model.height() - 400  # all but the choices and buttons


def _ended_not_delivered():
    """Wait for the worker threads to end without turning the event loop: their
    results are queued, not yet delivered (what a busy GUI sees)."""
    from qtpy.QtCore import QThreadPool

    assert QThreadPool.globalInstance().waitForDone(30000)


def _loaded_not_delivered(viewer, tmp_path):
    """A model panel whose load of a file has ended, its model not yet delivered;
    returns the panel and the model in use before."""
    from napari_unet._widgets.model_panel import FILE_ENTRY, ModelPanel

    path = save_model(tiny_model("valid"), tmp_path / "mine.safetensors")
    panel = ModelPanel(viewer)
    before = tiny_model("same")
    panel.state.model = before
    panel.model_combo.setCurrentText(FILE_ENTRY)
    panel.path_edit.setText(str(path))
    panel._on_run()
    _ended_not_delivered()
    return panel, before


def test_cancel_after_the_load_ended_keeps_the_model(make_napari_viewer, qtbot, tmp_path):
    """Cancel pressed while the loaded model was on its way swapped the model all the same."""
    panel, before = _loaded_not_delivered(make_napari_viewer(), tmp_path)
    panel._on_cancel()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=20000)
    assert panel.state.model is before
    assert panel.status.text().startswith("Cancelled")


def test_a_run_started_while_loading_is_not_discarded(make_napari_viewer, qtbot, tmp_path):
    """The question 'loading discards your run' was asked only when Load was pressed: a
    run started (or a version made) while the model loaded was discarded silently."""
    panel, before = _loaded_not_delivered(make_napari_viewer(), tmp_path)

    class Trainer:  # a fine-tune panel whose run is going on
        going = True

        def is_training(self):
            return self.going

    trainer = panel.state.trainer = Trainer()  # Train pressed in the fine-tune panel meanwhile
    qtbot.waitUntil(lambda: panel.worker is None, timeout=20000)
    assert panel.state.model is before
    assert "a fine-tune run started while it loaded" in panel.status.text()
    trainer.going = False
    # the panel gone (closed and collected, its run with it): no run is going on (the
    # flag stayed on, and every load asked about a run that was no more)
    import gc

    trainer.going = True
    assert panel.state.training
    del trainer
    gc.collect()
    assert not panel.state.training
    # versions of a model loaded anew get names of their own (they restarted at -v1)
    names = [panel.state.new_version_name("nuclei-v1") for _ in range(3)]
    assert names == ["nuclei-v1", "nuclei-v1.2", "nuclei-v1.3"]
    panel._on_run()  # nothing at stake any more: it loads and switches
    qtbot.waitUntil(lambda: panel.worker is None, timeout=20000)
    assert panel.state.model is not before
