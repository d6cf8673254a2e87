"""The models of an annotate-and-retrain session: the untouched base and its fine-tuned
versions, one of them current, so the user can compare, revert and save."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from napari_unet.model.info import LoadedModel


@dataclass
class Version:
    """One model in the session: the base (index 0) or a fine-tuned child."""

    model: LoadedModel
    label: str
    parent: int | None = None
    created: str = field(
        default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds")
    )
    details: dict = field(default_factory=dict)  # steps, painted pixels, accuracies
    saved_to: str = ""  # the last file this version was written to


class ModelVersions:
    """The base model and the versions fine-tuned from it, one of them current.

    The base is never replaced; a failed or stopped run adds nothing, so the
    current version is always one that finished.
    """

    def __init__(self, base: LoadedModel) -> None:
        self.versions = [Version(base, f"v0 base ({base.info.name or 'model'})")]
        self.current = 0

    @property
    def base(self) -> LoadedModel:
        return self.versions[0].model

    @property
    def model(self) -> LoadedModel:
        return self.versions[self.current].model

    def add(self, model: LoadedModel, parent: int, **details) -> Version:
        n = len(self.versions)
        version = Version(model, f"v{n} from v{parent}", parent, details=details)
        self.versions.append(version)
        self.current = n
        return version

    def holds(self, model) -> bool:
        """Whether ``model`` is one of these versions (the very object)."""
        return any(v.model is model for v in self.versions)

    def unsaved(self) -> list[Version]:
        """The fine-tuned versions never written to a file (lost when the session ends)."""
        return [v for v in self.versions[1:] if not v.saved_to]

    def mark_saved(self, version: Version, path: str) -> None:
        """``version`` was written to ``path``: any other version saved there before is
        unsaved again (its file now holds this one)."""
        target = Path(path).resolve()
        for other in self.versions:
            if (
                other is not version
                and other.saved_to
                and Path(other.saved_to).resolve() == target
            ):
                other.saved_to = ""
        version.saved_to = str(path)

    def select(self, index: int) -> LoadedModel:
        if not 0 <= index < len(self.versions):
            raise IndexError(f"no version {index}; there are {len(self.versions)}")
        self.current = index
        return self.model

    def revert(self) -> LoadedModel:
        """Back to the parent of the current version (the base stays the base)."""
        parent = self.versions[self.current].parent
        return self.select(0 if parent is None else parent)

    def describe(self, index: int) -> str:
        v = self.versions[index]
        d = v.details
        if index == 0:
            return v.label
        parts = [v.label, f"{d.get('steps', '?')} steps"]
        if "accuracy_before" in d and "accuracy_after" in d:
            parts.append(
                f"painted px right {d['accuracy_before']:.0%} -> {d['accuracy_after']:.0%}"
            )
        parts.append(f"saved as {Path(v.saved_to).name}" if v.saved_to else "not saved")
        return ", ".join(parts)
