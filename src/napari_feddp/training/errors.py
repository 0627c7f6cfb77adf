"""Exceptions raised by :mod:`napari_feddp.training`.

Every message names the file or ledger concerned, what was expected and what
was found, so that a pathologist reading it in napari can fix the input.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """A local dataset folder, image or mask is missing, unreadable or inconsistent."""


class LedgerError(RuntimeError):
    """A privacy ledger is missing, tampered with, or inconsistent with its marker.

    Never caught inside this package: training must stop rather than restart
    the privacy accounting from zero.
    """


class BudgetExceededError(RuntimeError):
    """The next round would take the cumulative epsilon above ``epsilon_max``.

    Raised *before* any training, so no privacy budget is spent. A federated
    client catches it, reports ``str(error)`` and sits the round out.

    Attributes
    ----------
    epsilon_spent : float
        Cumulative epsilon before the refused round.
    epsilon_next : float
        Cumulative epsilon the round would have produced.
    epsilon_max : float
        The configured budget.
    """

    def __init__(self, message: str, *, epsilon_spent: float, epsilon_next: float, epsilon_max: float):
        super().__init__(message)
        self.epsilon_spent = epsilon_spent
        self.epsilon_next = epsilon_next
        self.epsilon_max = epsilon_max
