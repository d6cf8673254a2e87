"""Screenshots of the napari-unet panels docked in napari with real output.

    xvfb-run -a python scripts/screenshots.py [--model nuclei]

Writes docs/images/segment_panel.png (model + segment panels, nuclei sample
segmented into instances), docs/images/nuclei_result.png (canvas only) and
docs/images/membranes_panel.png (the em-membrane model on the EM sample),
docs/images/feature_maps_panel.png and docs/images/finetune_panel.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_unet._sample_data import membranes_sample, nuclei_sample
from napari_unet._widgets.feature_maps import FeatureMapPanel
from napari_unet._widgets.finetune import FinetunePanel
from napari_unet._widgets.model_panel import FILE_ENTRY, ModelPanel
from napari_unet._widgets.segment import SegmentPanel

OUT = Path(__file__).resolve().parent.parent / "docs" / "images"


def show_whole(viewer, dock) -> None:
    """Give the panel docked last the height its controls ask for (the dock column
    otherwise leaves the room to the first panel and scrolls the last one)."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QDockWidget

    QApplication.processEvents()
    window = viewer.window._qt_window
    right = Qt.DockWidgetArea.RightDockWidgetArea
    column = [
        d
        for d in window.findChildren(QDockWidget)
        if d.isVisible() and window.dockWidgetArea(d) == right
    ]
    others = [d for d in column if d is not dock]
    room = sum(d.height() for d in column)
    want = min(dock.sizeHint().height(), room - sum(d.minimumSizeHint().height() for d in others))
    share = (room - want) // max(1, len(others))
    window.resizeDocks([*others, dock], [share] * len(others) + [want], Qt.Orientation.Vertical)
    # the scroll areas settle over a few turns of the event loop (after one, a scroll bar
    # shown for the old height still covered the controls' right edge in the shot)
    for _ in range(5):
        QApplication.processEvents()


def wait(panel, timeout=600):
    t = time.time()
    while not panel.idle() and time.time() - t < timeout:
        QApplication.processEvents()
        time.sleep(0.02)
    for _ in range(20):
        QApplication.processEvents()


def shoot(sample, model: str, mode: str, name: str, canvas_name: str | None = None):
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    for data, meta, kind in sample():
        if kind == "image":
            getattr(viewer, f"add_{kind}")(data, **meta)
    model_panel = ModelPanel(viewer)
    segment = SegmentPanel(viewer)
    viewer.window.add_dock_widget(model_panel, name="U-Net model", area="right")
    dock = viewer.window.add_dock_widget(segment, name="U-Net segment", area="right")
    if Path(model).exists():
        model_panel.model_combo.setCurrentText(FILE_ENTRY)
        model_panel.path_edit.setText(model)
    else:
        model_panel.model_combo.setCurrentText(model)
    model_panel._on_run()
    wait(model_panel)
    segment.mode_combo.setCurrentText(mode)
    segment._on_run()
    wait(segment)
    layer = viewer.layers[-1]
    if mode == "instances":
        layer.contour = 2
    layer.opacity = 0.6
    OUT.mkdir(parents=True, exist_ok=True)
    show_whole(viewer, dock)
    viewer.window.screenshot(str(OUT / name), canvas_only=False)
    if canvas_name:
        viewer.screenshot(str(OUT / canvas_name), canvas_only=True, size=(700, 700))
    print(f"wrote {name}: {segment.status.text()}")
    viewer.close()


def shoot_features(model: str, name: str) -> None:
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    image, meta, _ = nuclei_sample()[0]
    viewer.add_image(image, **meta)
    model_panel = ModelPanel(viewer)
    panel = FeatureMapPanel(viewer)
    viewer.window.add_dock_widget(model_panel, name="U-Net model", area="right")
    dock = viewer.window.add_dock_widget(panel, name="U-Net feature maps", area="right")
    if Path(model).exists():
        model_panel.model_combo.setCurrentText(FILE_ENTRY)
        model_panel.path_edit.setText(model)
    model_panel._on_run()
    wait(model_panel)
    for i in range(panel.stage_list.count()):
        item = panel.stage_list.item(i)
        item.setSelected(item.text() in ("enc2",))
    panel.region_combo.setCurrentText("whole plane")
    panel.channels_spin.setValue(8)  # the 8 most variable channels, most variable first
    panel._on_run()
    wait(panel)
    viewer.layers[0].colormap = "gray"
    viewer.layers[-1].opacity = 0.8
    viewer.dims.set_point(0, 0)
    show_whole(viewer, dock)
    viewer.window.screenshot(str(OUT / name), canvas_only=False)
    print(f"wrote {name}: {panel.status.text()}")
    viewer.close()


def shoot_finetune(model: str, name: str, seconds: int) -> None:
    """Strokes painted (simulated) on a dim, unevenly lit image; a short fine-tune."""
    from napari_unet.core import synthetic
    from napari_unet.core.targets import instances_to_classes

    raw, truth = synthetic.nuclei(seed=200)
    image = synthetic.dim_uneven(raw, 200)
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 1050)
    viewer.add_image(image, name="dim nuclei", colormap="gray")
    model_panel = ModelPanel(viewer)
    panel = FinetunePanel(viewer)
    viewer.window.add_dock_widget(model_panel, name="U-Net model", area="right")
    dock = viewer.window.add_dock_widget(panel, name="U-Net fine-tune", area="right")
    model_panel.model_combo.setCurrentText(model)
    model_panel._on_run()
    wait(model_panel)
    panel.layer_combo.setCurrentText("dim nuclei")
    ann = panel.new_annotation_layer()
    ann.data = synthetic.strokes(instances_to_classes(truth, 1), 300, seed=0)
    panel.settings.seconds_spin.setValue(seconds)
    panel.preview_spin.setValue(40)
    panel._on_run()
    wait(panel)
    if "dim nuclei [fine-tune preview]" in viewer.layers:  # (none in a run too short)
        viewer.layers["dim nuclei [fine-tune preview]"].opacity = 0.35
    viewer.layers.move(viewer.layers.index(ann), len(viewer.layers) - 1)
    show_whole(viewer, dock)
    viewer.window.screenshot(str(OUT / name), canvas_only=False)
    print(f"wrote {name}: {panel.status.text()}")
    viewer.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="nuclei")
    p.add_argument("--em-model", default="em-membrane")
    p.add_argument("--only", choices=("nuclei", "em", "features", "finetune"))
    p.add_argument("--seconds", type=int, default=30, help="fine-tuning time in the shot")
    args = p.parse_args()
    if args.only in (None, "nuclei"):
        shoot(nuclei_sample, args.model, "instances", "segment_panel.png", "nuclei_result.png")
    if args.only in (None, "em"):
        shoot(membranes_sample, args.em_model, "labels", "membranes_panel.png")
    if args.only in (None, "features"):
        shoot_features(args.model, "feature_maps_panel.png")
    if args.only in (None, "finetune"):
        shoot_finetune(args.model, "finetune_panel.png", args.seconds)


if __name__ == "__main__":
    main()
