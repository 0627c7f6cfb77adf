"""Metrics against hand-computed cases, including the empty-mask convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_feddp.training.metrics import (
    IGNORE_INDEX,
    SegmentationMetrics,
    confusion_matrix,
    dice,
    jaccard,
    pixel_accuracy,
)

# 2x4 binary case: TP=2, FP=1, FN=1, TN=4.
PRED = np.array([[1, 1, 1, 0], [0, 0, 0, 0]])
TRUE = np.array([[1, 1, 0, 1], [0, 0, 0, 0]])


def test_binary_hand_computed():
    assert dice(PRED, TRUE) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 0.6667
    assert jaccard(PRED, TRUE) == pytest.approx(2 / (2 + 1 + 1))  # 0.5
    assert pixel_accuracy(PRED, TRUE) == pytest.approx(6 / 8)


def test_confusion_rows_are_truth():
    matrix = confusion_matrix(PRED, TRUE)
    assert matrix.tolist() == [[4, 1], [1, 2]]


def test_pooled_not_averaged_over_images():
    # Image A: TP=1, FN=1 ; image B: TP=0, FP=2. Pooled Dice = 2*1/(2+2+1) = 0.4
    # (per-image mean would be (2/3 + 0)/2 = 0.333).
    metrics = SegmentationMetrics()
    metrics.update(np.array([[1, 0]]), np.array([[1, 1]]))
    metrics.update(np.array([[1, 1]]), np.array([[0, 0]]))
    assert metrics.compute()["dice"] == pytest.approx(0.4)
    assert metrics.n_pixels == 4


def test_empty_truth_and_prediction_scores_one():
    zeros = np.zeros((4, 4), dtype=int)
    assert dice(zeros, zeros) == 1.0
    assert jaccard(zeros, zeros) == 1.0
    assert pixel_accuracy(zeros, zeros) == 1.0


def test_empty_truth_with_false_positives_scores_zero():
    truth = np.zeros((2, 2), dtype=int)
    pred = np.array([[1, 0], [0, 0]])
    assert dice(pred, truth) == 0.0
    assert jaccard(pred, truth) == 0.0
    assert pixel_accuracy(pred, truth) == pytest.approx(0.75)


def test_multiclass_macro_over_foreground():
    truth = np.array([0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 2, 2, 2, 0])
    # class 1: TP=1 FP=0 FN=1 -> dice 2/3, iou 1/2 ; class 2: TP=2 FP=1 FN=1 -> dice 4/6, iou 2/4
    assert dice(pred, truth, n_classes=3) == pytest.approx((2 / 3 + 4 / 6) / 2)
    assert jaccard(pred, truth, n_classes=3) == pytest.approx(0.5)
    assert pixel_accuracy(pred, truth, n_classes=3) == pytest.approx(4 / 6)


def test_class_absent_everywhere_counts_as_one_in_macro():
    truth = np.array([0, 1, 1])
    pred = np.array([0, 1, 0])
    # class 1: dice 2/3 ; class 2 absent in both -> 1.0
    assert dice(pred, truth, n_classes=3) == pytest.approx((2 / 3 + 1.0) / 2)


def test_ignore_index_pixels_not_scored():
    truth = np.array([1, 0, IGNORE_INDEX, IGNORE_INDEX])
    pred = np.array([1, 0, 1, 0])
    assert dice(pred, truth) == 1.0
    assert pixel_accuracy(pred, truth) == 1.0


def test_logits_and_tensors_accepted():
    logits = torch.tensor([[[[0.0, 5.0]], [[1.0, 0.0]]]])  # (1, 2, 1, 2): argmax -> [[1, 0]]
    truth = torch.tensor([[[1, 0]]])
    assert dice(logits, truth) == 1.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="no pixels"):
        dice(np.array([0]), np.array([IGNORE_INDEX]))
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros(3, int), np.zeros(4, int))
    with pytest.raises(ValueError, match="class indices 0..1"):
        dice(np.array([2]), np.array([1]))
