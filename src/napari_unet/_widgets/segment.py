"""Segment panel: run the loaded model on an image layer, tile by tile, in a worker."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QSpinBox,
)

from napari_unet._widgets._base import WorkerPanel
from napari_unet._widgets._layers import LayerJob, job_for_layer, viewer_camera
from napari_unet._widgets._results import add_or_update

# what the controls without a self-explaining text do
TIPS = {
    "mode_combo": "instances: one label per object; labels: the class of each pixel "
    "(class k as label k + 1, named on hover); probabilities: one map per class",
    "tile_spin": "Network input per tile, snapped to a size the network accepts; auto: as "
    "large as memory allows. Smaller tiles use less memory, with the same result",
    "batch_spin": "Tiles per pass of the network; auto: from the GPU's free memory, 1 on the CPU",
    "amp_check": "Half precision on an NVIDIA GPU: faster, probabilities within about "
    "0.001; the CPU always computes in full precision",
    "plane_check": "Only the plane shown (Z, time...), not the whole stack",
    "visible_check": "Only the part of the image in view: quick answers on large images",
    "threshold_spin": "Foreground probability above which a pixel belongs to an object",
    "min_size_spin": "Objects with fewer pixels are dropped",
}

# 'Visible region only': the description follows the view once it has been still this long
# (a pan or zoom sends dozens of camera events a second, each described the layer again)
CAMERA_SETTLE_MS = 200


class SegmentPanel(WorkerPanel):
    """Segment an image layer with the viewer's model; results appear as new layers."""

    run_text = "Segment"

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer)
        form = QFormLayout()
        self.add_image_choice(form)
        self.axes_label = QLabel("")
        self.axes_label.setWordWrap(True)
        form.addRow("", self.axes_label)
        self._build_run_rows(form)
        self._build_object_rows(form)
        self.form.addLayout(form)
        for name, tip in TIPS.items():
            getattr(self, name).setToolTip(tip)
        # the run going on: its layer job, model and output mode
        self._job: tuple[LayerJob, object, str, dict] | None = None
        self._source = None  # source_of the image as the run started
        self._recipe_shown = None  # the instance recipe and object size last shown
        self._camera_timer = QTimer(self)  # restarted by each camera event
        self._camera_timer.setSingleShot(True)
        self._camera_timer.setInterval(CAMERA_SETTLE_MS)
        self._connect()
        self._on_layers_changed()
        self._on_mode(self.mode_combo.currentText())
        self._show_recipe(self.state.model)
        self._on_device(self.state.device)

    def _build_run_rows(self, form) -> None:
        """What is computed, and how: output, tiles, precision, plane and region."""
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(["instances", "labels", "probabilities"])
        form.addRow("Output", self.mode_combo)
        self.tile_spin = _spin(QSpinBox(), 0, 8192, suffix=" px", auto=True)
        form.addRow("Tile size", self.tile_spin)
        self.batch_spin = _spin(QSpinBox(), 0, 64, auto=True)
        form.addRow("Batch size", self.batch_spin)
        self.amp_check = QCheckBox("Mixed precision (CUDA)")
        self.amp_check.setChecked(True)
        form.addRow("", self.amp_check)
        self.tta_check = QCheckBox("Average over mirrored tiles (4x slower)")
        self.tta_check.setToolTip(
            "Test-time augmentation: each tile is also predicted mirrored and the "
            "results are averaged; smoother maps, often slightly better objects."
        )
        form.addRow("", self.tta_check)
        self.plane_check = QCheckBox("Current plane only")
        form.addRow("", self.plane_check)
        self.visible_check = QCheckBox("Visible region only")
        form.addRow("", self.visible_check)

    def _build_object_rows(self, form) -> None:
        """Instances: threshold, size and confidence; rescaling to the model's objects."""
        self.threshold_spin = _spin(QDoubleSpinBox(), 0.01, 0.99, step=0.05)
        self.threshold_spin.setValue(0.5)
        form.addRow("Threshold", self.threshold_spin)
        self.min_size_spin = _spin(QSpinBox(), 0, 100000, suffix=" px")
        form.addRow("Min. object size", self.min_size_spin)
        self.confidence_spin = _spin(QDoubleSpinBox(), 0.0, 0.99, step=0.05)
        self.confidence_spin.setToolTip(
            "Objects whose mean foreground probability is lower are dropped "
            "(set by the model; lower it for dim images the model is unsure about)."
        )
        form.addRow("Min. confidence", self.confidence_spin)
        self.rescale_check = QCheckBox("Rescale to the model's object size")
        self.rescale_check.setToolTip(
            "The image is resized so that its objects have the diameter the model was "
            "trained on, segmented, and the result resized back."
        )
        form.addRow("", self.rescale_check)
        self.diameter_spin = _spin(QDoubleSpinBox(), 0.0, 2000.0, suffix=" px", auto=True)
        self.diameter_spin.setDecimals(1)
        self.diameter_spin.setToolTip(
            "Typical object diameter in this image; auto: measured on a first pass."
        )
        form.addRow("Object diameter", self.diameter_spin)

    def _connect(self) -> None:
        self.tile_spin.editingFinished.connect(self._on_tile_edited)
        self.mode_combo.currentTextChanged.connect(self._on_mode)
        self.rescale_check.toggled.connect(self.diameter_spin.setEnabled)
        self.state.model_changed.connect(self._on_model_changed)
        self.state.device_changed.connect(self._on_device)
        # the description says what a run would process: it follows the plane shown
        self.plane_check.toggled.connect(self._on_layer_choice)
        self.visible_check.toggled.connect(self._on_layer_choice)
        camera = viewer_camera(self.viewer)
        camera.events.center.connect(self._on_camera)
        camera.events.zoom.connect(self._on_camera)
        self._camera_timer.timeout.connect(self._on_camera_settled)
        self.viewer.dims.events.current_step.connect(self._on_view_changed)
        self.viewer.dims.events.ndisplay.connect(self._on_view_changed)
        self.viewer.dims.events.order.connect(self._on_view_changed)

    # -- controls --------------------------------------------------------------
    def _on_layer_choice(self, name: str = "") -> None:
        self.axes_label.setText(self._describe())

    def _on_view_changed(self, event=None) -> None:
        if self.plane_check.isChecked() or self.visible_check.isChecked():
            self.axes_label.setText(self._describe())

    def _on_camera(self, event=None) -> None:
        if self.visible_check.isChecked():  # the region said follows the view, once still
            self._camera_timer.start()

    def _on_camera_settled(self) -> None:
        if self.visible_check.isChecked():
            self.axes_label.setText(self._describe())

    def _on_model_changed(self, model) -> None:
        if model is not None and self.status.text().startswith("Load a model"):
            self.status.setText("")  # (said at a Segment pressed before a model was loaded)
        self.axes_label.setText(self._describe())
        self._show_recipe(model)
        self._on_tile_edited()  # a size the new model takes (208 for nuclei ran as 204)

    def _on_device(self, device: str) -> None:
        """Mixed precision applies on CUDA only: greyed out for the CPU (and MPS)."""
        from napari_unet.core.device import resolve_device

        try:
            cuda = resolve_device(device).type == "cuda"
        except ValueError:
            cuda = False
        self.amp_check.setEnabled(cuda)

    def _show_recipe(self, model) -> None:
        recipe = (model.info.instances or {}) if model is not None else {}
        diameter = model.info.object_diameter if model is not None else None
        shown = (repr(sorted(recipe.items())), diameter)
        if shown == self._recipe_shown:
            return  # the same recipe (a fine-tuned version of it): the user's settings stay
        self._recipe_shown = shown
        self.confidence_spin.setValue(float(recipe.get("min_confidence", 0.0)))
        sized = model is not None and bool(model.info.object_diameter)
        self.rescale_check.setChecked(sized)
        self.rescale_check.setEnabled(sized)
        self.diameter_spin.setEnabled(sized)
        # short: a checkbox does not wrap, and a wide one made the dock push napari's
        # canvas to 0 px in its default window
        self.rescale_check.setText(
            f"Rescale to model's object size ({model.info.object_diameter:.0f} px)"
            if sized
            else "Rescale (model records no size)"
        )

    def _on_mode(self, mode: str) -> None:
        self.threshold_spin.setEnabled(mode == "instances")
        self.min_size_spin.setEnabled(mode == "instances")
        self.confidence_spin.setEnabled(mode == "instances")

    def _on_tile_edited(self) -> None:
        model = self.state.model
        t = self.tile_spin.value()
        if model is not None and t and model.info.fixed_input is None:
            from napari_unet.core.tile_plan import smallest_tile

            # as the run will use it: an accepted size, at least twice the halo plus one
            # pooling step (100 px showed as 96 and ran as 208 for nuclei)
            g = model.info.geometry
            self.tile_spin.setValue(max(smallest_tile(g), g.snap(t, "nearest")))

    def _describe(self) -> str:
        layer, model = self.image_layer(), self.state.model
        if layer is None:
            return "Add an image layer."
        if model is None:
            return "Load a model in the napari-unet model panel."
        try:
            return job_for_layer(
                layer,
                model,
                self.viewer,
                self.plane_check.isChecked(),
                self.visible_check.isChecked(),
            ).describe
        except ValueError as err:
            return f"Cannot segment this layer: {err}"

    # -- running ---------------------------------------------------------------
    def options(self):
        from napari_unet.core.segment import SegmentOptions

        return SegmentOptions(
            mode=self.mode_combo.currentText(),
            tile=self.tile_spin.value() or None,
            batch_size=self.batch_spin.value() or None,
            device=self.state.device,
            amp=self.amp_check.isChecked(),
            tta=self.tta_check.isChecked(),
            threshold=self.threshold_spin.value(),
            min_size=self.min_size_spin.value(),
            min_confidence=self.confidence_spin.value(),
            diameter=(self.diameter_spin.value() or "auto")
            if self.rescale_check.isChecked()
            else None,
            should_stop=self.abort.is_set,
        )

    def _on_run(self) -> None:
        from napari_unet.core.segment import run_record, segment_iter

        layer, model = self.image_layer(), self.state.model
        if layer is None or model is None:
            self.status.setText(self._describe())
            return
        try:
            job = job_for_layer(
                layer,
                model,
                self.viewer,
                self.plane_check.isChecked(),
                self.visible_check.isChecked(),
            )
        except ValueError as err:
            self._on_errored(err)
            return
        opts = replace(self.options(), axes=job.axes, region=job.region)
        if self.busy():
            return
        # the result is shown as asked now, whatever the controls or the model become meanwhile
        self._job = (job, model, opts.mode, run_record(model, opts))
        self._source = self.source_of(layer)  # a result is only shown over what it came from
        self.status.setText(f"Segmenting {layer.name}: {job.describe}")
        self.start(segment_iter, job.data, model, opts, desc=f"napari-unet: {layer.name}")

    def _on_yielded(self, progress) -> None:
        self.status.setText(progress.message)
        if progress.detail and self._job is not None:  # the object size, for the result
            self._job[3].update(progress.detail, sizing=progress.message)

    def _on_returned(self, result: np.ndarray) -> None:
        if self._job is None:
            return
        job, model, mode, run = self._job
        layer, lost = self._source[0], self.source_lost(self._source)
        self._source = None
        if lost == "removed":
            self.status.setText(
                f"{job.layer_name} was removed while it was segmented: the result was dropped."
            )
            return
        if lost:
            what = "data was replaced" if lost == "replaced" else "scale or translate changed"
            self.status.setText(
                f"{layer.name}'s {what} while it was segmented: the result was dropped; "
                "press Segment again."
            )
            return
        # named after the image as it is called now (renamed meanwhile: its new name)
        job = replace(job, layer_name=layer.name)
        sizing = run.pop("sizing", "")  # the sentence, for the status line (its figures stay)
        names, kept = add_or_update(self.viewer, job, model, mode, result, run)
        note = f"; {sizing}" if sizing else ""
        if kept:
            note += " (kept as they are: " + "; ".join(f"{k!r}, {why}" for k, why in kept) + ")"
        self.status.setText(f"Done: {', '.join(names)}{note}")


def _spin(spin, low, high, suffix: str = "", step=None, auto: bool = False):
    """``spin`` ranged (and ``auto`` at its lowest value)."""
    spin.setRange(low, high)
    if suffix:
        spin.setSuffix(suffix)
    if step is not None:
        spin.setSingleStep(step)
    if auto:
        spin.setSpecialValueText("auto")
    return spin
