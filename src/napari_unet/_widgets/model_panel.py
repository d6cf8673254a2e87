"""Model panel: choose a bundled model or a model file, a device, and read its card."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import QSize
from qtpy.QtGui import QFont, QFontDatabase
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
)

from napari_unet._widgets._base import WorkerPanel

FILE_ENTRY = "Model file..."


def load_steps(source: str, trust_code: bool = False):
    """Generator for the worker: one progress report, then the loaded model."""
    from napari_unet.core.tiling import Progress
    from napari_unet.io import load_model

    yield Progress(0, 1, f"loading {source}")
    return load_model(source, trust_code=trust_code)


class ModelPanel(WorkerPanel):
    """Load the model that all napari-unet panels of this viewer use."""

    run_text = "Load model"

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer)
        from napari_unet.core.device import available_devices
        from napari_unet.io import registry

        self._discard = None  # (source, unsaved versions) a second press confirms
        self._agreed: tuple[set, bool] = (set(), False)  # what a load may discard
        form = QFormLayout()
        self.model_combo = QComboBox()
        self.model_combo.addItems([*registry.bundled_models(), FILE_ENTRY])
        default = registry.default_model()
        if default:
            self.model_combo.setCurrentText(default)
        form.addRow("Model", self.model_combo)
        self.path_edit = QLineEdit()
        # (short: a longer one was cut off in a docked panel; the tooltip says more)
        self.path_edit.setPlaceholderText("a model file or package")
        self.path_edit.setToolTip(
            "A napari-unet .safetensors file, a TorchScript .pt, or a bioimage.io package "
            "(.zip, its folder, or its rdf.yaml / bioimageio.yaml)"
        )
        browse = QPushButton("Browse...")
        row = QHBoxLayout()
        row.addWidget(self.path_edit)
        row.addWidget(browse)
        form.addRow("File", row)
        self.trust_check = QCheckBox("Trust package code (bioimage.io)")
        self.trust_check.setToolTip(
            "Some bioimage.io packages ship their network as Python source. It runs only if "
            "you trust where the package comes from."
        )
        form.addRow("", self.trust_check)
        self.device_combo = QComboBox()
        devices = available_devices()
        self.device_combo.addItems([f"auto ({devices[0]})", *devices])
        if self.state.device in devices:  # a reopened panel shows the device in use
            self.device_combo.setCurrentText(self.state.device)
        self.device_combo.setToolTip(
            "Where the network runs, for every panel of this viewer; auto: a GPU if there "
            "is one (CUDA or Apple MPS), else the CPU"
        )
        form.addRow("Device", self.device_combo)
        self.form.addLayout(form)
        self.card = _Card()
        self.card.setReadOnly(True)
        # the card lines up its values in columns
        font = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
        font.setStyleHint(QFont.StyleHint.Monospace)
        font.setFixedPitch(True)
        self.card.setFont(font)
        self.card.setPlaceholderText("No model loaded.")
        # the card is what the panel is for: it takes the room the panel has (it sat in
        # 190 px with a scroll bar above 560 px of nothing)
        self.card.setMinimumHeight(160)
        self.card.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.form.addWidget(self.card, 1)
        self.grow_controls()
        browse.clicked.connect(self._on_browse)
        self.model_combo.currentTextChanged.connect(self._on_model_choice)
        self.device_combo.currentTextChanged.connect(self._on_device)
        self.state.model_changed.connect(self._on_model_changed)
        if self.state.model is not None:  # a reopened panel: the model in use
            self._show_source(self.state.model)
            self._on_model_changed(self.state.model)
        self._on_model_choice(self.model_combo.currentText())

    def _show_source(self, model) -> None:
        """Choose where ``model`` came from: its bundled name or its file (a fine-tuned
        version, from no file, leaves the choice as it is)."""
        from napari_unet.io import registry

        source = model.info.source
        if not source:
            return
        for name in registry.bundled_models():
            if Path(str(registry.bundled_path(name))) == Path(source):
                self.model_combo.setCurrentText(name)
                return
        self.model_combo.setCurrentText(FILE_ENTRY)
        self.path_edit.setText(source)

    def source(self) -> str:
        """What to load: a bundled name or the file path."""
        choice = self.model_combo.currentText()
        return self.path_edit.text().strip() if choice == FILE_ENTRY else choice

    def _on_model_choice(self, text: str) -> None:
        self.path_edit.setEnabled(text == FILE_ENTRY)

    def _on_browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self,
            "Open a U-Net model",
            "",
            "Models (*.safetensors *.pt *.pth *.zip *.yaml);;All files (*)",
        )
        if path:
            self.model_combo.setCurrentText(FILE_ENTRY)
            self.path_edit.setText(path)

    def _on_device(self, text: str) -> None:
        self.state.device = text.split(" ")[0]

    def _on_run(self) -> None:
        source = self.source()
        if not source:
            self.status.setText("Choose a model file first.")
            return
        at_stake, first = [], []
        if self.state.training:
            at_stake.append("a fine-tune run is going on (loading another model cancels it)")
            first.append("let the run end")
        if self.state.unsaved:
            at_stake.append(
                f"the fine-tune panel has unsaved versions ({', '.join(self.state.unsaved)}); "
                "loading another model discards them"
            )
            first.append("save the versions")
        key = (source, tuple(self.state.unsaved), self.state.training)
        if at_stake and self._discard != key:
            # a second press with the same choice confirms: nothing is lost silently
            self._discard = key
            self.status.setText(
                "; ".join(at_stake).capitalize()
                + f". {' and '.join(first).capitalize()} there first, or press "
                f"'{self.run_text}' again to go ahead."
            )
            return
        self._discard = None
        # what the user agreed to lose: anything more by the time the model arrives (a
        # run started, a version made meanwhile) is not discarded without asking
        self._agreed = (set(self.state.unsaved), self.state.training)
        self.status.setText(f"Loading {source}...")
        self.start(
            load_steps,
            source,
            self.trust_check.isChecked(),
            total=1,
            desc="napari-unet: loading model",
        )

    def _on_errored(self, err: Exception) -> None:
        super()._on_errored(err)
        model = self.state.model
        if model is not None:  # the card below is still that model's
            self.status.setText(f"{self.status.text()} (still using {model.info.name})")

    def _on_returned(self, model) -> None:
        unsaved, training = self._agreed
        new = [v for v in self.state.unsaved if v not in unsaved]
        what = []
        if self.state.training and not training:
            what.append("a fine-tune run started")
        if new:
            what.append(f"the fine-tune panel made the unsaved version(s) {', '.join(new)}")
        if what:
            self.status.setText(
                f"Loaded {model.info.name} but kept {self.state.model.info.name}: "
                f"{' and '.join(what)} while it loaded. Press '{self.run_text}' again to "
                "switch (you will be asked first)."
            )
            return
        self.state.model = model
        note = model.info.provenance.get("trust_note")  # (a package's code that could not run)
        self.status.setText(f"Loaded {model.info.name}." + (f" Note: {note}." if note else ""))

    def _on_model_changed(self, model) -> None:
        self.card.setPlainText(model.info.card() if model is not None else "")
        self._discard = None
        if model is not None:
            self.status.setText(f"In use: {model.info.name}")


class _Card(QPlainTextEdit):
    """The model card: asks for its least height, and takes whatever room there is
    (QPlainTextEdit asks for a fixed height above it)."""

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt API
        return QSize(super().sizeHint().width(), self.minimumHeight())
