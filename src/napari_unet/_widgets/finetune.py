"""Fine-tune panel: paint where the model is wrong, retrain in a worker, watch, repeat.

The panel only wires napari to the core: annotations become
:func:`~napari_unet.core.painted.painted_planes`, a run is
:func:`~napari_unet.core.finetune.finetune_iter` with ``TrainConfig.finetune``,
and every finished run is a new entry of
:class:`~napari_unet.core.versions.ModelVersions` (the base is never changed).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import replace

import numpy as np
from qtpy.QtWidgets import (
    QFormLayout,
    QPushButton,
    QSpinBox,
)

from napari_unet._widgets import _annotations as ann
from napari_unet._widgets._annotation_controls import AnnotationControls, diameter_option
from napari_unet._widgets._base import WorkerPanel
from napari_unet._widgets._layers import job_for_layer
from napari_unet._widgets._loss_plot import LossPlot
from napari_unet._widgets._results import (
    RESULT_KEY,
    mark_result,
    overwritable,
    replace_data,
)
from napari_unet._widgets._train_form import TrainForm
from napari_unet._widgets._versions import VersionControls, record_save
from napari_unet.core.finetune import Finished, Preview
from napari_unet.core.painted import Collected


class FinetunePanel(AnnotationControls, VersionControls, WorkerPanel):
    """Annotate and retrain: sparse strokes on Labels layers fine-tune the current model."""

    run_text = "Train"

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer)
        import napari_unet.core.finetune  # noqa: F401 - core import check

        self._mode = ""  # what the worker does: "train", "fill" or "save"
        self._fill_made = None  # an annotation layer made by "Start from prediction"
        self._stop = threading.Event()
        self._want_pause = False  # Pause pressed (the worker pauses after its step)
        self._preview_job = None
        # each image's preview layer (weakly) and the classes it shows: a run on another
        # image or with another model's classes wrote into the last one and moved it
        self._previews = weakref.WeakKeyDictionary()

        form = QFormLayout()
        self.add_image_choice(form)
        self._build_annotation_rows(form)
        self.settings = TrainForm(form)
        self.preview_spin = QSpinBox()
        self.preview_spin.setRange(0, 10000)
        self.preview_spin.setValue(50)
        self.preview_spin.setSpecialValueText("off")
        self.preview_spin.setToolTip(
            "Every this many steps, the plane shown is segmented with the weights so far "
            "into a preview layer; off: no previews (a little faster)"
        )
        form.addRow("Preview every (steps)", self.preview_spin)
        self.form.addLayout(form)
        self.loss_plot = LossPlot()
        self.form.addWidget(self.loss_plot.widget)
        self._build_run_buttons()
        self.build_versions(self.form)
        # (a save or a fill runs in this panel's worker: one at a time)
        self.idle_only += [self.save_button, self.fill_button]
        # the versions take spare height; and the panel holds its own beside an expanding
        # model panel (a long model card left the loss plot and versions 90 px)
        self.grow_controls()
        self._on_layers_changed()
        self._on_model_changed(self.state.model)

    def _build_run_buttons(self) -> None:
        self.pause_button = QPushButton("Pause")
        self.pause_button.setEnabled(False)
        self.stop_button = QPushButton("Stop && keep")
        self.stop_button.setToolTip("End training now and keep what it learned as a version")
        self.stop_button.setEnabled(False)
        self.cancel_button.setToolTip("End training and discard this run")
        # in sight during a run, beside Train and Cancel (in the scrolled controls they
        # were hidden when four panels shared the dock)
        self.add_button_row(self.pause_button, self.stop_button)
        self.pause_button.clicked.connect(self._on_pause)
        self.stop_button.clicked.connect(self._on_stop)

    # -- training ------------------------------------------------------------------
    def config(self):
        return self.settings.config(self.state.device)

    def collect(self, model):
        """Painted planes of every annotation layer (all images), checked."""
        from napari_unet.core.painted import collect_planes

        planes, unpainted, collected = collect_planes(model, self.annotation_pairs(model))
        return planes, unpainted, collected.painted

    def _on_run(self) -> None:
        layer, model = self.image_layer(), self.state.model
        if self.versions is None or model is None:
            self.status.setText("Load a model in the napari-unet model panel first.")
            return
        if self.busy():
            return
        from napari_unet.core.training import check_trainable

        try:
            check_trainable(model)
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
        # layers that cannot train this model, said while it trains on the others
        left_out = list(self.skipped)
        if preview is None and layer is not None and self.preview_spin.value():
            left_out.append("previews (the view shows no plane of the image)")
        self._left_out = "; ".join(left_out)
        self._preview_job = preview
        self._preview_source = self.source_of(layer)
        self.loss_plot.reset()
        self._stop.clear()
        self._mode = "train"
        self.state.trainer = self
        self.status.setText("Reading the annotations...")
        from napari_unet.core.finetune import finetune_pairs_iter

        self._want_pause = False
        worker = self.start(
            finetune_pairs_iter,
            model,
            pairs,
            cfg,
            preview=None if preview is None else (preview.data, preview.axes, preview.region),
            preview_every=self.preview_spin.value(),
            should_stop=self._should_stop,
            should_cancel=self.abort.is_set,
            skip_preview=self._pausing,
            diameter=diameter_option(model),
            total=cfg.steps,
            desc="napari-unet: fine-tuning",
            activity=False,  # the panel shows steps, rate and time left itself
        )
        if worker is None:
            return
        worker.paused.connect(self._on_worker_paused)
        self.pause_button.setEnabled(True)
        self.stop_button.setEnabled(True)

    def _preview_region(self, layer, model):
        """The current plane, cut to the field of view in 2D (previews stay quick); None
        when the view shows no plane of the image (axes rolled, a slider beyond its
        planes): the run trains without previews (it was refused, naming options of the
        segment panel)."""
        flat = self.viewer.dims.ndisplay == 2
        try:
            return job_for_layer(layer, model, self.viewer, current_plane=True, visible=flat)
        except ValueError:  # not in view: the whole plane
            pass
        try:
            return job_for_layer(layer, model, self.viewer, current_plane=True)
        except ValueError:
            return None

    def _on_pause(self) -> None:
        """Pause after the step going on, or resume. Goes by what was asked, not by
        ``worker.is_paused``, which turns true only once the step is over."""
        if self.worker is None or self.worker.abort_requested:
            return
        self._want_pause = not self._want_pause
        if self._want_pause:
            self.worker.pause()
            self.pause_button.setText("Resume")
            self.status.setText("Pausing after this step...")
        else:
            self.worker.resume()  # (a pause still pending is undone when it comes)
            self.pause_button.setText("Pause")
            self.status.setText("Resumed.")

    def _should_stop(self) -> bool:
        """Stop & keep, or Cancel: either ends the step, preview or setup going on (the
        worker then drops a cancelled run at its next report)."""
        return self._stop.is_set() or self.abort.is_set()

    def _pausing(self) -> bool:
        return self._want_pause

    def _on_errored(self, err: Exception) -> None:
        from napari_unet.core.cancel import Cancelled

        if isinstance(err, Cancelled):  # Stop pressed before the first step (STOPPED_EARLY)
            self.status.setText(f"{str(err).capitalize()}; the current version is unchanged.")
            return
        super()._on_errored(err)

    def _on_worker_paused(self) -> None:
        if self.worker is None:
            return
        if self._want_pause:
            self.status.setText("Paused (time paused does not count).")
        else:  # Resume, Stop or Cancel came before the pause took effect
            self.worker.resume()

    def _on_stop(self) -> None:
        if self.worker is None or self.worker.abort_requested:
            return
        self._stop.set()
        if self._want_pause:  # the step to stop after must run
            self._want_pause = False
            self.worker.resume()
            self.pause_button.setText("Pause")
        self.stop_button.setEnabled(False)
        self.status.setText("Stopping after this step; the result is kept as a version.")

    def _on_cancel(self) -> None:
        if self.worker is None or self._mode == "save":
            return
        self._want_pause = False  # (a paused worker sees Cancel without resuming)
        super()._on_cancel()
        self.pause_button.setEnabled(False)
        self.pause_button.setText("Pause")
        self.stop_button.setEnabled(False)

    def cancelled_text(self) -> str:
        if self._mode == "fill":
            return "Cancelled: nothing was filled."
        return "Cancelled: the run was discarded, the current version is unchanged."

    def _on_closed(self) -> None:
        self.state.model_changed.disconnect(self._on_model_changed)
        super()._on_closed()  # a run is cancelled; a save goes on to the end

    def _on_yielded(self, value) -> None:
        from napari_unet.core.training import Phase, TrainStep

        # a report on its way when Pause or Stop was pressed keeps "Paused" / "Stopping"
        paused = self._want_pause or self._stop.is_set()
        if isinstance(value, Collected):
            self._painted, self._what = value.painted, value.what
            if not paused:
                left_out = f" (left out: {self._left_out})" if self._left_out else ""
                self.status.setText(f"Training on {value.what}...{left_out}")
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
        """Show the preview in the image's own preview layer (one per image and set of
        classes, just above the image); a layer the user edited or paired as annotations
        is never written into (a new preview layer is made)."""
        if preview.labels is None:  # (the run goes on without previews)
            from napari.utils.notifications import show_warning

            show_warning(f"napari-unet: {preview.note}; training goes on without previews")
            return
        job = self._preview_job
        if self.source_lost(self._preview_source):  # removed (or replaced) meanwhile: an
            return  # image that took its name is another image
        image = self._preview_source[0]  # (by its name now: it may have been renamed)
        classes = tuple(self.state.model.info.classes)
        labels = job.expand(preview.labels)
        ref, shown = self._previews.get(image, (None, None))
        layer = ref() if ref is not None else None
        if (
            layer is not None
            and layer in self.viewer.layers
            and overwritable(layer)
            and shown == classes
            and layer.data.ndim == labels.ndim
        ):
            replace_data(layer, labels)
            for key, value in job.placement().items():
                setattr(layer, key, value)
        else:
            # napari selects a layer it adds: the user's strokes went into the preview
            selection = self.viewer.layers.selection
            chosen, active = set(selection), selection.active
            layer = self.viewer.add_labels(
                labels,
                name=f"{image.name} [fine-tune preview]",
                **job.placement(),
                # (the image shows through its background: a blue plane hid it)
                colormap=ann.annotation_colormap(classes, hidden="background"),
                features={"class": ["-", *classes]},
                opacity=0.5,
                metadata={RESULT_KEY: None},
            )
            self._previews[image] = (weakref.ref(layer), classes)
            _just_above(self.viewer.layers, layer, image)  # under the strokes
            selection.clear()
            selection.update(chosen)
            selection.active = active
        mark_result(layer)

    def _on_returned(self, value) -> None:
        if self._mode == "fill":
            self._fill(value)
            return
        if self._mode == "save":
            record_save(self.state, self._saving)
            # (the version saved stays selected: the next Save wrote the one in use)
            self._refresh_versions(self.version_list.currentRow())
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
        name = self.state.new_version_name(f"{self.versions.base.info.name or 'model'}-v{n}")
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
            f"{'Stopped' if value.stopped else 'Done'} in {value.seconds:.0f} s: "
            f"{self.versions.describe(n)}"
            + (f" (planes rescaled {rescaled} to the model's object size)" if rescaled else "")
            + f". Now using {model.info.name}; 'Revert' goes back."
            + _short_of_plan(value)
            + (f" Left out: {self._left_out}." if self._left_out else "")
        )

    def is_training(self) -> bool:
        """Whether this panel's fine-tune run is going on (see ``ViewerState.training``)."""
        return self._mode == "train" and self.worker is not None

    def _on_finished(self) -> None:
        super()._on_finished()
        made, self._fill_made = self._fill_made, None
        if made is not None and made in self.viewer.layers and not np.any(made.data):
            self.viewer.layers.remove(made)  # made for a fill that failed: nothing in it
        self.pause_button.setEnabled(False)
        self.pause_button.setText("Pause")
        self.stop_button.setEnabled(False)
        self._mode = ""


def _short_of_plan(value: Finished) -> str:
    """Says so when the time budget ran out before the steps planned for it."""
    if value.stopped or not value.planned or value.steps >= value.planned:
        return ""
    return (
        f" The time budget ran out after {value.steps} of the {value.planned} steps planned "
        "(the machine was slower than when they were timed)."
    )


def _just_above(layers, layer, image) -> None:
    """Move ``layer`` just above ``image`` (the image it previews), so that the annotation
    layers drawn over that image stay on top and visible."""
    at = {id(x): i for i, x in enumerate(layers)}
    if id(image) in at:  # (indices before the move: "before" the layer after the image)
        layers.move(at[id(layer)], at[id(image)] + 1)
