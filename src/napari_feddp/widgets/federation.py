"""Federation dock widget: join a FedDP training round as a lab.

The lab's Flower SuperNode runs as a child process (it installs signal handlers
and blocks, so never in napari's GUI thread); this widget only starts it, polls
its status and local history once a second, plots loss, Dice and epsilon per
round, and stops it on Leave or when napari quits. All logic lives in
:class:`napari_feddp.federation.lab.LabNode`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import Container, FileEdit, FloatSpinBox, Label, LineEdit, PushButton
from qtpy.QtCore import QPointF, QTimer
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QApplication, QWidget

if TYPE_CHECKING:  # pragma: no cover
    import napari

#: Series drawn in the round plot: (history key, colour); the keys the ClientApp records.
SERIES = (("train-loss", "#ffb000"), ("train-dice", "#00c0ff"), ("epsilon", "#ff4f7b"))


class RoundPlot(QWidget):
    """A tiny line plot of per-round values (no plotting library needed)."""

    def __init__(self):
        super().__init__()
        self.setMinimumHeight(110)
        self.values: dict[str, list[float]] = {key: [] for key, _ in SERIES}

    def set_values(self, values: dict[str, list[float]]) -> None:
        self.values = values
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        width, height = self.width(), self.height()
        painter.fillRect(0, 0, width, height, QColor("#262930"))
        legend_x = 6
        for key, colour in SERIES:
            points = self.values.get(key) or []
            painter.setPen(QPen(QColor(colour), 2))
            last = f"{points[-1]:.3g}" if points else "–"
            painter.drawText(legend_x, 14, f"{key} {last}")
            legend_x += 95
            if len(points) < 2:
                continue
            top = max(points) or 1.0
            step = (width - 12) / (len(points) - 1)
            line = [QPointF(6 + i * step, height - 6 - (height - 26) * (v / top)) for i, v in enumerate(points)]
            for a, b in zip(line, line[1:]):
                painter.drawLine(a, b)
        painter.end()


class FederationWidget(Container):
    """Coordinator address, CA, node key, dataset and epsilon budget; Join and Leave."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.superlink = LineEdit(value="127.0.0.1:9092", label="coordinator")
        self.ca = FileEdit(label="CA certificate", filter="*.pem")
        self.key = FileEdit(label="node key")
        self.dataset = FileEdit(label="dataset", mode="d")
        self.eval_dataset = FileEdit(label="held-out set", mode="d")
        self.budget = FloatSpinBox(value=8.0, min=0.0, max=1000.0, step=0.5, label="epsilon budget")
        self.join_button = PushButton(text="Join")
        self.leave_button = PushButton(text="Leave", enabled=False)
        self.status = Label(value="not connected")
        self.policy = Label(value=_policy_text(float(self.budget.value)), label="lab policy")
        self.policy.native.setWordWrap(True)
        self.plot = RoundPlot()
        self.extend([self.superlink, self.ca, self.key, self.dataset, self.eval_dataset, self.budget,
                     self.policy, self.join_button, self.leave_button, self.status])
        self.budget.changed.connect(lambda value: setattr(self.policy, "value", _policy_text(float(value))))
        self.native.layout().addWidget(self.plot)
        self.join_button.changed.connect(self.join)
        self.leave_button.changed.connect(self.leave)
        self.node = None
        self.timer = QTimer()
        self.timer.setInterval(1000)
        self.timer.timeout.connect(self.refresh)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.leave)  # closing napari stops the SuperNode

    def join(self, *_) -> bool:
        """Start this lab's SuperNode (returns at once; status follows)."""
        from ..federation.lab import LabNode

        try:
            dataset = _folder(self.dataset.value, "dataset")
            ca, key = _file(self.ca.value, "CA certificate"), _file(self.key.value, "node key")
            host, _, port = str(self.superlink.value).rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"coordinator: expected HOST:PORT, received {self.superlink.value!r}")
            eval_dir = str(self.eval_dataset.value) if _is_set(self.eval_dataset.value) else ""
            self.node = LabNode(superlink=str(self.superlink.value), ca=ca, key=key, dataset=dataset,
                                epsilon_budget=float(self.budget.value), eval_dataset=eval_dir)
            self.policy.value = self.node.policy_summary()
            self.node.start(wait=False)
        except (ValueError, FileNotFoundError, OSError) as exc:
            self.status.value = f"error: {exc}"
            self.node = None
            return False
        self.join_button.enabled, self.leave_button.enabled = False, True
        self.status.value = "connecting…"
        self.timer.start()
        return True

    def leave(self, *_) -> None:
        """Stop the SuperNode; the privacy ledger keeps what was spent."""
        self.timer.stop()
        if self.node is not None:
            self.node.stop()
        self.join_button.enabled, self.leave_button.enabled = True, False
        if self.node is not None:
            self.refresh()
            self.status.value = "left the federation"
        self.node = None

    def refresh(self) -> None:
        """Poll the node: status line and the per-round plot."""
        if self.node is None:
            return
        status = self.node.status()
        text = status.state if status.round is None else f"{status.state} (round {status.round})"
        if status.message:
            text += f": {status.message}"
        self.status.value = text
        rows = [r for r in self.node.history() if r.get("event") == "trained"]
        self.plot.set_values({key: [float(r[key]) for r in rows if r.get(key) is not None] for key, _ in SERIES})
        if status.state in ("error", "stopped"):
            self.timer.stop()
            self.join_button.enabled, self.leave_button.enabled = True, False


def _policy_text(budget: float) -> str:
    from ..federation.policy import describe_policy
    from ..federation.settings import NodeSettings

    return describe_policy(NodeSettings(max_epsilon=budget))


def _is_set(value) -> bool:
    return value is not None and str(value) not in ("", ".")


def _file(value, what: str) -> Path:
    if not _is_set(value) or not Path(value).is_file():
        raise ValueError(f"{what}: choose an existing file (received {str(value) or 'nothing'!r})")
    return Path(value)


def _folder(value, what: str) -> Path:
    if not _is_set(value) or not Path(value).is_dir():
        raise ValueError(f"{what}: choose an existing folder with images/ and masks/ "
                         f"(received {str(value) or 'nothing'!r})")
    return Path(value)
