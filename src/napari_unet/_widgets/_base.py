"""Shared base of the napari-unet panels: Run / Cancel, a worker, progress, errors."""

from __future__ import annotations

import functools
import threading
import time
import weakref

import numpy as np
from qtpy.QtCore import QEvent
from qtpy.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from napari_unet._widgets._scroll import ControlsScroll, WrappedLabel
from napari_unet._widgets._state import real_viewer, state_for

CANCELLING = "Cancelling: stopping the run..."


class WorkerPanel(QWidget):
    """A panel that runs one core generator at a time in a napari thread worker.

    Subclasses build their controls into ``self.form`` and call
    :meth:`start` with a generator function; ``_on_yielded``, ``_on_returned``
    and ``_on_errored`` run on the main thread, the only place layers change.
    """

    run_text = "Run"

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        # the real viewer: layers read through napari's proxy are new proxies on
        # every access, so a chosen layer or a preview layer could not be followed
        self.viewer = real_viewer(napari_viewer)
        self.state = state_for(self.viewer)
        self.worker = None
        # buttons that cannot act while a run goes on, greyed out meanwhile (they said
        # so in the status line, which the run's progress wrote over at once)
        self.idle_only: list[QWidget] = []
        # set by Cancel: runs that take it as their ``should_stop`` stop within a layer
        # of the network, not at the end of a tile (seconds on a CPU)
        self.abort = threading.Event()
        self._progress = None
        self._warnings: list[str] = []  # what the current run warned of
        self._docked = False  # set once napari docks the panel (see event)
        # the controls scroll when the panel is short (all four panels docked in one
        # column made napari's window 1,915 px high, and on a smaller screen wrapped
        # text was cut off); the buttons and the status line stay in sight below them
        outer = QVBoxLayout(self)
        self._inner = QWidget()
        self._scroll = ControlsScroll(self._inner)
        outer.addWidget(self._scroll)
        layout = QVBoxLayout(self._inner)
        layout.setContentsMargins(0, 0, 0, 0)
        self.form = QVBoxLayout()
        layout.addLayout(self.form)
        layout.addStretch()
        buttons = QHBoxLayout()
        self.run_button = QPushButton(self.run_text)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        outer.addLayout(buttons)
        self._outer = outer
        self.status = WrappedLabel()
        outer.addWidget(self.status)
        self.run_button.clicked.connect(self._on_run)
        self.cancel_button.clicked.connect(self._on_cancel)

    def grow_controls(self) -> None:
        """Let the controls take the panel's spare height, for a panel whose controls end
        in a widget that can use the room, such as the model card. By default they keep
        the height they ask for, so that panels docked together share a column by it."""
        self._scroll.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)
        self._inner.layout().setStretchFactor(self.form, 1)

    def add_button_row(self, *widgets: QWidget) -> None:
        """A row of buttons under Run / Cancel, in sight however the controls scroll
        (the controls a run needs, such as Pause)."""
        row = QHBoxLayout()
        for w in widgets:
            row.addWidget(w)
        self._outer.insertLayout(self._outer.indexOf(self.status), row)

    # -- the input image layer --------------------------------------------------
    def add_image_choice(self, form) -> QComboBox:
        """An "Image" row listing the viewer's input image layers, kept up to date."""
        self.layer_combo = QComboBox()
        # a long layer name is elided, not a reason for a wider panel
        self.layer_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.layer_combo.setMinimumContentsLength(12)
        form.addRow("Image", self.layer_combo)
        self._chosen = lambda: None  # weak reference to the chosen layer object
        self.layer_combo.currentTextChanged.connect(self._remember_choice)
        self.layer_combo.currentTextChanged.connect(self._on_layer_choice)
        events = self.viewer.layers.events
        events.inserted.connect(self._on_layers_changed)
        events.removed.connect(self._on_layers_changed)
        return self.layer_combo

    def image_layer(self):
        """The chosen image layer, or None."""
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401

    def _remember_choice(self, name: str) -> None:
        layer = self.image_layer()
        self._chosen = weakref.ref(layer) if layer is not None else (lambda: None)

    def _on_layers_changed(self, event=None) -> None:
        from napari.layers import Image

        from napari_unet._widgets._results import is_output

        # the chosen layer, followed by identity: a renamed layer stays chosen (its
        # old name is gone, and matching names would switch to another layer)
        chosen = self._chosen()
        current = chosen.name if chosen is not None and chosen in self.viewer.layers else None
        names = []
        for layer in self.viewer.layers:
            layer.events.name.connect(self._on_layers_changed)  # renamed: listed anew
            if hasattr(layer.events, "axis_labels"):  # they name its axes: described anew
                layer.events.axis_labels.connect(self._on_layers_changed)
            if isinstance(layer, Image) and not is_output(layer):
                names.append(layer.name)
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        self._remember_choice(self.layer_combo.currentText())
        self._on_layer_choice(self.layer_combo.currentText())

    # -- hooks -----------------------------------------------------------------
    def _on_layer_choice(self, name: str = "") -> None:
        pass

    def _on_run(self) -> None:  # pragma: no cover - subclasses override
        raise NotImplementedError

    def _on_yielded(self, value) -> None:
        pass

    def _on_returned(self, value) -> None:
        pass

    # -- worker bookkeeping ----------------------------------------------------
    def start(self, gen_func, *args, total: int = 0, desc: str = "", activity=True, **kwargs):
        """Run ``gen_func(*args, **kwargs)`` (a generator) in a thread worker.

        ``activity=False`` skips napari's activity-dock progress bar, for panels that
        show their own: its animation repaints the window many times a second, which
        under software OpenGL cost the fine-tuning worker a third of its steps.
        """
        from napari.qt.threading import create_worker
        from napari.utils import progress

        if self.busy():
            return None
        self.abort.clear()
        self._progress = progress(total=total, desc=desc) if activity else None
        self._shown = 0.0
        self._warnings = []
        connect = {
            "yielded": self._on_worker_yielded,
            "returned": self._on_worker_returned,
            "errored": self._on_worker_errored,  # handled here: shown, not re-raised
            "warned": self._on_worker_warned,
            "finished": self._on_finished,
        }
        worker = create_worker(
            _reporting(gen_func), *args, _start_thread=False, _connect=connect, **kwargs
        )
        self.worker = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        for widget in self.idle_only:
            widget.setEnabled(False)
        worker.start()
        return worker

    @staticmethod
    def source_of(layer) -> tuple:
        """What a run's results must still lie over when they arrive: the layer, its data
        and where it is (see :meth:`source_lost`)."""
        if layer is None:
            return (None, None, None)
        return (layer, layer.data, _placement(layer))

    def source_lost(self, source) -> str:
        """Why a run's results no longer belong over ``source`` (:meth:`source_of` the
        image as the run started): ``"removed"``, ``"replaced"`` (new data), ``"moved"``
        (new scale, translate or transform: the results were placed for the old one), or
        ``""`` (still there)."""
        layer, data, placement = source
        if not any(la is layer for la in self.viewer.layers):
            return "removed"
        if layer.data is not data:
            return "replaced"
        return "moved" if _placement(layer) != placement else ""

    def idle(self) -> bool:
        """Whether no run is going on and its results are all shown."""
        return self.worker is None

    def busy(self) -> bool:
        """Whether a run is going on (and then say so): one run per panel at a time."""
        if self.idle():
            return False
        self.status.setText("A run is going on: wait for it to end, or press Cancel first.")
        return True

    def _on_worker_yielded(self, value) -> None:
        if self.worker is None or self.worker.abort_requested:
            return  # a report that was already on its way when Cancel was pressed
        total = getattr(value, "total", None) or getattr(value, "steps", None)
        done = getattr(value, "done", None)
        if done is None:
            done = getattr(value, "step", 0)
        # redrawing napari's progress bar repaints the window: at most twice a second (every
        # step cost the fine-tuning worker a third of its steps under Xvfb)
        now = time.perf_counter()
        if self._progress is not None and total and (now - self._shown >= 0.5 or done >= total):
            self._shown = now
            self._progress.total = total
            self._progress.n = done
            self._progress.refresh()
        self._on_yielded(value)

    def _on_worker_returned(self, value) -> None:
        # a result already on its way when Cancel was pressed (the run had just ended):
        # cancelled means nothing is added, whatever the timing
        if self.abort.is_set():
            return
        self._on_returned(value)

    def _on_worker_errored(self, err: Exception) -> None:
        from napari_unet.core.cancel import Cancelled

        if isinstance(err, Cancelled) and self.abort.is_set():
            return  # the run stopped as asked: the finished handler says so
        self._on_errored(err)

    def _on_worker_warned(self, shown: tuple) -> None:
        """A warning of napari-unet's raised in the run (an image resized only as far as
        allowed, a network that shows seams between tiles): napari shows no worker's
        warnings, so the panel does, in a notification and, once the run has ended,
        after its status."""
        from napari.utils.notifications import show_warning

        message, category, filename = shown[:3]
        if not issubclass(category, (UserWarning, RuntimeWarning)) or (
            "napari_unet" not in str(filename)
        ):
            return  # a library's own (a deprecation): nothing the user can act on
        if str(message) not in self._warnings:
            self._warnings.append(str(message))
            show_warning(f"napari-unet: {message}")

    def _on_cancel(self) -> None:
        if self.worker is not None:
            self.abort.set()
            self.worker.quit()
            # the run stops at its next layer or step: until it has, the panel says so
            # (Run stays off until then)
            self._cancelled_text = self.cancelled_text()
            self.status.setText(CANCELLING)
            self.cancel_button.setEnabled(False)

    def cancelled_text(self) -> str:
        """What the status line says once a cancelled run has stopped."""
        return "Cancelled: nothing was changed."

    def _on_errored(self, err: Exception) -> None:
        from napari.utils.notifications import show_error

        message = str(err) or type(err).__name__
        self.status.setText(f"Error: {message}")
        show_error(f"napari-unet: {message}")

    def _on_finished(self) -> None:
        if self.status.text() == CANCELLING:  # (unless something said more meanwhile)
            self.status.setText(self._cancelled_text)
        elif self._warnings:
            self.status.setText(f"{self.status.text()} Warning: {'; '.join(self._warnings)}")
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        for widget in self.idle_only:
            widget.setEnabled(True)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        if self.worker is not None:
            self.abort.set()
            self.worker.quit()
        super().closeEvent(event)

    def event(self, event) -> bool:
        # napari's close button takes a panel out of its dock (no closeEvent comes): a
        # closed panel's run went on, and added its results, or swapped the viewer's model
        if event.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif self._docked:
                self._docked = False
                self._on_closed()
        return super().event(event)

    def _on_closed(self) -> None:
        """The panel was closed: a run going on is cancelled, and says so."""
        if self.worker is not None and not self.worker.abort_requested:
            from napari.utils.notifications import show_info

            self._on_cancel()
            show_info(f"napari-unet: a panel was closed during its run. {self.status.text()}")


class RunError(Exception):
    """A RuntimeError raised in a run (torch's out-of-memory among them), passed on as
    an error that the panel shows."""


def _reporting(gen_func):
    """``gen_func`` with its RuntimeErrors raised as :class:`RunError`: napari's worker
    takes a RuntimeError for its own deletion, ends without 'errored' or 'finished', and
    the panel waited for a run that was over (out of memory: until napari restarted)."""

    @functools.wraps(gen_func)
    def run(*args, **kwargs):
        try:
            return (yield from gen_func(*args, **kwargs))
        except RuntimeError as err:
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "allocate" in text or "out of memory" in text.lower():
                text = (
                    f"out of memory: use a smaller batch, patch or tile size (or the CPU) ({text})"
                )
            raise RunError(text) from err

    return run


def _placement(layer) -> tuple:
    """Where ``layer`` lies in the world, as numbers that compare equal when unchanged."""
    return tuple(
        tuple(np.ravel(np.asarray(v, dtype=float)))
        for v in (
            layer.scale,
            layer.translate,
            layer.rotate,
            layer.shear,
            layer.affine.affine_matrix,
        )
    )
