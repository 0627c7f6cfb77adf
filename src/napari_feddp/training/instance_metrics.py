"""Object-level scores of a nucleus instance map against the annotated nuclei.

Both maps are integer label images of one tile: 0 is background, every other
value one object. The overlaps of all object pairs come from one contingency
table (:func:`skimage.metrics.contingency_table`), so every score costs one
pass over the pixels whatever the number of nuclei.

Conventions
-----------
**AJI**, aggregated Jaccard index (Kumar et al., IEEE TMI 2017): every true
nucleus G is paired with the predicted object S of largest IoU among those
that overlap it; C adds ``|G ∩ S|`` and U adds ``|G ∪ S|`` (``|G|`` alone
when nothing overlaps G); finally U adds the area of every predicted object
that was paired with no true nucleus. ``AJI = C / U``. A predicted object may
be paired with several true nuclei (one per true nucleus), as in the
challenge's reference code and HoVer-Net's ``get_fast_aji``.

**PQ**, panoptic quality (Kirillov et al., CVPR 2019): true and predicted
objects with IoU > 0.5 are matched (such a match is unique); TP, FP and FN
count matched pairs, unmatched predictions and unmatched nuclei.
``SQ`` = mean IoU of the matches, ``DQ = TP / (TP + FP/2 + FN/2)`` (the object
F1 score at IoU 0.5), ``PQ = DQ * SQ``.

Scores of a set of tiles are the mean of the per-tile scores (as the
MoNuSeg challenge reports AJI); an empty tile (no nucleus, no prediction)
scores 1.
"""

from __future__ import annotations

import numpy as np

#: IoU a predicted object must exceed to count as a detected nucleus (PQ, DQ, F1).
MATCH_IOU = 0.5


def _overlaps(truth: np.ndarray, pred: np.ndarray):
    """Intersections and IoU of every overlapping (true, predicted) object pair, and the areas."""
    from skimage.metrics import contingency_table

    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"label maps differ in shape: truth {truth.shape}, prediction {pred.shape}")
    for name, labels in (("truth", truth), ("prediction", pred)):
        if labels.dtype.kind not in "iub":
            raise ValueError(f"{name}: expected an integer label image, received dtype {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise ValueError(f"{name}: labels must be >= 0")
    table = contingency_table(truth.astype(np.int64), pred.astype(np.int64)).tocoo()
    truth_area = np.bincount(truth.ravel().astype(np.int64))
    pred_area = np.bincount(pred.ravel().astype(np.int64))
    keep = (table.row > 0) & (table.col > 0)
    rows, cols, inter = table.row[keep], table.col[keep], table.data[keep].astype(np.float64)
    union = truth_area[rows] + pred_area[cols] - inter
    return rows, cols, inter, union, truth_area, pred_area


def aggregated_jaccard_index(truth: np.ndarray, pred: np.ndarray) -> float:
    """AJI of one tile (see the module's conventions)."""
    rows, cols, inter, union, truth_area, pred_area = _overlaps(truth, pred)
    true_ids = np.flatnonzero(truth_area[1:]) + 1
    pred_ids = np.flatnonzero(pred_area[1:]) + 1
    if not len(true_ids) and not len(pred_ids):
        return 1.0
    iou = inter / union
    # Best partner of each true nucleus: sort by (true id, IoU) and keep the last pair per id.
    order = np.lexsort((iou, rows))
    last = np.r_[rows[order][1:] != rows[order][:-1], True] if len(order) else np.zeros(0, bool)
    best = order[last]
    paired_true = set(rows[best].tolist())
    intersection = float(inter[best].sum())
    total = float(union[best].sum())
    total += float(sum(truth_area[t] for t in true_ids if t not in paired_true))
    paired_pred = set(cols[best].tolist())
    total += float(sum(pred_area[p] for p in pred_ids if p not in paired_pred))
    return intersection / total if total else 1.0


def panoptic_quality(truth: np.ndarray, pred: np.ndarray, *, match_iou: float = MATCH_IOU) -> dict[str, float]:
    """PQ, DQ, SQ and the TP / FP / FN counts of one tile (see the module's conventions)."""
    if match_iou < 0.5:
        raise ValueError("match_iou below 0.5 does not give a unique matching")
    rows, cols, inter, union, truth_area, pred_area = _overlaps(truth, pred)
    iou = inter / union
    matched = iou > match_iou
    tp = int(matched.sum())
    n_true = int(np.count_nonzero(truth_area[1:]))
    n_pred = int(np.count_nonzero(pred_area[1:]))
    fp, fn = n_pred - tp, n_true - tp
    if tp + fp + fn == 0:
        return {"pq": 1.0, "dq": 1.0, "sq": 1.0, "tp": 0, "fp": 0, "fn": 0}
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(iou[matched].mean()) if tp else 0.0
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn}


def instance_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """AJI, PQ, DQ, SQ, object F1 at IoU 0.5 and the counts of one tile."""
    pq = panoptic_quality(truth, pred)
    return {"aji": aggregated_jaccard_index(truth, pred), **pq, "f1": pq["dq"]}


def mean_instance_scores(per_tile: list[dict[str, float]]) -> dict[str, float]:
    """Per-tile scores averaged over tiles (AJI, PQ, DQ, SQ, F1); counts summed."""
    if not per_tile:
        raise ValueError("no tiles to average")
    out = {key: float(np.mean([s[key] for s in per_tile])) for key in ("aji", "pq", "dq", "sq", "f1")}
    out.update({key: int(sum(s[key] for s in per_tile)) for key in ("tp", "fp", "fn")})
    return out
