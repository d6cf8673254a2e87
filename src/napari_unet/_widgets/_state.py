"""Per-viewer shared state: the loaded model and device (no global singleton).

Widgets of the same viewer share one :class:`ViewerState`, looked up by the
viewer and dropped when the viewer is garbage-collected.
"""

from __future__ import annotations

import weakref

from psygnal import Signal

_STATES: dict[int, ViewerState] = {}


class ViewerState:
    """The model and device shared by the napari-unet widgets of one viewer."""

    model_changed = Signal(object)  # LoadedModel | None
    device_changed = Signal(str)

    def __init__(self) -> None:
        self._model = None
        self._device = "auto"
        # names of fine-tuned versions not saved yet: loading another model asks first
        self.unsaved: list[str] = []
        # the fine-tuned versions (core.versions.ModelVersions), kept here rather than in
        # the fine-tune panel: closing and reopening the panel loses none of them
        self.versions = None
        # a fine-tune run is going on: loading another model asks first (it cancels it)
        self.training = False

    @property
    def model(self):
        return self._model

    @model.setter
    def model(self, value) -> None:
        self._model = value
        self.model_changed.emit(value)
        # a model that is none of the fine-tuned versions (another model loaded, while no
        # fine-tune panel was open to start its versions anew): the versions are gone
        if self.versions is not None and not self.versions.holds(value):
            self.versions = None
            self.unsaved = []

    def record_unsaved(self) -> None:
        """``unsaved`` from the versions (after a version was added or saved)."""
        versions = self.versions.unsaved() if self.versions is not None else []
        self.unsaved = [v.model.info.name or v.label for v in versions]

    @property
    def device(self) -> str:
        return self._device

    @device.setter
    def device(self, value: str) -> None:
        self._device = value
        self.device_changed.emit(value)


def real_viewer(viewer):
    """The viewer behind napari's proxies.

    napari hands each dock widget its own proxy of the viewer (``PublicOnlyProxy``
    when opened from the Plugins menu), and every layer read through it is a new
    proxy too: identity, weak references and ``is`` tests on layers only hold on
    the real objects.
    """
    while hasattr(type(viewer), "__wrapped__"):  # wrapt proxies, possibly nested
        inner = object.__getattribute__(viewer, "__wrapped__")
        if inner is viewer:
            break
        viewer = inner
    return viewer


def state_for(viewer) -> ViewerState:
    """The viewer's state, created on first use and dropped with the viewer.

    The state belongs to the viewer behind napari's proxies (:func:`real_viewer`),
    or every panel would have a model of its own.
    """
    viewer = real_viewer(viewer)
    key = id(viewer)
    state = _STATES.get(key)
    if state is None:
        state = _STATES[key] = ViewerState()
        weakref.finalize(viewer, _STATES.pop, key, None)
    return state
