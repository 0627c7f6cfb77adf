"""Federation dock widget: join a FedDP training round as a lab.

The lab's Flower SuperNode runs as a child process (it installs signal handlers
and blocks, so never in napari's GUI thread); this widget only starts it, polls
its status and local history once a second, plots loss, Dice and epsilon per
round, and stops it on Leave, when napari quits, when it fails, or when the
coordinator cannot be reached within :data:`CONNECT_TIMEOUT`. All logic lives in
:class:`napari_feddp.federation.lab.LabNode`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import Container, FileEdit, FloatSpinBox, Label, LineEdit, PushButton
from qtpy.QtCore import QPointF, QTimer
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QApplication, QWidget

from ._style import ERROR_COLOR, NOTIFY_LENGTH, show_message, wrap_message_label

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from ..federation.lab import LabNode, LabStatus

#: Series drawn in the round plot: (history key, colour); the keys the ClientApp records.
SERIES = (("train-loss", "#ffb000"), ("train-dice", "#00c0ff"), ("epsilon", "#ff4f7b"))

#: Seconds Join waits for the coordinator to accept this lab before it gives up and stops the node.
CONNECT_TIMEOUT = 60.0

#: States shown in the error colour.
_ALARMING = ("error", "unreachable", "refused")
#: States worth a notification however short the line: the lab stopped, sat out, or finished.
_NOTABLE = ("error", "unreachable", "refused", "declined", "finished")

_UNLIMITED_WARNING = ("WARNING: 0 means UNLIMITED: this lab's epsilon keeps growing with every round "
                      "it trains and no round is ever declined for privacy.")


class RoundPlot(QWidget):
    """A tiny line plot of per-round values (no plotting library needed)."""

    def __init__(self):
        super().__init__()
        self.setMinimumHeight(110)
        self.values: dict[str, list[float]] = {key: [] for key, _ in SERIES}

    def set_values(self, values: dict[str, list[float]]) -> None:
        """Replace the plotted series (history key -> one value per round) and repaint."""
        self.values = values
        self.update()

    def paintEvent(self, event) -> None:
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
    """Coordinator address, CA, node key, dataset and epsilon budget; Join and Leave.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer the dock belongs to.
    """

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.superlink = LineEdit(value="127.0.0.1:9092", label="coordinator (HOST:PORT)")
        self.ca = FileEdit(label="CA certificate", filter="*.pem")
        self.key = FileEdit(label="node key")
        self.dataset = FileEdit(label="dataset", mode="d")
        self.eval_dataset = FileEdit(label="held-out set", mode="d")
        self.budget = FloatSpinBox(value=8.0, min=0.0, max=1000.0, step=0.5, label="epsilon budget")
        self.budget_warning = Label(value=_UNLIMITED_WARNING, label="budget warning", visible=False)
        self.policy = Label(value=_policy_text(float(self.budget.value)), label="lab policy")
        self.join_button = PushButton(text="Join")
        self.leave_button = PushButton(text="Leave", enabled=False)
        self.status = Label(value="not connected", label="status")
        self.plot_legend = Label(value="local training loss, Dice and cumulative epsilon per round "
                                       "(this lab's history, never sent)", label="rounds")
        for label in (self.budget_warning, self.policy, self.status, self.plot_legend):
            wrap_message_label(label)
        self.budget_warning.native.setStyleSheet(f"color: {ERROR_COLOR};")
        self.plot = RoundPlot()
        self.extend([self.superlink, self.ca, self.key, self.dataset, self.eval_dataset, self.budget,
                     self.budget_warning, self.policy, self.join_button, self.leave_button, self.status,
                     self.plot_legend])
        self.budget.changed.connect(self._budget_changed)
        self._budget_changed(self.budget.value)
        self.native.layout().addWidget(self.plot)
        self.join_button.changed.connect(self.join)
        self.leave_button.changed.connect(self.leave)
        self.node: LabNode | None = None
        self.timer = QTimer()
        self.timer.setInterval(1000)
        self.timer.timeout.connect(self.refresh)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.leave)  # closing napari stops the SuperNode

    def join(self, *_) -> bool:
        """Start this lab's SuperNode (returns at once; status follows).

        Returns
        -------
        bool
            False if the form is incomplete or the node could not start.
        """
        from ..federation.lab import LabNode

        try:
            dataset = _folder(self.dataset.value, "dataset")
            ca, key = _file(self.ca.value, "CA certificate"), _file(self.key.value, "node key")
            host, _, port = str(self.superlink.value).rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"coordinator: expected HOST:PORT, received {self.superlink.value!r}")
            eval_dir = str(self.eval_dataset.value) if _is_set(self.eval_dataset.value) else ""
            node = LabNode(superlink=str(self.superlink.value), ca=ca, key=key, dataset=dataset,
                           epsilon_budget=float(self.budget.value), eval_dataset=eval_dir,
                           connect_timeout=CONNECT_TIMEOUT)
            self.policy.value = node.policy_summary()
            self.node = node
            node.start(wait=False)
        except (ValueError, FileNotFoundError, OSError) as exc:
            if self.node is not None:
                self.node.stop()
            self.node = None
            self._set_status(f"error: {exc}", "error")
            return False
        self.join_button.enabled, self.leave_button.enabled = False, True
        self._set_status(f"connecting to {node.superlink}…", "connecting")
        self.timer.start()
        return True

    def leave(self, *_) -> None:
        """Stop the SuperNode; the privacy ledger keeps what was spent."""
        self.timer.stop()
        node, self.node = self.node, None
        if node is not None:
            node.stop()
            self._plot(node)
            self._set_status("left the federation", "stopped")
        self.join_button.enabled, self.leave_button.enabled = True, False

    def refresh(self) -> None:
        """Poll the node: status line and the per-round plot.

        A node that failed, stopped or never reached the coordinator is
        stopped (with everything it started) and the form is ready to Join again.
        """
        node = self.node
        if node is None:
            return
        status = node.status()
        self._plot(node)
        if status.state in status.FINAL:
            self.timer.stop()
            node.stop()
            self.node = None
            self.join_button.enabled, self.leave_button.enabled = True, False
        self._set_status(_status_text(status, node), status.state)

    def _plot(self, node: LabNode) -> None:
        rows = [r for r in node.history() if r.get("event") == "trained"]
        self.plot.set_values({key: [float(r[key]) for r in rows if r.get(key) is not None] for key, _ in SERIES})

    def _set_status(self, text: str, state: str) -> None:
        """Show ``text`` (alarming states in the error colour); notable states also as a notification.

        Polling repeats the status every second: only a change is shown and announced.
        """
        if text == self.status.value:
            return
        show_message(self.status, text, error=state in _ALARMING)  # posts lines too long for the dock
        if state in _NOTABLE and len(text) <= NOTIFY_LENGTH:
            _notify(f"Federation: {text}", state)

    def _budget_changed(self, value: float) -> None:
        self.policy.value = _policy_text(float(value))
        self.budget_warning.visible = float(value) == 0


def _status_text(status: LabStatus, node: LabNode) -> str:
    if status.state == "connecting":
        return f"connecting to {node.superlink}…"
    return status.describe()


def _notify(text: str, state: str) -> None:
    from napari.utils.notifications import show_error, show_info, show_warning

    if state in _ALARMING:
        show_error(text)
    elif state == "declined":
        show_warning(text)
    else:
        show_info(text)


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
