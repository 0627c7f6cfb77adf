"""AJI and PQ against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from napari_feddp.training.instance_metrics import (
    aggregated_jaccard_index,
    instance_scores,
    mean_instance_scores,
    panoptic_quality,
)


def test_identical_maps_score_one():
    truth = np.zeros((6, 6), np.uint16)
    truth[0:2, 0:2], truth[3:6, 3:6] = 1, 2
    pred = np.where(truth == 1, 7, np.where(truth == 2, 3, 0)).astype(np.int32)  # ids need not agree
    scores = instance_scores(truth, pred)
    assert scores["aji"] == 1.0 and scores["pq"] == 1.0 and (scores["tp"], scores["fp"], scores["fn"]) == (2, 0, 0)


def test_two_touching_nuclei_merged_into_one_blob():
    # Truth: two 2x2 nuclei side by side. Prediction: one 2x4 blob covering both.
    truth = np.zeros((2, 4), np.uint8)
    truth[:, :2], truth[:, 2:] = 1, 2
    pred = np.ones((2, 4), np.uint8)
    # AJI: G1 pairs with the blob: |G1 ∩ S| = 4, |G1 ∪ S| = 8; G2 likewise: 4 and 8 -> 8 / 16.
    assert aggregated_jaccard_index(truth, pred) == pytest.approx(0.5)
    # PQ: IoU of each nucleus with the blob is 4/8 = 0.5, not > 0.5: no match; FP 1, FN 2.
    pq = panoptic_quality(truth, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (0, 1, 2) and pq["pq"] == 0.0 and pq["dq"] == 0.0


def test_a_missed_nucleus_and_a_false_detection():
    truth = np.zeros((4, 8), np.uint8)
    truth[0:2, 0:2] = 1  # found exactly
    truth[0:2, 4:6] = 2  # missed
    pred = np.zeros((4, 8), np.uint8)
    pred[0:2, 0:2] = 5
    pred[3:4, 6:8] = 9  # nothing there (2 px)
    # AJI: C = 4 (G1); U = 4 (G1 ∪ S5) + 4 (G2 unpaired) + 2 (S9 unpaired) = 10.
    assert aggregated_jaccard_index(truth, pred) == pytest.approx(0.4)
    # PQ: TP 1 (IoU 1), FP 1, FN 1 -> DQ = 1 / (1 + 0.5 + 0.5) = 0.5, SQ = 1.
    pq = panoptic_quality(truth, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 1, 1)
    assert pq["dq"] == pytest.approx(0.5) and pq["sq"] == pytest.approx(1.0) and pq["pq"] == pytest.approx(0.5)


def test_partial_overlap_counts_only_above_half():
    truth = np.zeros((1, 10), np.uint8)
    truth[0, 0:4] = 1
    pred = np.zeros((1, 10), np.uint8)
    pred[0, 1:5] = 1  # IoU 3/5 = 0.6 -> a match with IoU 0.6
    pq = panoptic_quality(truth, pred)
    assert pq["tp"] == 1 and pq["sq"] == pytest.approx(0.6) and pq["pq"] == pytest.approx(0.6)
    assert aggregated_jaccard_index(truth, pred) == pytest.approx(0.6)


def test_aji_pairs_each_nucleus_with_its_best_overlap():
    # G1 (4 px) overlaps S1 by 3 px and S2 by 1 px: best is S1 (IoU 3/(4+3-3) = 0.75, not S2 1/(4+4-1)).
    truth = np.zeros((1, 8), np.uint8)
    truth[0, 0:4] = 1
    pred = np.zeros((1, 8), np.uint8)
    pred[0, 0:3] = 1
    pred[0, 3:7] = 2
    # C = 3; U = |G1 ∪ S1| = 4, plus S2 unpaired (4 px) -> 8.
    assert aggregated_jaccard_index(truth, pred) == pytest.approx(3 / 8)


def test_empty_tiles_and_bad_input():
    empty = np.zeros((3, 3), np.uint8)
    assert instance_scores(empty, empty)["aji"] == 1.0 and instance_scores(empty, empty)["pq"] == 1.0
    one = empty.copy()
    one[1, 1] = 1
    assert aggregated_jaccard_index(one, empty) == 0.0 and panoptic_quality(empty, one)["fp"] == 1
    with pytest.raises(ValueError, match="shape"):
        instance_scores(empty, np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="integer"):
        instance_scores(empty, np.zeros((3, 3), np.float32))
    scores = mean_instance_scores([instance_scores(empty, empty), instance_scores(one, empty)])
    assert scores["aji"] == pytest.approx(0.5) and scores["fn"] == 1
