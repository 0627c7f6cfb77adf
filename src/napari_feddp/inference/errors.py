"""Exceptions raised by the inference engine."""

from __future__ import annotations

from typing import Any


class InferenceError(ValueError):
    """Bad input to the engine, or a model that does not behave as its spec says.

    The message names what was expected and what was received.
    """


class InferenceCancelled(RuntimeError):
    """A run was cancelled before every tile was predicted.

    Attributes
    ----------
    result : SegmentationResult
        The partial result (``result.complete`` is False); kept so that a caller
        can inspect or delete it, never to be shown as a finished segmentation.
    """

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result
