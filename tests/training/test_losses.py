"""Dice+CE loss: correct values and per-sample independence (required for DP-SGD)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from napari_feddp.training import IGNORE_INDEX, DiceCELoss


def test_perfect_prediction_has_small_loss_and_wrong_has_large():
    target = torch.tensor([[[0, 1], [1, 0]]])
    good = F.one_hot(target, 2).permute(0, 3, 1, 2).float() * 20 - 10
    loss = DiceCELoss()
    assert float(loss(good, target)) < 1e-3
    assert float(loss(-good, target)) > 10


def test_hand_computed_uniform_logits():
    target = torch.tensor([[[1, 0]]])
    logits = torch.zeros(1, 2, 1, 2)  # p = 0.5 everywhere
    # CE = ln 2 ; soft dice (class 1) = (2*0.5 + 1) / (1.0 + 1 + 1) = 2/3
    assert float(DiceCELoss()(logits, target)) == pytest.approx(math.log(2) + 1 / 3)


def test_sample_losses_do_not_depend_on_other_samples():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 8, 8)
    target = torch.randint(0, 2, (3, 8, 8))
    target[1, :4] = IGNORE_INDEX  # a padded sample must not change the others' normalisation
    loss = DiceCELoss()
    together = loss.per_sample(logits, target)
    alone = torch.cat([loss.per_sample(logits[i : i + 1], target[i : i + 1]) for i in range(3)])
    assert torch.allclose(together, alone)
    assert float(loss(logits, target)) == pytest.approx(float(alone.mean()))


def test_ignored_pixels_do_not_contribute():
    logits = torch.randn(1, 2, 2, 2)
    target = torch.tensor([[[1, 0], [IGNORE_INDEX, IGNORE_INDEX]]])
    changed = logits.clone()
    changed[..., 1, :] += 100
    loss = DiceCELoss()
    assert float(loss(logits, target)) == pytest.approx(float(loss(changed, target)))
