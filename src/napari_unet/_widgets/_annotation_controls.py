"""The fine-tune panel's annotation rows: annotation layers made, paired, followed
through renames, filled with the model's answer, and read for training."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox, QHBoxLayout, QPushButton

from napari_unet._widgets import _annotations as ann
from napari_unet._widgets._layers import job_for_layer
from napari_unet._widgets._results import ANNOTATION_KEY


class AnnotationControls:
    """Mixin of :class:`~napari_unet._widgets.finetune.FinetunePanel` (a WorkerPanel)."""

    def _build_annotation_rows(self, form) -> None:
        row = QHBoxLayout()
        self.new_button = QPushButton("New annotation layer")
        self.new_button.setToolTip("A Labels layer over the chosen image to paint classes on")
        self.fill_button = QPushButton("Start from prediction")
        self.fill_button.setToolTip(
            "Fill the unpainted pixels of the plane shown with the model's answer, "
            "to correct by painting over its mistakes"
        )
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
        self.kind_combo.setToolTip(
            "painted classes: 0 = not annotated, k = class k - 1 (as annotation layers); "
            "instance masks: 0 = background, one value per object"
        )
        row.addWidget(self.pair_button)
        row.addWidget(self.kind_combo)
        form.addRow(row)
        self.new_button.clicked.connect(self.new_annotation_layer)
        self.fill_button.clicked.connect(self.start_from_prediction)
        self.pair_button.clicked.connect(self.use_selected_labels)

    def annotation_layers(self, image_name: str | None = None, kind: str | None = None):
        return ann.annotation_layers(self.viewer, image_name, kind)

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
        labels, message = ann.add_annotation_layer(
            self.viewer, layer.name, job, model.info.classes
        )
        self.status.setText(message)
        return labels

    def use_selected_labels(self):
        """Pair the selected Labels layer with the chosen image (classes or instances)."""
        from napari.layers import Labels

        layer, active = self.image_layer(), self.viewer.layers.selection.active
        if layer is None or not isinstance(active, Labels):
            self.status.setText("Choose the image above and select a Labels layer in the list.")
            return
        kind = "instances" if "instance" in self.kind_combo.currentText() else "sparse"
        model, part = self.state.model, ""
        if model is not None:  # (without one, Train checks it)
            try:
                job = job_for_layer(layer, model, self.viewer)
            except ValueError as err:
                self._on_errored(err)
                return
            offset, mismatch = ann.pixel_offset(active, job, layer.name)
            if mismatch:
                self.status.setText(f"Not paired: {mismatch}.")
                return
            part = ann.covered_part(active, job, offset)  # (a 'Visible region only' result)
        message = ann.pair_labels(active, layer.name, kind, part)
        if kind == "sparse" and ann.is_instances_result(active):
            message += (
                " It looks like a segmentation into objects (one value per object): "
                "choose 'as instance masks' and pair it again to train on its objects."
            )
        self.status.setText(message)

    def _on_layers_changed(self, event=None) -> None:
        """Annotation layers name their image: they follow it when it is renamed."""
        self._names = ann.follow_renames(self.viewer, getattr(self, "_names", {}))
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
            whole = job_for_layer(layer, model, self.viewer)
        except ValueError as err:
            self._on_errored(err)
            return
        mine = [  # (a layer painted for another model's classes is left alone)
            t
            for t in self.annotation_layers(layer.name, "sparse")
            if not ann.classes_mismatch(t, model.info.classes)
        ]
        targets = [t for t in mine if ann.covers(t, whole)]  # (the fill is of a whole plane)
        why = ann.unwritable(targets[0]) if targets else ""
        if why:  # (said before the model runs; the layer is left as it is)
            self.status.setText(f"Not filled: '{targets[0].name}' {why}.")
            return
        self._fill_note = ""
        if mine and not targets:  # (said, not to be taken for a fill of that layer)
            _, why = ann.pixel_offset(mine[0], whole, layer.name)
            how = "does not lie on the image's pixels" if why else "covers part of the image"
            self._fill_note = f" ('{mine[0].name}' {how}: the fill went to a new layer.)"
        # a layer made for this fill goes again if the fill fails or is cancelled
        self._fill_made = None if targets else self.new_annotation_layer()
        targets = targets or [self._fill_made]
        if targets[0] is None:
            return
        shape = targets[0].data.shape
        self._fill_target = (targets[0], ann.fill_plane_index(job, shape))
        self._mode = "fill"
        options = SegmentOptions(
            mode="labels",  # the classes, computed in the worker (not the GUI thread)
            axes=job.axes,
            device=self.state.device,
            diameter=diameter_option(model),
            should_stop=self.abort.is_set,
        )
        self.start(
            segment_iter, job.data, model, options, desc="napari-unet: prediction to correct"
        )

    def annotation_pairs(self, model):
        """``(image data, annotation, image name, kind, axes, offset)`` of every annotation layer
        that can train ``model`` (all images): references to the image data (read later,
        in the worker) and a copy of the paint as it is now (painting on while it trains
        changes nothing). Layers that cannot (image gone, painted for other classes, not
        lying on their image) are left out and said in ``self.skipped``; none left: refused
        with their reasons."""
        layers = self.annotation_layers()
        if not layers:
            raise ValueError(
                "no annotation layer: press 'New annotation layer' and paint, or select a "
                "Labels layer of classes and press 'Use selected Labels layer'"
            )
        pairs, self.skipped = [], []
        for labels in layers:
            pair, why = self._annotation_pair(labels, model)
            if pair is None:
                self.skipped.append(why)
            else:
                pairs.append(pair)
        if not pairs:
            raise ValueError("; ".join(self.skipped))
        return pairs

    def _annotation_pair(self, labels, model):
        """``(pair, "")``, or ``(None, why)`` when ``labels`` cannot train ``model``."""
        from napari.layers import Image

        name = labels.metadata[ANNOTATION_KEY]
        if name not in self.viewer.layers:
            return None, f"'{labels.name}' belongs to image '{name}', which is gone"
        if not isinstance(self.viewer.layers[name], Image):  # replaced by another kind
            return None, f"'{labels.name}' belongs to image '{name}', now not an image layer"
        kind = labels.metadata.get(ann.KIND_KEY, "sparse")
        mismatch = ann.classes_mismatch(labels, model.info.classes) if kind == "sparse" else ""
        try:  # (an image rotated since, or of another kind now)
            job = job_for_layer(self.viewer.layers[name], model, self.viewer)
        except ValueError as err:
            return None, f"'{labels.name}' annotates '{name}': {err}"
        # (a size of its own: an image replaced by one of another size)
        offset, placed = ann.pixel_offset(labels, job, name)
        if mismatch or placed:
            return None, mismatch or placed
        # (not copied here: the worker copies the planes it trains on, and a whole stack's
        # copy froze the GUI and doubled its memory at every Train)
        paint = job.collapse(labels.data)
        # the image's axes as the segment panel reads them (C, Z, Y, X; thin stacks), and
        # where the paint lies on the image (a layer may cover part of it)
        return (job.data, paint, name, kind, job.axes, offset), ""

    def _fill(self, classes) -> None:
        layer, index = self._fill_target
        if layer not in self.viewer.layers:
            self.status.setText(f"'{layer.name}' was removed meanwhile: nothing was filled.")
            return
        self.status.setText(ann.fill_plane(layer, index, classes) + self._fill_note)


def diameter_option(model) -> str | None:
    """Models that record their objects' size see the painted images at that size,
    measured as the segment panel's *auto* does."""
    return "auto" if model.info.object_diameter else None
