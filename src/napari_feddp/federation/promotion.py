"""Whether a lab adopts the federation's final model as its default (no Qt).

At the end of a run every lab receives the global model. Saving it into the
lab's model store makes it the default of the Segment widget and of
``napari-feddp segment`` (:func:`napari_feddp.models.store.resolve_checkpoint`),
so one poisoned or broken run would replace every lab's working model. Each lab
therefore checks the candidate itself, on its own machine, before promoting it:

1. **Finite.** Every weight is finite and the candidate's output on the fixed
   sample crop (below) is finite. Weights of 1e30 are finite in float32 but
   overflow in the first GroupNorm, so the output test catches them.
2. **Held-out tiles** (node setting ``eval-dir``: a folder with ``images/`` and
   ``masks/``). The candidate and the lab's current default model (the newest
   promoted checkpoint in the lab's store, else the bundled model) are scored
   with the same code, :func:`napari_feddp.training.evaluate` on a sliding-crop
   :class:`~napari_feddp.training.SegmentationDataset` built from each model's
   card (pixel size, tile size, normalisation). The candidate must predict
   every class somewhere it is true (per-class Dice > 0: a constant model is
   refused even against a weak current model) and reach
   ``Dice >= current Dice - promotion-margin`` (node setting, default 0.02).
   When there is no current model to compare with (none bundled, or one with
   other classes or an unreadable file) the sample check below is applied
   instead of the comparison.
3. **No held-out tiles.** A sample check on a fixed crop of the CC0 slide
   bundled with the package (:data:`SAMPLE_CROP`), segmented with the
   inference engine as a user would: the output must not be one class
   everywhere, and the fraction of tissue pixels predicted as nucleus must lie
   in [:data:`MIN_NUCLEUS_FRACTION`, :data:`MAX_NUCLEUS_FRACTION`].

The sample thresholds were set from measurements on that crop (CPU, engine
defaults, tissue = :func:`napari_feddp.training.pseudo_labels.stained`, 90 % of
the crop):

============================================  ==========================
model                                         nucleus / tissue pixels
============================================  ==========================
bundled ``feddp-nuclei`` (this crop)          25.8 %
bundled, three other dermis/epidermis crops   15.8 %, 21.7 %, 28.0 %
bundled, head bias +20 for background         0 % (one class only)
bundled, head bias +20 for nucleus            100 % (one class only)
bundled, head weights negated                 70.3 %
weights of 1e30                               non-finite output
============================================  ==========================

1 % is 25 times below the bundled model and 60 % 2.3 times above it, so
differences in stain, resolution or training between sound models stay
inside. The sample check only rejects broken models: an untrained U-Net
predicts 7-51 % (five random initialisations of the test-sized network) and
passes. A lab that wants the candidate judged on quality sets ``eval-dir``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .local import LocalRequest, model_card

#: Level-0 ``(row, column, side)`` of the sample crop of ``CMU-1-Small-Region.svs``:
#: 512 x 512 pixels (255 µm at 0.499 µm/px) of epidermis and dermis, 90 % tissue.
SAMPLE_CROP = (1700, 850, 512)
#: Smallest plausible fraction of the crop's tissue pixels predicted as nucleus.
MIN_NUCLEUS_FRACTION = 0.01
#: Largest plausible fraction of the crop's tissue pixels predicted as nucleus.
MAX_NUCLEUS_FRACTION = 0.60


@dataclass(frozen=True)
class PromotionDecision:
    """Outcome of :func:`check_promotion`: whether the candidate may become the lab's default, and why.

    ``reason`` stays in the lab's local history, never sent. The scores are the
    foreground Dice of the candidate and of the current default on the lab's
    held-out tiles, ``nucleus_fraction`` the candidate's on the sample crop's
    tissue; None when not measured.
    """

    promoted: bool
    reason: str
    candidate_score: float | None = None
    current_score: float | None = None
    nucleus_fraction: float | None = None


def current_default(store: str | Path) -> Path | None:
    """The lab's current default model: newest promoted checkpoint in ``store``, else the bundled one."""
    from ..models.store import bundled_checkpoint, latest_federated_checkpoint

    return latest_federated_checkpoint(Path(store)) or bundled_checkpoint()


def check_promotion(candidate: nn.Module, current: str | Path | None, request: LocalRequest, *,
                    card=None) -> PromotionDecision:
    """Decide whether ``candidate`` (the federation's final model, not modified) may replace the lab's default.

    Parameters
    ----------
    current : path or None
        Checkpoint of the lab's current default (:func:`current_default`), None when the lab has none.
    request : LocalRequest
        The lab's settings (``node.eval_dir``: held-out tiles,
        ``node.promotion_margin``) and the run settings the candidate was built with.
    card : ModelCard, optional
        The candidate's card (default: the run's, :func:`napari_feddp.federation.local.model_card`).

    Raises
    ------
    ValueError
        If the promotion margin is not a finite number.
    napari_feddp.training.errors.DatasetError
        If ``eval-dir`` is set but holds no usable image/mask pairs.
    """
    card = card if card is not None else model_card(request.settings)
    margin = float(request.node.promotion_margin)
    if not math.isfinite(margin):
        raise ValueError(f"promotion-margin: expected a finite number, received {margin!r}")
    if problem := _non_finite(candidate, card):
        return PromotionDecision(False, problem)
    if not request.node.eval_dir:
        return _sample_check(candidate, card, "no held-out tiles (eval-dir)")

    scores = _held_back_scores(candidate, card, request)
    candidate_dice = float(scores["dice"])
    baseline = _current_scores(current, card, request)
    current_dice = None if isinstance(baseline, str) else float(baseline["dice"])
    missed = [name for name, value in zip(card.class_names, scores["dice_per_class"]) if value <= 0]
    if missed:
        versus = "" if current_dice is None else f", current {current_dice:.3f}"
        return PromotionDecision(False, f"predicts no correct {', '.join(missed)} pixel on the held-out tiles "
                                 f"(Dice {candidate_dice:.3f}{versus})", candidate_dice, current_dice)  # fmt: skip
    if current_dice is None:
        decision = _sample_check(candidate, card, baseline)
        return PromotionDecision(decision.promoted, f"held-out Dice {candidate_dice:.3f}; {decision.reason}",
                                 candidate_dice, nucleus_fraction=decision.nucleus_fraction)  # fmt: skip
    promoted = candidate_dice >= current_dice - margin
    reason = (f"held-out Dice {candidate_dice:.3f} {'>=' if promoted else '<'} current {current_dice:.3f} "
              f"- margin {margin:.3f}")  # fmt: skip
    return PromotionDecision(promoted, reason, candidate_dice, current_dice)


# --------------------------------------------------------------------------- checks


def _non_finite(model: nn.Module, card) -> str:
    """Why ``model`` is numerically broken, or "" when weights and output are finite."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"non-finite weights in {name}"
    image, _ = sample_crop()
    multiple = int(getattr(model, "size_multiple", 1))
    side = image.shape[0] - image.shape[0] % multiple
    mean = np.asarray(card.input.normalization.mean, dtype=np.float32)
    std = np.asarray(card.input.normalization.std, dtype=np.float32)
    pixels = (image[:side, :side].astype(np.float32) / 255.0 - mean) / std
    batch = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]
    was_training = model.training
    try:
        with torch.no_grad():
            output = model.eval()(batch.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
    if not bool(torch.isfinite(output).all()):
        return "non-finite output on the sample tissue crop"
    return ""


def _sample_check(model: nn.Module, card, why: str) -> PromotionDecision:
    """The plausibility check on the bundled sample crop (module docstring, step 3)."""
    fraction, n_labels = nucleus_fraction(model, card)
    figure = f"nucleus fraction {fraction:.1%} of tissue on the sample crop"
    if n_labels < 2:
        return PromotionDecision(False, f"{why}: constant output ({figure})", nucleus_fraction=fraction)
    if not MIN_NUCLEUS_FRACTION <= fraction <= MAX_NUCLEUS_FRACTION:
        bounds = f"{MIN_NUCLEUS_FRACTION:.0%}-{MAX_NUCLEUS_FRACTION:.0%}"
        return PromotionDecision(False, f"{why}: {figure}, outside {bounds}", nucleus_fraction=fraction)
    return PromotionDecision(True, f"{why}: {figure}", nucleus_fraction=fraction)


def nucleus_fraction(model: nn.Module, card) -> tuple[float, int]:
    """Segment the sample crop with ``model`` as its ``card`` says; return the fraction of tissue pixels
    labelled with any foreground class and the number of distinct labels predicted on tissue."""
    from ..inference import run_to_completion, segment_slide
    from ..segmentation import spec_from_card
    from ..training.pseudo_labels import stained

    image, mpp = sample_crop()
    spec = spec_from_card(card, model)
    # CPU and full precision: the thresholds were measured that way.
    result = run_to_completion(segment_slide(image, model, spec, tissue=False, mpp=mpp, device="cpu",
                                             mixed_precision=False))  # fmt: skip
    labels = np.asarray(result.labels[:])[stained(image)]
    if labels.size == 0:
        return 0.0, 0
    return float(np.mean(labels > 0)), int(np.unique(labels).size)


@functools.lru_cache(maxsize=1)
def sample_crop() -> tuple[np.ndarray, float]:
    """The fixed tissue crop (:data:`SAMPLE_CROP`) of the bundled slide, read-only (shared), and its µm per pixel."""
    from .._sample_data import sample_slide_path
    from ..slides import open_slide

    row, col, side = SAMPLE_CROP
    slide = open_slide(sample_slide_path())
    try:
        image = np.array(slide.levels[0][row : row + side, col : col + side])
        mpp = float(slide.mpp[0]) if slide.mpp else 0.5
    finally:
        slide.close()
    image.setflags(write=False)
    return image, mpp


def _held_back_scores(model: nn.Module, card, request: LocalRequest) -> dict:
    """Pooled scores of ``model`` on the lab's held-out tiles, fed as its card says."""
    from ..training import SegmentationDataset, evaluate

    multiple = int(getattr(model, "size_multiple", 1))
    tile = max(multiple, card.input.tile_size - card.input.tile_size % multiple)
    dataset = SegmentationDataset(request.node.eval_dir, crop_size=tile, mode="sliding",
                                  source_mpp=request.settings.source_mpp, target_mpp=card.input.mpp,
                                  n_classes=card.n_classes, augment=False,
                                  normalization=(card.input.normalization.mean, card.input.normalization.std))
    return evaluate(model, dataset, batch_size=request.settings.batch_size, n_classes=card.n_classes)


def _current_scores(current: str | Path | None, card, request: LocalRequest) -> dict | str:
    """Scores of the current default on the held-out tiles, or why it cannot be compared."""
    from ..models import CheckpointError, ModelCardError, load_checkpoint

    if current is None:
        return "no current default model to compare with"
    try:
        model, current_card = load_checkpoint(current)
    except (CheckpointError, ModelCardError, OSError) as exc:
        return f"current default unreadable ({str(exc)[:120]})"
    if current_card.class_names != card.class_names:
        return f"current default has other classes ({', '.join(current_card.class_names)})"
    return _held_back_scores(model, current_card, request)
