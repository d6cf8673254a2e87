"""The fine-tune panel's versions: the list, Use / Revert / Save, and what a save
records. Every finished run is a new entry of
:class:`~napari_unet.core.versions.ModelVersions`; the base model is never changed."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QListWidget, QPushButton


def with_suffix(path: str, suffix: str) -> str:
    """A name typed without a model suffix gets the one of the chosen file type (Qt's
    dialog does not add it everywhere); ``.ZIP`` or ``.SafeTensors`` are spelled out."""
    if not path:
        return path
    p = Path(path)
    if p.suffix.lower() in (".zip", ".safetensors"):
        return str(p.with_suffix(p.suffix.lower()))
    return str(p.with_name(p.name + suffix))


def save_refusal(versions, path: str) -> str:
    """Why ``path`` may not be written (it is the base model's own file), or ``""``."""
    base = versions.base.info.source
    if base and Path(base).exists() and Path(path).resolve() == Path(base).resolve():
        return (
            f"{path} is the file the base model was loaded from, which is never "
            "overwritten: save the version under another name."
        )
    return ""


def write_model(model, path: str):
    """Save ``model`` (``.zip``: a bioimage.io package); a generator for the worker."""
    yield from ()
    if path.lower().endswith(".zip"):
        from napari_unet.io.bioimageio import export_package

        export_package(model, path)
    else:
        from napari_unet.io.files import save_model

        save_model(model, path)
    return path


def record_save(state, saving, _result=None) -> None:
    """Mark the version of ``saving`` ((version, path)) saved, in the viewer's state."""
    version, path = saving
    if state.versions is not None and any(v is version for v in state.versions.versions):
        state.versions.mark_saved(version, path)
    else:  # (the model changed while it was written)
        version.saved_to = path
    state.record_unsaved()


class VersionControls:
    """The versions part of :class:`~napari_unet._widgets.finetune.FinetunePanel`
    (a ``WorkerPanel``: it uses its state, status line and worker)."""

    def build_versions(self, layout) -> None:
        self._setting_model = False
        self.version_list = QListWidget()
        self.version_list.setMaximumHeight(110)
        layout.addWidget(self.version_list)
        row = QHBoxLayout()
        self.use_button = QPushButton("Use selected")
        self.use_button.setToolTip("Segment and fine-tune with the version selected above")
        self.revert_button = QPushButton("Revert")
        self.revert_button.setToolTip("Go back to the version this one was trained from")
        self.save_button = QPushButton("Save selected...")
        self.save_button.setToolTip(
            "Write the selected version to a model file (.safetensors) or a bioimage.io "
            "package (.zip)"
        )
        for b in (self.use_button, self.revert_button, self.save_button):
            row.addWidget(b)
        layout.addLayout(row)
        self.use_button.clicked.connect(self._on_use)
        self.revert_button.clicked.connect(self._on_revert)
        self.save_button.clicked.connect(self._on_save)
        self.state.model_changed.connect(self._on_model_changed)

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
        from napari_unet.core.versions import ModelVersions

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
            self.status.setText("Load a model in the model panel, then paint annotations.")
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

    def _refresh_versions(self, selected: int | None = None) -> None:
        """List the versions, ``selected`` (default: the one in use) selected."""
        self.version_list.clear()
        self.state.record_unsaved()
        if self.versions is None:
            return
        for i in range(len(self.versions.versions)):
            mark = "* " if i == self.versions.current else "  "
            self.version_list.addItem(mark + self.versions.describe(i))
        n = len(self.versions.versions)
        row = selected if selected is not None and 0 <= selected < n else self.versions.current
        self.version_list.setCurrentRow(row)

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
        if self.versions.current == 0:  # ("Reverted to v0" said it had done something)
            base = self.versions.versions[0].label
            self.status.setText(f"Already using {base}: it has no parent to revert to.")
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
            path = with_suffix(path, ".zip" if "*.zip" in chosen else ".safetensors")
        if not path or self.busy():
            return
        refusal = save_refusal(self.versions, path)
        if refusal:
            self.status.setText(refusal)
            return
        # in the worker: a bioimage.io export traces and checks the network (seconds)
        self._mode = "save"
        self._saving = (self.versions.versions[row], str(path))
        self.status.setText(f"Saving {self._saving[0].label} to {path}...")
        worker = self.start(write_model, model, str(path), desc="napari-unet: saving a model")
        if worker:
            # the file is written in one go, into a temporary file renamed at the end:
            # there is nothing to cancel (a cancelled save wrote its file all the same)
            self.cancel_button.setEnabled(False)
            # recorded by the viewer's state, not only by this panel: closed meanwhile,
            # the version saved stayed "unsaved"
            worker.returned.connect(partial(record_save, self.state, self._saving))
