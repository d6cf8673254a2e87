"""A small embedded loss curve (matplotlib) that redraws a few times a second at most."""

from __future__ import annotations

import time


class LossPlot:
    """Loss per step; :attr:`widget` is the Qt canvas to put in a layout."""

    def __init__(self, min_interval: float = 0.5) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.losses: list[tuple[int, float]] = []
        self.min_interval = min_interval
        self._last_draw = 0.0
        # transparent, in a grey that reads on napari's dark and light themes alike (a
        # white plot glared in the dark one)
        fig = Figure(figsize=(3.2, 1.6), dpi=90, tight_layout=True, facecolor="none")
        self._ax = fig.add_subplot(111, facecolor="none")
        grey = "#8a8f98"
        self._ax.set_xlabel("step", fontsize=8, color=grey)
        self._ax.set_ylabel("loss", fontsize=8, color=grey)
        self._ax.tick_params(labelsize=7, colors=grey)
        for spine in self._ax.spines.values():
            spine.set_color(grey)
        (self._line,) = self._ax.plot([], [], lw=1, color="#3c78d8")
        self.widget = FigureCanvasQTAgg(fig)
        self.widget.setStyleSheet("background-color: transparent;")
        self.widget.setMinimumHeight(130)
        self._empty()

    def _empty(self) -> None:
        # positive axes until there is a curve (matplotlib's empty default is -0.04..0.04)
        self._line.set_data([], [])
        self._ax.set_xlim(0, 10)
        self._ax.set_ylim(0, 1)

    def reset(self) -> None:
        """No curve: a new run starts (the last run's curve stayed on screen before)."""
        self.losses = []
        self._empty()
        self.widget.draw_idle()

    def add(self, step: int, loss: float) -> bool:
        """Record a step; True if the curve was redrawn (not within ``min_interval``)."""
        self.losses.append((step, loss))
        return self.draw()

    def draw(self, force: bool = False) -> bool:
        now = time.perf_counter()
        if not force and now - self._last_draw < self.min_interval:
            return False
        self._last_draw = now
        if self.losses:
            x, y = zip(*self.losses)
            self._line.set_data(x, y)
            self._ax.set_autoscale_on(True)  # (the empty axes' fixed limits turned it off)
            self._ax.relim()
            self._ax.autoscale_view()
        self.widget.draw_idle()
        return True
