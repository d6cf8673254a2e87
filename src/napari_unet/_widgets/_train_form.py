"""The fine-tune panel's training settings, read as a ``TrainConfig.finetune``."""

from __future__ import annotations

from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QSpinBox


def _spin(low: int, high: int, value: int, suffix: str = "", step: int = 1) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(low, high)
    spin.setSingleStep(step)
    spin.setValue(value)
    spin.setSuffix(suffix)
    return spin


def _check(text: str, checked: bool = True, tip: str = "") -> QCheckBox:
    check = QCheckBox(text)
    check.setChecked(checked)
    check.setToolTip(tip)
    return check


TIPS = {
    "seconds_spin": "How long the training steps may take: the steps that fit are timed "
    "first, so a version can be repeated exactly (time paused does not count). Reading "
    "the paint, predicting the unpainted pixels and checking the painted ones before and "
    "after come on top: seconds, more on large planes",
    "steps_spin": "The most training steps a run makes, whatever the time budget",
    "lr_spin": "How far each step moves the weights: lower it if the loss jumps about, "
    "raise it if it hardly falls",
    "batch_spin": "Patches per step: more is steadier and slower",
    "patch_spin": "Side of the square patches cut around painted pixels for each step",
}


class TrainForm:
    """Time budget, steps, learning rate, batch and patch size, augmentation and the
    other fine-tuning switches, as rows of a ``QFormLayout``."""

    def __init__(self, form) -> None:
        self.seconds_spin = _spin(5, 36000, 60, " s")
        form.addRow("Time budget", self.seconds_spin)
        self.steps_spin = _spin(1, 100000, 400)
        form.addRow("Max. steps", self.steps_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 1e-1)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(1e-3)
        form.addRow("Learning rate", self.lr_spin)
        self.batch_spin = _spin(1, 64, 4)
        form.addRow("Batch size", self.batch_spin)
        self.patch_spin = _spin(32, 1024, 128, " px", step=32)
        form.addRow("Patch size", self.patch_spin)
        # (short texts: checkboxes do not wrap, and the dock is as wide as its widest one)
        self.augment_check = _check("Augment (flips, rotations, intensity)")
        self.adapt_check = _check(
            "Adapt normalisation to these images",
            tip="Re-estimate the network's batch-norm statistics on the annotated images",
        )
        self.pseudo_check = _check(
            "Keep confident predictions",
            tip="Where nothing is painted, the model's own confident prediction (p >= 0.9) "
            "is kept as a weak target, so a few strokes do not unlearn the rest.",
        )
        self.freeze_check = _check(
            "Freeze encoder",
            checked=False,
            tip="Train only the decoder: quicker, and safer with very few strokes",
        )
        for check in (self.augment_check, self.adapt_check, self.pseudo_check, self.freeze_check):
            form.addRow("", check)
        self.weights_combo = QComboBox()
        self.weights_combo.addItems(["auto", "balanced", "sqrt", "none"])
        self.weights_combo.setToolTip(
            "How rare classes are weighted in the loss: 'balanced' weighs each class by "
            "1 / its painted share, 'sqrt' by its square root, 'none' not at all; 'auto': "
            "balanced for painted strokes, and for instance masks the base model's own "
            "weighting, with its extra weight on the gaps and contacts between objects"
        )
        form.addRow("Class weights", self.weights_combo)
        for name, tip in TIPS.items():
            getattr(self, name).setToolTip(tip)

    def config(self, device: str):
        """The settings as a ``TrainConfig`` for fine-tuning on ``device``."""
        from napari_unet.core.augment import AugmentConfig
        from napari_unet.core.training import TrainConfig

        aug = (
            AugmentConfig(intensity=0.2, noise=0.03)
            if self.augment_check.isChecked()
            else AugmentConfig(flips=False, rotations=False, intensity=0.0, noise=0.0)
        )
        weighting = self.weights_combo.currentText()
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
            # auto: unset, and so the base model's where the paint is instance masks
            class_weighting=None if weighting == "auto" else weighting,
            device=device,
        )
