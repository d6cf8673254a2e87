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
        # the panel whose fine-tune run is going on (weakly: a closed panel's run ends
        # with it); loading another model asks first (it cancels the run)
        self._trainer = lambda: None
        self._version_names: set[str] = set()  # the fine-tuned versions' names so far

    def new_version_name(self, name: str) -> str:
        """``name``, or ``name.2``, ``name.3``, ... where this viewer has had a version of
        that name (versions of a model loaded anew restarted at -v1, and their results
        replaced the first ones' layers of the same name)."""
        k, unique = 1, name
        while unique in self._version_names:
            k += 1
            unique = f"{name}.{k}"
        self._version_names.add(unique)
        return unique

    @property
    def trainer(self):
        return self._trainer()

    @trainer.setter
    def trainer(self, panel) -> None:
        self._trainer = weakref.ref(panel) if panel is not None else (lambda: None)

    @property
    def training(self) -> bool:
        """A fine-tune run is going on (in the panel that started the last one: a flag
        stayed on when a closed panel was collected, and a closed panel's run that
        ended turned it off during a newer one)."""
        panel = self._trainer()
        return panel is not None and panel.is_training()

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
