"""Every panel explains its settings, and says what to do before a model is loaded."""

import pytest

from conftest import plugin_viewer

pytest.importorskip("napari")

# self-explaining: the image and model pickers, and the model panel's file field
PLAIN = {"layer_combo", "model_combo"}


@pytest.mark.parametrize(
    "path",
    [
        "napari_unet._widgets.segment:SegmentPanel",
        "napari_unet._widgets.feature_maps:FeatureMapPanel",
        "napari_unet._widgets.finetune:FinetunePanel",
        "napari_unet._widgets.model_panel:ModelPanel",
    ],
)
def test_settings_have_tooltips(make_napari_viewer, path):
    from importlib import import_module

    from qtpy.QtWidgets import QAbstractSpinBox, QComboBox, QListWidget

    module, name = path.split(":")
    panel = getattr(import_module(module), name)(plugin_viewer(make_napari_viewer()))
    settings = [
        w
        for w in panel.findChildren((QAbstractSpinBox, QComboBox, QListWidget))
        if w.objectName() not in PLAIN and w is not getattr(panel, "version_list", None)
    ]
    names = {id(v): k for k, v in vars(panel).items()}
    settings_obj = getattr(panel, "settings", None)
    if settings_obj is not None:
        names.update({id(v): k for k, v in vars(settings_obj).items()})
    missing = [
        names.get(id(w), type(w).__name__)
        for w in settings
        if not w.toolTip() and names.get(id(w)) not in PLAIN
    ]
    assert settings and not missing


def test_panels_say_to_load_a_model_first(make_napari_viewer):
    from napari_unet._widgets.feature_maps import FeatureMapPanel
    from napari_unet._widgets.finetune import FinetunePanel

    viewer = plugin_viewer(make_napari_viewer())
    for panel in (FeatureMapPanel(viewer), FinetunePanel(viewer)):
        assert panel.status.text().startswith("Load a model in the model panel")
