"""Local training: DP-SGD through Opacus on tiny crops, ledger integration, evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import TensorDataset

from napari_feddp.training import (
    BudgetExceededError,
    DiceCELoss,
    PrivacyLedger,
    SegmentationDataset,
    TrainConfig,
    dataset_fingerprint,
    evaluate,
    plan_round,
    privacy_report,
    train_local,
)

from .conftest import tiny_model


class CountingLoss(DiceCELoss):
    """Records the physical batch sizes the loss sees."""

    def __init__(self):
        super().__init__()
        self.batch_sizes: list[int] = []

    def forward(self, logits, target):
        self.batch_sizes.append(len(target))
        return super().forward(logits, target)


def _changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


def _has_opacus_traces(model: nn.Module) -> bool:
    hooks = any(m._forward_hooks or m._backward_hooks for m in model.modules())
    attrs = any(hasattr(p, "grad_sample") or hasattr(p, "_forward_counter") for p in model.parameters())
    return hooks or attrs


@pytest.fixture
def crops(tiny_dir):
    return SegmentationDataset(tiny_dir, crop_size=16, seed=0)


def test_dp_round_changes_weights_and_reports_real_epsilon(crops):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(steps=3, batch_size=2, max_physical_batch_size=1, noise_multiplier=1.0, lr=1e-2)
    result = train_local(model, crops, config)

    assert _changed(before, result.state_dict)
    assert result.state_dict.keys() == before.keys()  # no "_module." prefix
    assert result.n_examples == 3 and result.steps == 3
    assert result.sample_rate == pytest.approx(1 / math.ceil(3 / 2))
    reference = RDPAccountant()
    for _ in range(3):
        reference.step(noise_multiplier=1.0, sample_rate=result.sample_rate)
    assert math.isfinite(result.epsilon) and result.epsilon == pytest.approx(reference.get_epsilon(1e-5))
    assert result.accountant_state == {"mechanism": "rdp", "history": [(1.0, 0.5, 3)]}
    assert math.isfinite(result.loss) and 0 <= result.dice <= 1
    assert not _has_opacus_traces(model)


def test_physical_batches_are_bounded_and_empty_batches_still_count(tiny_dir, monkeypatch):
    import napari_feddp.training.local as local

    logical_sizes: list[int] = []
    original = local._private_step

    def spy(model, optimizer, loss_fn, images, masks, stats):
        logical_sizes.append(len(images))
        original(model, optimizer, loss_fn, images, masks, stats)

    monkeypatch.setattr(local, "_private_step", spy)
    data = SegmentationDataset(tiny_dir, crop_size=16, seed=0)
    loss = CountingLoss()
    config = TrainConfig(steps=8, batch_size=2, max_physical_batch_size=1, noise_multiplier=1.0, seed=5)
    result = train_local(tiny_model(), data, config, loss_fn=loss)
    assert result.steps == 8 and result.accountant_state["history"] == [(1.0, 0.5, 8)]
    assert max(loss.batch_sizes) == 1  # logical batches of up to 3 tiles split into physical batches of 1
    # Poisson sampling at q=0.5 over 3 tiles: with this seed some logical batches are empty,
    # and they still count as (noise-only) steps.
    assert 0 in logical_sizes
    assert len(loss.batch_sizes) == sum(logical_sizes)


def test_second_dp_round_on_same_model(crops):
    model = tiny_model()
    config = TrainConfig(steps=2, batch_size=2, noise_multiplier=1.0)
    train_local(model, crops, config)
    again = train_local(model, crops, config)
    assert again.steps == 2 and not _has_opacus_traces(model)


def test_seeded_rounds_are_reproducible(tiny_dir):
    config = TrainConfig(steps=2, batch_size=2, noise_multiplier=1.0, seed=7)
    first = train_local(tiny_model(), SegmentationDataset(tiny_dir, crop_size=16), config)
    second = train_local(tiny_model(), SegmentationDataset(tiny_dir, crop_size=16), config)
    assert not _changed(first.state_dict, second.state_dict)


def test_target_epsilon_derives_noise():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 8, 8)
    data = TensorDataset(images, (images[:, 0] > 0.5).long())
    config = TrainConfig(steps=8, batch_size=2, target_epsilon=8.0)
    assert config.noise_multiplier is None and TrainConfig().noise_multiplier == 1.0
    plan = plan_round(len(data), config)
    result = train_local(tiny_model(), data, config)
    assert result.noise_multiplier == pytest.approx(plan.noise_multiplier)
    assert 7.8 < result.epsilon <= 8.0


def test_ledger_accumulates_and_budget_declines_before_training(tiny_dir, tmp_path):
    data = SegmentationDataset(tiny_dir, crop_size=16, seed=0)

    def ledger():
        return PrivacyLedger(tmp_path / "ledgers", "lab-a", dataset_fingerprint(tiny_dir), dataset_dir=tiny_dir)

    config = TrainConfig(steps=2, batch_size=2, noise_multiplier=1.5, epsilon_max=100.0)
    model = tiny_model()
    first = train_local(model, data, config, ledger=ledger(), round_id=1)
    second = train_local(model, data, config, ledger=ledger(), round_id=2)
    assert second.epsilon > first.epsilon == pytest.approx(first.epsilon_round)
    assert second.epsilon_round == pytest.approx(first.epsilon_round)

    tight = TrainConfig(steps=2, batch_size=2, noise_multiplier=1.5, epsilon_max=second.epsilon + 0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetExceededError, match="declines to train"):
        train_local(model, data, tight, ledger=ledger(), round_id=3)
    assert not _changed(before, model.state_dict())
    assert ledger().n_rounds == 2


def test_interrupted_round_still_records_spent_steps(tiny_dir, tmp_path):
    data = SegmentationDataset(tiny_dir, crop_size=16, seed=0)
    ledger = PrivacyLedger(tmp_path / "ledgers", "lab-a", dataset_fingerprint(tiny_dir), dataset_dir=tiny_dir)

    class FailingLoss(DiceCELoss):
        calls = 0

        def forward(self, logits, target):
            FailingLoss.calls += 1
            if FailingLoss.calls > 3:
                raise KeyboardInterrupt
            return super().forward(logits, target)

    config = TrainConfig(steps=50, batch_size=1, max_physical_batch_size=1, noise_multiplier=1.0)
    with pytest.raises(KeyboardInterrupt):
        train_local(tiny_model(), data, config, ledger=ledger, loss_fn=FailingLoss())
    (record,) = privacy_report(tmp_path / "ledgers", tiny_dir).rounds
    assert record.meta["interrupted"] and 3 <= record.steps < 50


def test_non_private_round(crops):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_local(model, crops, TrainConfig(steps=2, batch_size=3, max_physical_batch_size=2, dp_mode="none"))
    assert _changed(before, result.state_dict)
    assert result.epsilon is None and result.steps == 2


def test_batchnorm_model_is_refused(crops):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match="cannot be trained with DP-SGD.*GroupNorm"):
        train_local(model, crops, TrainConfig(steps=1, batch_size=2))


def test_any_module_works():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 8, 8)
    data = TensorDataset(images, (images[:, 0] > 0.5).long())
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    result = train_local(model, data, TrainConfig(steps=2, batch_size=2, grad_sample_mode="ew"))
    assert result.steps == 2 and math.isfinite(result.epsilon)


def test_config_validation(crops):
    with pytest.raises(ValueError, match="at most one of noise_multiplier and target_epsilon"):
        TrainConfig(noise_multiplier=1.0, target_epsilon=3.0)
    with pytest.raises(ValueError, match="at most one of epochs and steps"):
        TrainConfig(epochs=2, steps=3)
    with pytest.raises(ValueError, match="grad_sample_mode"):
        TrainConfig(grad_sample_mode="ghost")
    with pytest.raises(ValueError, match="crop_size=32 but the dataset makes 16-pixel crops"):
        train_local(tiny_model(), crops, TrainConfig(steps=1, crop_size=32))
    sliding = SegmentationDataset(crops.dataset_dir, crop_size=16, mode="sliding")
    with pytest.raises(ValueError, match="each window, not each tile, the privacy unit"):
        train_local(tiny_model(), sliding, TrainConfig(steps=1))
    with pytest.warns(UserWarning, match="delta=0.5 is not below 1/n"):
        train_local(tiny_model(), crops, TrainConfig(steps=1, delta=0.5))
    with pytest.raises(ValueError, match="dp_mode='none'"):
        train_local(tiny_model(), crops, TrainConfig(steps=1, dp_mode="none"),
                    ledger=PrivacyLedger(crops.dataset_dir.parent / "l", "lab", "f"))


def test_evaluate_on_sliding_windows(tiny_dir):
    data = SegmentationDataset(tiny_dir, crop_size=32, mode="sliding")
    scores = evaluate(tiny_model(), data, batch_size=4)
    assert scores["n_pixels"] == 3 * 40 * 48 and scores["n_items"] == 12
    assert 0 <= scores["dice"] <= 1 and 0 <= scores["pixel_accuracy"] <= 1 and math.isfinite(scores["loss"])


def test_contour_model_trains_on_contour_targets_under_dp(tiny_dir):
    """A three-class model with two-class targets would never learn the contour class: refused."""
    from napari_feddp.models import UNet

    model = UNet(n_classes=3, depth=2, base_width=8, groups=4)
    two_class = SegmentationDataset(tiny_dir, crop_size=16, seed=0)
    with pytest.raises(ValueError, match="predicts 3 classes but the dataset's targets have 2"):
        train_local(model, two_class, TrainConfig(steps=1, batch_size=2, dp_mode="none"))
    contours = SegmentationDataset(tiny_dir, crop_size=16, seed=0, n_classes=3)
    assert 2 in torch.unique(torch.stack([contours[i][1] for i in range(len(contours))]))
    result = train_local(model, contours, TrainConfig(steps=2, batch_size=2, noise_multiplier=1.0, seed=0))
    assert result.epsilon > 0 and math.isfinite(result.loss)
