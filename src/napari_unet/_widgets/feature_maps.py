"""Feature-map panel: show what each stage of the U-Net computes, over the image."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QListWidget,
    QSpinBox,
)

from napari_unet._widgets._base import WorkerPanel
from napari_unet._widgets._results import OUTPUT_KEY

MEMORY_LIMIT_MB = 512
MAPS_AXIS = "feature channel"  # the maps' own axis (not the image's 'channel')


class FeatureMapPanel(WorkerPanel):
    """Capture the activations of chosen stages for a region of an image layer."""

    run_text = "Show feature maps"

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer)
        form = QFormLayout()
        self.add_image_choice(form)
        self.stage_list = QListWidget()
        self.stage_list.setSelectionMode(QAbstractItemView.SelectionMode.MultiSelection)
        self.stage_list.setMaximumHeight(170)
        _mark_selection(self.stage_list, getattr(self.viewer, "theme", "dark"))
        form.addRow("Stages", self.stage_list)
        self.region_combo = QComboBox()
        self.region_combo.addItems(["field of view", "whole plane"])
        form.addRow("Region", self.region_combo)
        self.channels_spin = QSpinBox()
        self.channels_spin.setRange(0, 4096)
        self.channels_spin.setSpecialValueText("all")
        form.addRow("Top channels", self.channels_spin)
        self.half_check = QCheckBox("float16 (half the memory)")
        form.addRow("", self.half_check)
        self.stage_list.setToolTip(
            "The network's stages, from the first encoder level (enc0, full resolution) "
            "down to the bottleneck and back up the decoder (dec...) to the output (head); "
            "each becomes an image layer over the input, one channel per plane"
        )
        self.region_combo.setToolTip(
            "field of view: the part of the plane in view (quick); whole plane: all of it"
        )
        self.channels_spin.setToolTip(
            "Keep only this many channels per stage, those whose activation varies most; "
            "all: every channel"
        )
        self.form.addLayout(form)
        self._job = None
        self._made_with = {}
        self._source = None
        # stage layers still to add, one per turn of the event loop: napari takes about
        # 0.3 s to add an image layer (its canvas node and controls), so adding ten
        # stages in one go froze the viewer for 2-3 s
        self._pending: list[tuple[str, np.ndarray, dict]] = []  # (stage, data, layer kw)
        self._adding_for = None  # source_of the image whose maps are being added
        self._added = 0  # of the last run's stage layers
        self._add_timer = QTimer(self)
        self._add_timer.setSingleShot(True)
        self._add_timer.setInterval(0)
        self._add_timer.timeout.connect(self._add_next)
        self.state.model_changed.connect(self._on_model_changed)
        self._on_layers_changed()
        self._on_model_changed(self.state.model)

    def _on_model_changed(self, model) -> None:
        from napari_unet.core.features import OPAQUE, inspectable, stage_names

        if model is None:
            self.status.setText("Load a model in the model panel: its stages are listed here.")
        elif self.status.text().startswith("Load a model"):
            self.status.setText("")
        opaque = model is not None and not inspectable(model.net)
        # no stages to offer of a network that cannot be looked into: say why instead
        names = stage_names(model.net) if model is not None and not opaque else []
        self._enable_run()
        if opaque:
            self.status.setText(f"{model.info.name or 'This model'}: {OPAQUE}.")
        elif self.status.text().endswith(f"{OPAQUE}."):
            self.status.setText("")
        before = [self.stage_list.item(i).text() for i in range(self.stage_list.count())]
        if names == before:
            return  # the same stages (a fine-tuned version): the user's choice stays
        self.stage_list.clear()
        self.stage_list.addItems(names)
        for i in range(self.stage_list.count()):
            self.stage_list.item(i).setSelected(True)

    def stages(self) -> list[str]:
        return [item.text() for item in self.stage_list.selectedItems()]

    def _on_run(self) -> None:
        from napari_unet.core.features import capture_iter

        model = self.state.model
        layer = self.image_layer()
        if model is None or layer is None or not self.stages():
            self.status.setText("Load a model, pick an image layer and at least one stage.")
            return
        try:
            job, axes = self._plane_job(layer, model)
            region = self._affordable_region(job, axes, model)
        except _Refused as why:  # guidance, not an error
            self.status.setText(str(why))
            return
        except ValueError as err:
            self._on_errored(err)
            return
        self._job = job
        # what the maps were made with, in their layers' metadata
        self._made_with = {
            "model": model.info.name,
            "region": None if region is None else [int(v) for v in region],
        }
        self._source = self.source_of(layer)  # maps are only shown over their image
        # the job holds one plane (current plane): index 0 of each leading axis, not of
        # the channel axis
        kwargs = dict(
            axes=job.axes,
            plane=tuple(0 for _ in axes.leading),
            region=region,
            max_channels=self.channels_spin.value() or None,
            device=self.state.device,
            dtype=np.float16 if self.half_check.isChecked() else np.float32,
            should_stop=self.abort.is_set,
        )
        self.start(
            capture_iter,
            job.data,
            model,
            self.stages(),
            total=3,
            desc="napari-unet: feature maps",
            activity=False,
            **kwargs,
        )

    def _plane_job(self, layer, model):
        """The plane shown (its field of view, if chosen) and its axes; :class:`_Refused`
        where there is no one plane to look into."""
        from napari_unet._widgets._layers import job_for_layer
        from napari_unet.core.axes import resolve_axes

        visible = self.region_combo.currentText() == "field of view"
        if visible and self.viewer.dims.ndisplay != 2:
            raise _Refused(
                "'field of view' needs the 2D view: switch to 2D, or choose 'whole plane'."
            )
        job = job_for_layer(layer, model, self.viewer, True, visible)
        axes = resolve_axes(tuple(job.data.shape), job.axes, model.info.in_channels)
        if any(n > 1 for n in axes.leading_shape):
            # the 3D view shows a stack's Z whole: there is no one plane to look into
            raise _Refused(
                "Feature maps are of one plane, and the 3D view shows the stack whole: "
                "switch to the 2D view and pick the plane with the slider."
            )
        return job, axes

    def _affordable_region(self, job, axes, model):
        """The region to capture; :class:`_Refused` where its maps or the one untiled
        pass over it would not fit in memory."""
        from napari_unet.core.device import free_memory, resolve_device
        from napari_unet.core.features import estimate_bytes, forward_bytes

        h, w = axes.yx
        y0, y1, x0, x1 = job.region or (0, h, 0, w)
        yx = (y1 - y0, x1 - x0)
        # the pass first: what the maps' message offers (fewer channels, float16) cannot
        # make it fit, and a user who followed it met this refusal next
        need, have = forward_bytes(model, yx), free_memory(resolve_device(self.state.device))
        if need > 0.5 * have:
            raise _Refused(
                f"One pass of the network over {yx[0]} x {yx[1]} pixels needs about "
                f"{need / 2**30:.1f} GB, more than half of the {have / 2**30:.1f} GB free "
                "(the rest is left to napari and the maps): choose 'field of view' and zoom "
                "in to a smaller region."
            )
        channels = self.channels_spin.value() or None
        mb = estimate_bytes(model, self.stages(), yx, channels) / 2**20
        if self.half_check.isChecked():
            mb /= 2
        if mb > MEMORY_LIMIT_MB:
            raise _Refused(
                f"This would make {mb:.0f} MB of feature maps (limit {MEMORY_LIMIT_MB} MB): "
                "choose fewer stages, a few top channels, float16, or "
                + ("a smaller view." if job.region else "'field of view' and zoom in.")
            )
        return (y0, y1, x0, x1)

    def _on_yielded(self, progress) -> None:
        self.status.setText(progress.message)

    def _on_returned(self, maps) -> None:
        job = self._job
        source, self._source = self._source, None
        if source is not None and self.source_lost(source):
            self.status.setText(
                f"{job.layer_name} was removed, moved or its data replaced meanwhile: its "
                "feature maps were dropped."
            )
            return
        # the channel axis gets a world axis of its own, before those of every other layer
        # (a 2D image's maps beside a Z-stack would otherwise page channels with Z)
        world = max([la.ndim for la in self.viewer.layers if OUTPUT_KEY not in la.metadata] or [0])
        pad = max(0, world - len(job.scale))
        # axes the image lacks (a 2D image beside a Z-stack): one pixel stretched over the
        # whole range of that axis, so the maps show at every plane, as the image does
        ranges = self.viewer.dims.range[self.viewer.dims.ndim - world :][:pad]
        pad_scale = tuple(float(r.stop - r.start + (r.step or 1)) for r in ranges)
        pad_translate = tuple(float(r.start + r.stop) / 2 for r in ranges)
        units = {}
        world_units = getattr(self.viewer.dims, "units", None)  # None: inconsistent
        if job.units is not None and world_units is not None:
            # the image's units (mixed units misplace layers)
            pad_units = tuple(world_units)[self.viewer.dims.ndim - world :][:pad]
            units = {"units": ("pixel", *pad_units, *job.units)}
        # the channel axis named (it was '-4'), the others as the viewer names them but
        # for an earlier run's maps' name: a stack opened after the maps of a 2D image
        # shares their slider (napari lines axes up from the right), and its own maps
        # had two axes called 'channel'
        dims = self.viewer.dims
        named = tuple(dims.axis_labels)[dims.ndim - world :]
        labels = (
            MAPS_AXIS,
            *(str(k - len(named)) if a == MAPS_AXIS else a for k, a in enumerate(named)),
        )
        self._adding_for = source  # followed while the layers are added (renamed, removed)
        for layer in self.viewer.layers:  # earlier runs' stages, of other regions or models
            if layer.metadata.get(OUTPUT_KEY) == "feature map":
                layer.visible = False
        for i, (name, fm) in enumerate(maps.items()):
            scale, translate = fm.world(job.scale[-2:], _origin(job))
            lead = len(job.scale) - 2
            shape = (fm.data.shape[0],) + (1,) * (pad + lead) + fm.data.shape[1:]
            data = fm.data.reshape(shape)
            kw = dict(
                scale=(1.0, *pad_scale, *job.scale[:lead], *scale),
                translate=(0.0, *pad_translate, *job.translate[:lead], *translate),
                colormap="inferno",
                blending="additive",
                contrast_limits=_limits(fm.data),
                axis_labels=labels,
                **units,
                metadata={
                    "stage": name,
                    "channels": fm.channels.tolist(),
                    **self._made_with,
                    OUTPUT_KEY: "feature map",
                },
                # one stage on screen (additive maps of all stages are unreadable, and
                # hidden layers are cheap to add); the eye icons show the others
                visible=i == len(maps) - 1,
            )
            self._pending.append((name, data, kw))
        self._added = 0
        self._add_next()

    def idle(self) -> bool:
        return super().idle() and not self._pending

    def _on_closed(self) -> None:
        self._pending.clear()  # stage layers not added yet stay out
        super()._on_closed()

    def _on_finished(self) -> None:
        super()._on_finished()
        if self._pending:  # stage layers still being added: Cancel stops that, Run waits
            self.run_button.setEnabled(False)
            self.cancel_button.setEnabled(True)
        else:  # (a model loaded meanwhile may not be one to look into)
            self._enable_run()
            self._say_if_opaque()

    def _say_if_opaque(self) -> None:
        """Add why Run is off for a model that cannot be looked into (the message said
        when it was loaded is replaced by a run's progress)."""
        from napari_unet.core.features import OPAQUE, inspectable

        model = self.state.model
        if model is not None and not inspectable(model.net) and OPAQUE not in self.status.text():
            why = f"{model.info.name or 'This model'}: {OPAQUE}."
            self.status.setText(" ".join(filter(None, [self.status.text(), why])))

    def _on_cancel(self) -> None:
        # (maps being added: the capture is over, though its worker may not have said
        # 'finished' yet)
        if self._pending:
            left = len(self._pending)
            self._end_adding(
                f"Cancelled: {self._added} stage layer(s) added, the other {left} left out."
            )
            return
        super()._on_cancel()

    def _end_adding(self, text: str) -> None:
        self._pending.clear()
        self._add_timer.stop()
        self.status.setText(text)
        self.cancel_button.setEnabled(False)
        self._enable_run()
        self._say_if_opaque()

    def _enable_run(self) -> None:
        """Run is on when nothing is going on and the model can be looked into."""
        from napari_unet.core.features import inspectable

        model = self.state.model
        opaque = model is not None and not inspectable(model.net)
        self.run_button.setEnabled(self.worker is None and not self._pending and not opaque)

    def _add_next(self) -> None:
        """Add (or update) the next stage layer, and come back for the one after."""
        if not self._pending:
            return
        source = self._adding_for
        if source is not None and self.source_lost(source):  # removed since they arrived
            self._end_adding(
                f"{source[0].name} was removed, moved or its data replaced meanwhile: its "
                "other feature maps were dropped."
            )
            return
        stage, data, kw = self._pending.pop(0)
        # the image's name now (renamed during the capture or the adds)
        image = source[0].name if source is not None else self._job.layer_name
        layer_name = f"{image} [features {stage}]"
        old = self.viewer.layers[layer_name] if layer_name in self.viewer.layers else None  # noqa: SIM401
        if old is not None and OUTPUT_KEY in old.metadata and data.ndim == old.ndim:
            # update in place: removing a layer from the canvas is slower than adding it
            old.data = data
            keys = ("scale", "translate", "units", "axis_labels", "contrast_limits")
            for key in (*keys, "metadata", "visible"):
                if key in kw:
                    setattr(old, key, kw[key])
        else:
            if old is not None and OUTPUT_KEY in old.metadata:
                self.viewer.layers.remove(old)
            # a layer of the user's with this name stays: napari names this one "... [1]"
            self._add_keeping_view(data, name=layer_name, **kw)
        self._added += 1
        if self._pending:
            self.status.setText(
                f"Adding stage layers: {self._added} of {self._added + len(self._pending)}..."
            )
            self._add_timer.start()
            return
        self._end_adding(
            f"{self._added} stage(s) added, the last one visible (eye icons show the others); "
            "the first axis slider picks the channel."
        )

    def _add_keeping_view(self, data, **kw) -> None:
        """Add an image layer; the view stays where the user put it (napari resets the
        camera when the viewer gains an axis, as the channel axis of the first maps does:
        a view zoomed in for 'field of view' jumped out to the whole image)."""
        camera, ndim = self.viewer.camera, self.viewer.dims.ndim
        view = (camera.center, camera.zoom, camera.angles)
        self.viewer.add_image(data, **kw)
        if self.viewer.dims.ndim != ndim:
            camera.center, camera.zoom, camera.angles = view


def _limits(data: np.ndarray) -> tuple[float, float]:
    """Contrast limits covering most activations of all channels."""
    lo, hi = np.percentile(data[:, ::4, ::4].astype(np.float32), [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _origin(job) -> tuple[float, float]:
    """World position of image pixel (0, 0) of the region's plane (before the region)."""
    if job.region is None:
        return job.translate[-2], job.translate[-1]
    y0, _, x0, _ = job.region
    return job.translate[-2] - y0 * job.scale[-2], job.translate[-1] - x0 * job.scale[-1]


def _mark_selection(stages, theme: str) -> None:
    """Chosen stages in the theme's accent colour, as napari marks selected layers: its
    grey highlight hardly told them from the others."""
    try:
        from napari.utils.theme import get_theme

        accent = get_theme(theme).current.as_hex()
    except Exception:  # noqa: BLE001 - a theme of a plugin's, or an older napari: as it was
        return
    stages.setStyleSheet(f"QListWidget::item:selected {{ background-color: {accent}; }}")


class _Refused(ValueError):
    """A run that cannot be done as set up: said in the status line, as guidance."""
