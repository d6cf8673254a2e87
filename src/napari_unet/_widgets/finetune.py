"""Fine-tune panel: paint where the model is wrong, retrain in a worker, watch, repeat.

The panel only wires napari to the core: annotations become
:func:`~napari_unet.core.finetune.painted_planes`, a run is
:func:`~napari_unet.core.finetune.finetune_iter` with ``TrainConfig.finetune``,
and every finished run is a new entry of
:class:`~napari_unet.core.finetune.ModelVersions` (the base is never changed).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QListWidget,
    QPushButton,
    QSpinBox,
)

from napari_unet._widgets._base import WorkerPanel
from napari_unet._widgets._layers import (
    ANNOTATION_KEY,
    RESULT_KEY,
    job_for_layer,
    mark_result,
    overwritable,
)
from napari_unet._widgets._loss_plot import LossPlot
from napari_unet.core.axes import Axes
from napari_unet.core.finetune import Collected, Finished, Preview

KIND_KEY = "napari_unet_kind"  # layer.metadata: "sparse" (painted classes) or "instances"
CLASS_COLORS = ["#4a90d9", "#3cb44b", "#e6194b", "#ffe119", "#f58231", "#911eb4", "#46f0f0"]


def annotation_colormap(classes):
    from napari.utils.colormaps import DirectLabelColormap

    colors = {0: "transparent", None: "transparent"}
    for k in range(len(classes)):
        colors[k + 1] = CLASS_COLORS[k % len(CLASS_COLORS)]
    return DirectLabelColormap(color_dict=colors)


class FinetunePanel(WorkerPanel):
    """Annotate and retrain: sparse strokes on Labels layers fine-tune the current model."""

    run_text = "Train"

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer)
        from napari_unet.core.finetune import ModelVersions  # noqa: F401 - core import check

        self._setting_model = False
        self._mode = ""  # what the worker does: "train", "fill" or "save"
        self._fill_made = None  # an annotation layer made by "Start from prediction"
        self._stop = threading.Event()
        self._preview_job = None
        self._preview_layer = lambda: None  # weak reference to this panel's preview layer

        form = QFormLayout()
        self.add_image_choice(form)
        row = QHBoxLayout()
        self.new_button = QPushButton("New annotation layer")
        self.fill_button = QPushButton("Start from prediction")
        row.addWidget(self.new_button)
        row.addWidget(self.fill_button)
        form.addRow(row)
        row = QHBoxLayout()
        self.pair_button = QPushButton("Use selected Labels layer")
        self.pair_button.setToolTip(
            "Train on a Labels layer you already have (selected in the layer list), "
            "for the chosen image"
        )
        self.kind_combo = QComboBox()
        self.kind_combo.addItems(["as painted classes", "as instance masks"])
        row.addWidget(self.pair_button)
        row.addWidget(self.kind_combo)
        form.addRow(row)
        self.seconds_spin = QSpinBox()
        self.seconds_spin.setRange(5, 36000)
        self.seconds_spin.setValue(60)
        self.seconds_spin.setSuffix(" s")
        form.addRow("Time budget", self.seconds_spin)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100000)
        self.steps_spin.setValue(400)
        form.addRow("Max. steps", self.steps_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 1e-1)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(1e-3)
        form.addRow("Learning rate", self.lr_spin)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 64)
        self.batch_spin.setValue(4)
        form.addRow("Batch size", self.batch_spin)
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(32, 1024)
        self.patch_spin.setSingleStep(32)
        self.patch_spin.setValue(128)
        self.patch_spin.setSuffix(" px")
        form.addRow("Patch size", self.patch_spin)
        self.augment_check = QCheckBox("Augment (flips, rotations, intensity)")
        self.augment_check.setChecked(True)
        form.addRow("", self.augment_check)
        self.adapt_check = QCheckBox("Adapt normalisation to these images")
        self.adapt_check.setChecked(True)
        form.addRow("", self.adapt_check)
        # (short: checkboxes do not wrap, and the dock is as wide as its widest one)
        self.pseudo_check = QCheckBox("Keep confident predictions")
        self.pseudo_check.setToolTip(
            "Where nothing is painted, the model's own confident prediction (p >= 0.9) is "
            "kept as a weak target, so a few strokes do not unlearn the rest."
        )
        self.pseudo_check.setChecked(True)
        form.addRow("", self.pseudo_check)
        self.freeze_check = QCheckBox("Freeze encoder")
        form.addRow("", self.freeze_check)
        self.weights_combo = QComboBox()
        self.weights_combo.addItems(["balanced", "sqrt", "none"])
        form.addRow("Class weights", self.weights_combo)
        self.preview_spin = QSpinBox()
        self.preview_spin.setRange(0, 10000)
        self.preview_spin.setValue(50)
        self.preview_spin.setSpecialValueText("off")
        form.addRow("Preview every (steps)", self.preview_spin)
        self.form.addLayout(form)
        self.loss_plot = LossPlot()
        self.form.addWidget(self.loss_plot.widget)

        self.pause_button = QPushButton("Pause")
        self.pause_button.setEnabled(False)
        self.stop_button = QPushButton("Stop && keep")
        self.stop_button.setToolTip("End training now and keep what it learned as a version")
        self.stop_button.setEnabled(False)
        self.cancel_button.setToolTip("End training and discard this run")
        # in sight during a run, beside Train and Cancel (in the scrolled controls they
        # were hidden when four panels shared the dock)
        self.add_button_row(self.pause_button, self.stop_button)

        self.version_list = QListWidget()
        self.version_list.setMaximumHeight(110)
        self.form.addWidget(self.version_list)
        vrow = QHBoxLayout()
        self.use_button = QPushButton("Use selected")
        self.revert_button = QPushButton("Revert")
        self.save_button = QPushButton("Save selected...")
        for b in (self.use_button, self.revert_button, self.save_button):
            vrow.addWidget(b)
        self.form.addLayout(vrow)

        self.new_button.clicked.connect(self.new_annotation_layer)
        self.fill_button.clicked.connect(self.start_from_prediction)
        self.pair_button.clicked.connect(self.use_selected_labels)
        self.pause_button.clicked.connect(self._on_pause)
        self.stop_button.clicked.connect(self._on_stop)
        self.use_button.clicked.connect(self._on_use)
        self.revert_button.clicked.connect(self._on_revert)
        self.save_button.clicked.connect(self._on_save)
        self.state.model_changed.connect(self._on_model_changed)
        self._on_layers_changed()
        self._on_model_changed(self.state.model)

    # -- layers ------------------------------------------------------------------
    def annotation_layers(self, image_name: str | None = None, kind: str | None = None):
        from napari.layers import Labels

        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Labels)
            and layer.metadata.get(ANNOTATION_KEY)
            and (image_name is None or layer.metadata[ANNOTATION_KEY] == image_name)
            and (kind is None or layer.metadata.get(KIND_KEY, "sparse") == kind)
        ]

    def new_annotation_layer(self):
        """A Labels layer for the chosen image: 0 = not annotated, k = class k - 1."""
        layer, model = self.image_layer(), self.state.model
        if layer is None or model is None:
            self.status.setText("Choose an image layer and load a model first.")
            return None
        try:
            job = job_for_layer(layer, model, self.viewer)
        except ValueError as err:
            self._on_errored(err)
            return None
        shape = job.output_shape()
        classes = model.info.classes
        name = f"{layer.name} annotations"
        n = 1
        while name in self.viewer.layers:
            n += 1
            name = f"{layer.name} annotations {n}"
        features = {"class": ["not annotated", *classes]}
        labels = self.viewer.add_labels(
            np.zeros(shape, np.uint8),
            name=name,
            **job.placement(),
            features=features,
            colormap=annotation_colormap(classes),
            metadata={ANNOTATION_KEY: layer.name},
            opacity=0.8,
        )
        labels.mode = "paint"
        labels.brush_size = 3
        labels.selected_label = min(2, len(classes))
        legend = ", ".join(f"{k + 1} = {c}" for k, c in enumerate(classes))
        self.status.setText(f"Paint on '{name}': {legend} (0 = not annotated).")
        return labels

    def use_selected_labels(self):
        """Pair the selected Labels layer with the chosen image (classes or instances)."""
        from napari.layers import Labels

        layer, active = self.image_layer(), self.viewer.layers.selection.active
        if layer is None or not isinstance(active, Labels):
            self.status.setText("Choose the image above and select a Labels layer in the list.")
            return
        kind = "instances" if "instance" in self.kind_combo.currentText() else "sparse"
        active.metadata[ANNOTATION_KEY] = layer.name
        active.metadata[KIND_KEY] = kind
        what = (
            "instance masks (0 = background; every plane with objects is used in full)"
            if kind == "instances"
            else "painted classes (0 = not annotated, k = class k - 1)"
        )
        self.status.setText(f"'{active.name}' annotates '{layer.name}' as {what}.")

    def _on_layers_changed(self, event=None) -> None:
        """Annotation layers name their image: they follow it when it is renamed."""
        before = getattr(self, "_names", {})
        for layer in self.viewer.layers:
            old = before.get(id(layer))
            if old is not None and old != layer.name:
                for ann in self.viewer.layers:
                    if ann.metadata.get(ANNOTATION_KEY) == old:
                        ann.metadata[ANNOTATION_KEY] = layer.name
        self._names = {id(layer): layer.name for layer in self.viewer.layers}
        super()._on_layers_changed(event)

    def start_from_prediction(self):
        """Fill the unpainted pixels of the current plane with the model's classes."""
        layer, model = self.image_layer(), self.state.model
        if self.busy():  # its result would be taken for this fill's, or the reverse
            return
        if layer is None or model is None:
            self.status.setText("Choose an image layer and load a model first.")
            return
        if self.viewer.dims.ndisplay != 2:
            self.status.setText("Switch to the 2D view: the fill paints the plane shown.")
            return
        from napari_unet.core.segment import SegmentOptions, segment_iter

        try:  # checked before an annotation layer is made for it
            job = job_for_layer(layer, model, self.viewer, current_plane=True)
        except ValueError as err:
            self._on_errored(err)
            return
        targets = self.annotation_layers(layer.name, "sparse")
        # a layer made for this fill goes again if the fill fails or is cancelled
        self._fill_made = None if targets else self.new_annotation_layer()
        targets = targets or [self._fill_made]
        if targets[0] is None:
            return
        shape = targets[0].data.shape
        if tuple(shape[-2:]) != Axes(job.axes, tuple(np.shape(job.data))).yx:
            self.status.setText(
                f"'{targets[0].name}' has planes of {shape[-2]} x {shape[-1]} pixels, not the "
                f"image's: paint on a layer made for '{layer.name}' (New annotation layer)."
            )
            return
        # the image's plane shown now (the user may move on while the model runs), in
        # the annotation layer: with the one-plane channel axis of a Z, C, Y, X image's
        # layers or, for a layer of the user's, without it
        plane = list(job.plane or ())
        if job.channel_at is not None and len(shape) == len(plane) + 3:
            plane.insert(job.channel_at, 0)
        self._fill_target = (targets[0], tuple(plane))
        self._mode = "fill"
        options = SegmentOptions(
            mode="labels",  # the classes, computed in the worker (not the GUI thread)
            axes=job.axes,
            device=self.state.device,
            diameter=_diameter(model),
        )
        self.start(
            segment_iter, job.data, model, options, desc="napari-unet: prediction to correct"
        )

    # -- model / versions -----------------------------------------------------------
    @property
    def versions(self):
        """The viewer's fine-tuned versions (kept in its state: a closed and reopened
        panel finds them again)."""
        return self.state.versions

    @versions.setter
    def versions(self, value) -> None:
        self.state.versions = value

    def _on_model_changed(self, model) -> None:
        if self._setting_model:
            return
        from napari_unet.core.finetune import ModelVersions

        if self.versions is not None and self.versions.holds(model):
            self._refresh_versions()  # one of the versions (this panel reopened): kept
            return
        running = self._mode if self.worker is not None else ""
        if running in ("train", "fill"):  # it learns from, or predicts with, a model gone
            self._on_cancel()
        lost = self.state.unsaved
        self.versions = ModelVersions(model) if model is not None else None
        self._refresh_versions()
        if model is None:
            return
        what = []
        if running == "train":
            what.append("the run going on was discarded (train again on the new model)")
        elif running == "fill":
            what.append("nothing was filled (press 'Start from prediction' again for its answer)")
        if lost:
            what.append(
                f"the unsaved versions {', '.join(lost)} are gone; fine-tuning now starts from it"
            )
        if what:
            self.status.setText(
                f"Another model was loaded ({model.info.name}): {'; '.join(what)}."
            )
        else:
            self.status.setText("")

    def _refresh_versions(self) -> None:
        self.version_list.clear()
        self.state.record_unsaved()
        if self.versions is None:
            return
        for i in range(len(self.versions.versions)):
            mark = "* " if i == self.versions.current else "  "
            self.version_list.addItem(mark + self.versions.describe(i))
        self.version_list.setCurrentRow(self.versions.current)

    def _set_model(self, model) -> None:
        self._setting_model = True
        try:
            self.state.model = model
        finally:
            self._setting_model = False
        self._refresh_versions()

    def _on_use(self) -> None:
        if self.versions is None:
            return
        row = max(0, self.version_list.currentRow())
        self._set_model(self.versions.select(row))
        self.status.setText(f"Using {self.versions.versions[row].label}.")

    def _on_revert(self) -> None:
        if self.versions is None:
            return
        self._set_model(self.versions.revert())
        self.status.setText(f"Reverted to {self.versions.versions[self.versions.current].label}.")

    def _on_save(self, path: str | None = None) -> None:
        if self.versions is None:
            return
        row = max(0, self.version_list.currentRow())
        model = self.versions.versions[row].model
        if not path:
            path, chosen = QFileDialog.getSaveFileName(
                self,
                "Save model version",
                f"{model.info.name or 'model'}.safetensors",
                "napari-unet model (*.safetensors);;bioimage.io package (*.zip)",
            )
            path = _with_suffix(path, ".zip" if "*.zip" in chosen else ".safetensors")
        if not path or self.busy():
            return
        base = self.versions.base.info.source
        if base and Path(base).exists() and Path(path).resolve() == Path(base).resolve():
            self.status.setText(
                f"{path} is the file the base model was loaded from, which is never "
                "overwritten: save the version under another name."
            )
            return
        # in the worker: a bioimage.io export traces and checks the network (seconds)
        self._mode = "save"
        self._saving = (self.versions.versions[row], str(path))
        self.status.setText(f"Saving {self._saving[0].label} to {path}...")
        worker = self.start(_write_model, model, str(path), desc="napari-unet: saving a model")
        if worker:
            # the file is written in one go, into a temporary file renamed at the end:
            # there is nothing to cancel (a cancelled save wrote its file all the same)
            self.cancel_button.setEnabled(False)
            # recorded by the viewer's state, not only by this panel: closed meanwhile,
            # the version saved stayed "unsaved"
            worker.returned.connect(partial(_record_save, self.state, self._saving))

    # -- training ------------------------------------------------------------------
    def config(self):
        from napari_unet.core.augment import AugmentConfig
        from napari_unet.core.training import TrainConfig

        aug = (
            AugmentConfig(intensity=0.2, noise=0.03)
            if self.augment_check.isChecked()
            else AugmentConfig(flips=False, rotations=False, intensity=0.0, noise=0.0)
        )
        return TrainConfig.finetune(
            steps=self.steps_spin.value(),
            max_seconds=float(self.seconds_spin.value()),
            lr=self.lr_spin.value(),
            batch_size=self.batch_spin.value(),
            patch_size=self.patch_spin.value(),
            augment=aug,
            adapt_norm=self.adapt_check.isChecked(),
            pseudo_weight=0.5 if self.pseudo_check.isChecked() else 0.0,
            freeze_encoder=self.freeze_check.isChecked(),
            class_weighting=self.weights_combo.currentText(),
            device=self.state.device,
        )

    def annotation_pairs(self, model):
        """``(image data, annotation, image name, kind)`` of every annotation layer (all
        images): references to the image data (read later, in the worker) and a copy of
        the paint as it is now (painting on while it trains changes nothing)."""
        layers = self.annotation_layers()
        if not layers:
            raise ValueError("no annotation layer: press 'New annotation layer' and paint")
        pairs = []
        for ann in layers:
            name = ann.metadata[ANNOTATION_KEY]
            if name not in self.viewer.layers:
                raise ValueError(
                    f"annotation layer {ann.name!r} belongs to image {name!r}, which is gone"
                )
            job = job_for_layer(self.viewer.layers[name], model, self.viewer)
            paint = job.collapse(ann.data)
            paint = paint.copy() if isinstance(paint, np.ndarray) else paint
            # the image's axes as the segment panel reads them (C, Z, Y, X; thin stacks)
            pairs.append((job.data, paint, name, ann.metadata.get(KIND_KEY, "sparse"), job.axes))
        return pairs

    def collect(self, model):
        """Painted planes of every annotation layer (all images), checked."""
        from napari_unet.core.finetune import collect_planes

        planes, unpainted, collected = collect_planes(model, self.annotation_pairs(model))
        return planes, unpainted, collected.painted

    def _on_run(self) -> None:
        layer, model = self.image_layer(), self.state.model
        if self.versions is None or model is None:
            self.status.setText("Load a model in the napari-unet model panel first.")
            return
        if self.busy():
            return
        try:
            pairs = self.annotation_pairs(model)
            cfg = self.config()
            preview = None
            if layer is not None and self.preview_spin.value():
                preview = self._preview_region(layer, model)
        except ValueError as err:
            self._on_errored(err)
            return
        self._parent = self.versions.current
        self._run_versions = self.versions
        self._painted, self._what = {}, ""
        self._preview_job = preview
        self.loss_plot.reset()
        self._stop.clear()
        self._mode = "train"
        self.state.training = True
        self.status.setText("Reading the annotations...")
        from napari_unet.core.finetune import finetune_pairs_iter

        self.start(
            finetune_pairs_iter,
            model,
            pairs,
            cfg,
            preview=None if preview is None else (preview.data, preview.axes, preview.region),
            preview_every=self.preview_spin.value(),
            should_stop=self._stop.is_set,
            diameter=_diameter(model),
            total=cfg.steps,
            desc="napari-unet: fine-tuning",
            activity=False,  # the panel shows steps, rate and time left itself
        )
        self.pause_button.setEnabled(True)
        self.stop_button.setEnabled(True)

    def _preview_region(self, layer, model):
        """The current plane, cut to the field of view in 2D (previews stay quick)."""
        flat = self.viewer.dims.ndisplay == 2
        try:
            return job_for_layer(layer, model, self.viewer, current_plane=True, visible=flat)
        except ValueError:  # not in view: the whole plane
            return job_for_layer(layer, model, self.viewer, current_plane=True)

    def _on_pause(self) -> None:
        if self.worker is None or self.worker.abort_requested:
            return
        if self.worker.is_paused:
            self.worker.resume()
            self.pause_button.setText("Pause")
            self.status.setText("Resumed.")
        else:
            self.worker.pause()
            self.pause_button.setText("Resume")
            self.status.setText("Paused (time paused does not count).")

    def _on_stop(self) -> None:
        if self.worker is None or self.worker.abort_requested:
            return
        self._stop.set()
        if self.worker.is_paused:  # the step to stop after must run
            self.worker.resume()
            self.pause_button.setText("Pause")
        self.stop_button.setEnabled(False)
        self.status.setText("Stopping after this step; the result is kept as a version.")

    def _on_cancel(self) -> None:
        if self.worker is not None and self.worker.is_paused:
            self.worker.resume()
        if self.worker is None or self._mode == "save":
            return
        super()._on_cancel()
        self.pause_button.setEnabled(False)
        self.pause_button.setText("Pause")
        self.stop_button.setEnabled(False)
        if self._mode == "fill":
            self.status.setText("Cancelled: nothing was filled.")
        else:
            self.status.setText(
                "Cancelled: the run was discarded, the current version is unchanged."
            )

    def _on_closed(self) -> None:
        self.state.model_changed.disconnect(self._on_model_changed)
        super()._on_closed()  # a run is cancelled; a save goes on to the end

    def _on_yielded(self, value) -> None:
        from napari_unet.core.training import Phase, TrainStep

        # a report on its way when Pause or Stop was pressed keeps "Paused" / "Stopping"
        paused = self.worker is not None and self.worker.is_paused or self._stop.is_set()
        if isinstance(value, Collected):
            self._painted, self._what = value.painted, value.what
            if not paused:
                self.status.setText(f"Training on {value.what}...")
        elif isinstance(value, TrainStep):
            if not self.loss_plot.add(value.step, value.loss):
                return  # the plot and the text refresh together, a few times a second
            rate = value.step / value.elapsed if value.elapsed else 0.0
            if paused:
                return
            self.status.setText(
                f"step {value.step}/{value.steps}, loss {value.loss:.4f}, "
                f"{rate:.1f} steps/s, about {value.eta:.0f} s left"
            )
        elif isinstance(value, Preview):
            self._show_preview(value)
        elif isinstance(value, Phase) and not paused:
            self.status.setText(f"{value.message.capitalize()}... ({self._what})")

    def _show_preview(self, preview: Preview) -> None:
        """Show the preview in this panel's own preview layer; a layer the user edited or
        paired as annotations is never written into (a new preview layer is made)."""
        job = self._preview_job
        if job.layer_name not in self.viewer.layers:  # the image was removed meanwhile
            return
        layer = self._preview_layer()
        if layer is not None and layer in self.viewer.layers and overwritable(layer):
            layer.data = job.expand(preview.labels)
            for key, value in job.placement().items():
                setattr(layer, key, value)
        else:
            classes = self.state.model.info.classes
            layer = self.viewer.add_labels(
                job.expand(preview.labels),
                name=f"{job.layer_name} [fine-tune preview]",
                **job.placement(),
                colormap=annotation_colormap(classes),
                features={"class": ["-", *classes]},
                opacity=0.5,
                metadata={RESULT_KEY: None},
            )
            self._preview_layer = weakref.ref(layer)
        mark_result(layer)

    def _on_returned(self, value) -> None:
        if self._mode == "fill":
            self._fill(value)
            return
        if self._mode == "save":
            _record_save(self.state, self._saving)
            self._refresh_versions()
            version, path = self._saving
            self.status.setText(f"Saved {version.label} to {path}")
            return
        if not isinstance(value, Finished):
            return
        self.loss_plot.draw(force=True)
        if self.versions is not self._run_versions:
            self.status.setText(
                "Another model was loaded while this one trained: the fine-tuned result was "
                "discarded (train again on the new model)."
            )
            return
        n = len(self.versions.versions)
        name = f"{self.versions.base.info.name or 'model'}-v{n}"
        model = type(value.model)(value.model.net, replace(value.model.info, name=name))
        self.versions.add(
            model,
            self._parent,
            steps=value.steps,
            seconds=round(value.seconds, 1),
            painted=self._painted,
            accuracy_before=value.accuracy_before,
            accuracy_after=value.accuracy_after,
            stopped=value.stopped,
        )
        self._set_model(model)
        rescaled = ", ".join(f"x{f:.2g}" for f in value.scales if f != 1.0)
        self.status.setText(
            f"{'Stopped' if value.stopped else 'Done'}: {self.versions.describe(n)} "
            f"in {value.seconds:.0f} s"
            + (f" (planes rescaled {rescaled} to the model's object size)" if rescaled else "")
            + f". Now using {model.info.name}; 'Revert' goes back."
        )

    def _fill(self, classes) -> None:
        layer, index = self._fill_target
        if layer not in self.viewer.layers:
            self.status.setText(f"'{layer.name}' was removed meanwhile: nothing was filled.")
            return
        data = layer.data
        labels = np.asarray(classes).astype(data.dtype) + 1
        # the plane shown when the fill started, if the layer still has it at that size
        fits = len(index) == data.ndim - 2 and all(i < n for i, n in zip(index, data.shape))
        if not fits or tuple(data.shape[-2:]) != labels.shape[-2:]:
            self.status.setText(f"'{layer.name}' changed shape meanwhile: nothing was filled.")
            return
        plane = np.asarray(data[index])
        labels = labels.reshape(plane.shape)
        empty = np.nonzero(plane == 0)
        undoable = len(empty[0]) <= UNDOABLE_FILL
        try:  # only this plane, in place (copying a whole stack stalled the GUI)
            if undoable:  # one step of the layer's undo history (Ctrl-Z undid the stroke
                # before it); napari keeps every pixel's index and value for it
                where = tuple(np.full(len(empty[0]), i) for i in index) + empty
                with layer.block_history():
                    layer.data_setitem(where, labels[empty])
            else:  # (4096^2: 4 s on the GUI thread and 436 MB of undo history)
                data[index] = np.where(plane == 0, labels, plane)
                layer.refresh()
        except (TypeError, ValueError, NotImplementedError):  # read-only data (dask...)
            data = np.array(data)
            data[index] = np.where(plane == 0, labels, plane)
            layer.data = data
            undoable = False
        self.status.setText(
            f"'{layer.name}' now holds the model's classes where nothing was painted: "
            "paint over the mistakes, then Train."
            + ("" if undoable else " (A fill this large is not in the undo history.)")
        )

    def _on_finished(self) -> None:
        super()._on_finished()
        made, self._fill_made = self._fill_made, None
        if made is not None and made in self.viewer.layers and not np.any(made.data):
            self.viewer.layers.remove(made)  # made for a fill that failed: nothing in it
        if self._mode == "train":
            self.state.training = False
        self.pause_button.setEnabled(False)
        self.pause_button.setText("Pause")
        self.stop_button.setEnabled(False)
        self._mode = ""


# the most pixels a fill writes through napari's undo history (about 1 s and 100 MB of
# history per 4 million pixels); larger fills are written directly
UNDOABLE_FILL = 1 << 21


def _record_save(state, saving, _result=None) -> None:
    version, path = saving
    version.saved_to = path
    state.record_unsaved()


def _with_suffix(path: str, suffix: str) -> str:
    """A name typed without a model suffix gets the one of the chosen file type (Qt's
    dialog does not add it everywhere); ``.ZIP`` or ``.SafeTensors`` are spelled out."""
    if not path:
        return path
    p = Path(path)
    if p.suffix.lower() in (".zip", ".safetensors"):
        return str(p.with_suffix(p.suffix.lower()))
    return str(p.with_name(p.name + suffix))


def _write_model(model, path: str):
    """Save ``model`` (``.zip``: a bioimage.io package); a generator for the worker."""
    yield from ()
    if path.lower().endswith(".zip"):
        from napari_unet.io.bioimageio import export_package

        export_package(model, path)
    else:
        from napari_unet.io.files import save_model

        save_model(model, path)
    return path


def _diameter(model) -> str | None:
    """Models that record their objects' size see the painted images at that size,
    measured as the segment panel's *auto* does."""
    return "auto" if model.info.object_diameter else None
