"""Segmentation metrics: Dice, Jaccard (IoU) and pixel accuracy, pooled over pixels.

Conventions
-----------
* **Pooled**: counts (true/false positives, ...) are summed over all pixels of
  all images first, then turned into a score ("micro" over images). One small
  image with a bad prediction therefore weighs as much as its pixel count.
* **Foreground only** for Dice and Jaccard: class 0 is background and is not
  scored. Binary (2 classes): the score of class 1. More classes: the
  unweighted mean over classes ``1 .. n_classes - 1`` ("macro").
* **Empty class**: a class absent from both prediction and ground truth
  (``TP + FP + FN == 0``) scores **1.0** for Dice and Jaccard - nothing to find,
  nothing found. A class absent from the truth but predicted scores 0.0.
* **Pixel accuracy**: fraction of all scored pixels (background included)
  whose predicted class is right.
* Pixels whose target equals ``ignore_index`` (padding) are not scored. Scoring
  zero pixels raises :class:`ValueError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: Mask value of pixels that are not scored (padding beyond a tile's edge).
#: Same as ``torch.nn.CrossEntropyLoss``'s default ``ignore_index``.
IGNORE_INDEX = -100


def _as_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def to_labels(pred: Any, n_classes: int) -> np.ndarray:
    """Class indices from a label map ``(…, H, W)`` or logits ``(B, C, H, W)`` with ``C == n_classes``.

    Floating-point input of 4 dimensions is treated as logits/probabilities and
    arg-maxed over axis 1; integer or boolean input is returned as int64 labels.
    """
    array = _as_numpy(pred)
    if np.issubdtype(array.dtype, np.floating):
        if array.ndim != 4 or array.shape[1] != n_classes:
            raise ValueError(
                f"pred: expected integer labels or float logits of shape (B, {n_classes}, H, W), "
                f"received float array of shape {array.shape}"
            )
        return array.argmax(axis=1)
    return array.astype(np.int64)


def confusion_matrix(pred: Any, target: Any, n_classes: int = 2, ignore_index: int | None = IGNORE_INDEX) -> np.ndarray:
    """Pixel confusion matrix ``(n_classes, n_classes)``: rows = truth, columns = prediction.

    Parameters
    ----------
    pred : array-like or Tensor
        Predicted labels (any shape) or logits ``(B, C, H, W)``.
    target : array-like or Tensor
        True labels, same shape as the predicted labels.
    n_classes : int
        Number of classes, background included.
    ignore_index : int or None
        Target value of pixels to skip.

    Raises
    ------
    ValueError
        If shapes differ or labels fall outside ``0 .. n_classes - 1``.
    """
    if n_classes < 2:
        raise ValueError(f"n_classes: expected at least 2 (background + one class), received {n_classes}")
    labels = to_labels(pred, n_classes)
    truth = _as_numpy(target).astype(np.int64)
    if labels.shape != truth.shape:
        raise ValueError(f"pred and target shapes differ: pred labels {labels.shape}, target {truth.shape}")
    valid = truth != ignore_index if ignore_index is not None else np.ones(truth.shape, dtype=bool)
    labels, truth = labels[valid], truth[valid]
    for name, values in (("target", truth), ("pred", labels)):
        if values.size and (values.min() < 0 or values.max() >= n_classes):
            raise ValueError(
                f"{name}: expected class indices 0..{n_classes - 1}, received values "
                f"from {values.min()} to {values.max()}"
            )
    counts = np.bincount(truth * n_classes + labels, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def scores_from_confusion(matrix: np.ndarray) -> dict[str, Any]:
    """Dice, Jaccard and pixel accuracy of a pooled confusion matrix (see module conventions).

    Returns
    -------
    dict
        ``dice``, ``jaccard``, ``pixel_accuracy`` (floats), ``dice_per_class`` and
        ``jaccard_per_class`` (lists over all classes, background first) and
        ``n_pixels`` (int).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    total = matrix.sum()
    if total == 0:
        raise ValueError("no pixels to score: every target pixel is ignore_index or the input is empty")
    tp = np.diag(matrix)
    fp = matrix.sum(axis=0) - tp
    fn = matrix.sum(axis=1) - tp
    dice_den, iou_den = 2 * tp + fp + fn, tp + fp + fn
    dice_c = np.where(dice_den > 0, 2 * tp / np.maximum(dice_den, 1), 1.0)
    iou_c = np.where(iou_den > 0, tp / np.maximum(iou_den, 1), 1.0)
    return {
        "dice": float(dice_c[1:].mean()),
        "jaccard": float(iou_c[1:].mean()),
        "pixel_accuracy": float(tp.sum() / total),
        "dice_per_class": dice_c.tolist(),
        "jaccard_per_class": iou_c.tolist(),
        "n_pixels": int(total),
    }


def dice(pred: Any, target: Any, n_classes: int = 2, ignore_index: int | None = IGNORE_INDEX) -> float:
    """Foreground Dice ``2TP / (2TP + FP + FN)`` pooled over pixels (macro over classes >= 1)."""
    return scores_from_confusion(confusion_matrix(pred, target, n_classes, ignore_index))["dice"]


def jaccard(pred: Any, target: Any, n_classes: int = 2, ignore_index: int | None = IGNORE_INDEX) -> float:
    """Foreground Jaccard / IoU ``TP / (TP + FP + FN)`` pooled over pixels (macro over classes >= 1)."""
    return scores_from_confusion(confusion_matrix(pred, target, n_classes, ignore_index))["jaccard"]


def pixel_accuracy(pred: Any, target: Any, n_classes: int = 2, ignore_index: int | None = IGNORE_INDEX) -> float:
    """Fraction of scored pixels (all classes) predicted correctly."""
    return scores_from_confusion(confusion_matrix(pred, target, n_classes, ignore_index))["pixel_accuracy"]


class SegmentationMetrics:
    """Accumulate a confusion matrix over batches, then score it once (pooled).

    Examples
    --------
    >>> metrics = SegmentationMetrics(n_classes=2)
    >>> metrics.update(np.array([[0, 1]]), np.array([[0, 1]]))
    >>> metrics.compute()["dice"]
    1.0
    """

    def __init__(self, n_classes: int = 2, ignore_index: int | None = IGNORE_INDEX) -> None:
        self.n_classes = n_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((n_classes, n_classes), dtype=np.int64)

    def update(self, pred: Any, target: Any) -> None:
        """Add a batch: labels or logits ``(B, C, H, W)`` and targets."""
        self.matrix += confusion_matrix(pred, target, self.n_classes, self.ignore_index)

    def compute(self) -> dict[str, Any]:
        """Scores of everything added so far (see :func:`scores_from_confusion`)."""
        return scores_from_confusion(self.matrix)

    @property
    def n_pixels(self) -> int:
        """Number of pixels scored so far."""
        return int(self.matrix.sum())
