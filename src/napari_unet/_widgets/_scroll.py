"""The scrolling area of a panel's controls (above its buttons and status)."""

from __future__ import annotations

from qtpy.QtCore import QEvent, QSize, Qt
from qtpy.QtGui import QGuiApplication
from qtpy.QtWidgets import QFrame, QLabel, QScrollArea, QSizePolicy, QWidget

# the least height of a panel's scrolling controls (above its buttons and status), on a
# screen with room for it
MIN_CONTROLS_HEIGHT = 120
# ... and on a small one (two rows of controls)
SMALL_SCREEN_CONTROLS_HEIGHT = 48
# the height napari's window takes beyond its four panels' controls when they are docked
# in one column (its menu, status bar and title bar; the panels' title bars, buttons
# and status lines): measured 478 px with napari 0.9, and 32 for the window's title
OTHER_HEIGHT = 510
PANELS = 4


def least_controls_height(screen_height: int) -> int:
    """The height a panel's controls may be squeezed to, so that the plugin's four
    panels docked in one column fit a screen of ``screen_height`` (available) pixels:
    at 120 px each they made a window 958 px high, below a 768-px laptop screen's edge,
    the fine-tune panel's Train button with it."""
    room = (screen_height - OTHER_HEIGHT) // PANELS
    return max(SMALL_SCREEN_CONTROLS_HEIGHT, min(MIN_CONTROLS_HEIGHT, room))


def available_height(widget: QWidget) -> int:
    """The height of the screen the widget is on, less the desktop's bars."""
    screen = widget.screen() or QGuiApplication.primaryScreen()
    return screen.availableGeometry().height() if screen is not None else 10_000


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
        least = least_controls_height(available_height(self))
        return QSize(hint.width() + self._bar(), min(hint.height(), least))

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt API
        hint = self.widget().sizeHint()
        # napari's theme draws a frame despite NoFrame: without it the bar showed, to
        # scroll 2 px
        return QSize(hint.width() + self._bar(), hint.height() + 2 * self.frameWidth())


class WrappedLabel(QLabel):
    """A label whose text wraps. Where a squeezed panel (four docked in one column on a
    small screen) leaves it too little height for its whole text, its tooltip holds the
    text (errors are also napari notifications)."""

    def __init__(self, text: str = "") -> None:
        super().__init__(text)
        self.setWordWrap(True)

    def setText(self, text: str) -> None:  # noqa: N802 - Qt API
        super().setText(text)
        self._tip()

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt API
        super().resizeEvent(event)
        self._tip()

    def cut(self) -> bool:
        """Whether the label is too low for its text."""
        return bool(self.text()) and self.height() < self.heightForWidth(self.width())

    def _tip(self) -> None:
        self.setToolTip(self.text() if self.cut() else "")
