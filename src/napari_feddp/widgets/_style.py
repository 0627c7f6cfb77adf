"""How the FedDP dock widgets show messages: a dock is narrow and Qt widens it to fit its widest
child, so a status line wraps, and a long message is also posted as a napari notification."""

from __future__ import annotations

from . import ERROR_COLOR

__all__ = ["ERROR_COLOR", "NOTIFY_LENGTH", "show_message", "wrap_message_label"]

#: Messages longer than this (characters) also go to a napari notification.
NOTIFY_LENGTH = 120
#: Narrowest a wrapped message label gets (px): sets the tallest it can make its dock.
MIN_MESSAGE_WIDTH = 200


def wrap_message_label(label) -> None:
    """Make a magicgui ``Label`` wrap inside its dock (growing in height) instead of widening it;
    its text can be selected to copy a path or an error."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QSizePolicy

    native = label.native
    native.setWordWrap(True)
    # magicgui's fixed size policy would let a long line set the dock's width.
    policy = QSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Minimum)
    policy.setHeightForWidth(True)
    native.setSizePolicy(policy)
    # The dock's minimum height is the label's height at its minimum width: a 1-px minimum
    # would stack one word per line and make the dock taller than a laptop screen.
    native.setMinimumWidth(MIN_MESSAGE_WIDTH)
    native.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)


def show_message(label, text: str, *, error: bool = False, notify: bool = False) -> None:
    """Show ``text`` in ``label`` (in :data:`ERROR_COLOR` for an error).

    A message longer than :data:`NOTIFY_LENGTH` is kept as the label's tooltip
    and also posted as a napari notification, once however often it is shown
    again (widgets that poll repeat their status); ``notify`` posts one
    whatever the length (a failed run).
    """
    changed = label.value != text
    label.value = text
    label.native.setStyleSheet(f"color: {ERROR_COLOR};" if error else "")
    long = len(text) > NOTIFY_LENGTH
    label.native.setToolTip(text if long else "")
    if (long or notify) and changed:
        from napari.utils.notifications import show_error, show_info

        (show_error if error else show_info)(text)
