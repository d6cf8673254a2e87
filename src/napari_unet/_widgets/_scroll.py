"""The scrolling area of a panel's controls (above its buttons and status)."""

from __future__ import annotations

from qtpy.QtCore import QEvent, QSize, Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QSizePolicy, QWidget

# the least height of a panel's scrolling controls (above its buttons and status)
MIN_CONTROLS_HEIGHT = 120


class ControlsScroll(QScrollArea):
    """A panel's controls: as wide as they need (no sideways scrolling, long layer
    names are elided, text wraps), as high as they ask when there is room, and
    scrolling down to ``MIN_CONTROLS_HEIGHT`` when there is not."""

    def __init__(self, inner: QWidget) -> None:
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        # a scroll area asks for all the room there is (Expanding): docked panels
        # shared the column by that instead of by what they hold
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        # the controls are never squeezed below what they ask for: they scroll first
        inner.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        self.setWidget(inner)
        inner.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt API
        # controls added or changed (a model loaded, a message): the panel's size follows
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(obj, event)

    def _bar(self) -> int:
        # the bar as styled (napari's theme draws it wider than its size hint says)
        return (
            max(self.verticalScrollBar().sizeHint().width(), self.verticalScrollBar().width()) + 2
        )

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt API
        hint = self.widget().minimumSizeHint()
        return QSize(hint.width() + self._bar(), min(hint.height(), MIN_CONTROLS_HEIGHT))

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt API
        hint = self.widget().sizeHint()
        # napari's theme draws a frame despite NoFrame: without it the bar showed, to
        # scroll 2 px
        return QSize(hint.width() + self._bar(), hint.height() + 2 * self.frameWidth())
