"""Augmentation multiplicity: each tile's gradient is the mean over K augmented crops, clipped after."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from napari_feddp.federation.settings import NodeSettings, RunSettings, SettingsError
from napari_feddp.training import DiceCELoss, TrainConfig, private_gradient_sum, train_local


class _CountedViews(Dataset):
    """A "train" dataset whose n-th access of tile i returns a view fixed by (i, n): the test can
    recompute exactly the views DP-SGD drew, in any order of access."""

    mode = "train"
    augmentation = "counted"

    def __init__(self, tiles: int, size: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand((tiles, 3, size, size), generator=generator)
        self.masks = (torch.rand((tiles, size, size), generator=generator) > 0.6).long()
        self.calls = [0] * tiles

    def __len__(self) -> int:
        return len(self.images)

    def view(self, index: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = n % 4  # a rotation and a brightness change per view
        image = torch.rot90(self.images[index], k, dims=(1, 2)) * (1 + 0.1 * n)
        return image, torch.rot90(self.masks[index], k, dims=(0, 1))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.calls[index]
        self.calls[index] += 1
        return self.view(index, n)


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _gradient(model: nn.Module, image: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    DiceCELoss()(model(image[None]), mask[None]).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("k", [1, 3])
def test_each_tile_contributes_its_clipped_mean_over_k_views(k):
    """The noisy sum (noise ~0) equals sum over tiles of clip(mean of the K views' gradients, C)."""
    data = _CountedViews(tiles=5)
    model = _model()
    clip = 0.05  # small enough that every tile's gradient is clipped
    config = TrainConfig(batch_size=8, max_physical_batch_size=2, noise_multiplier=1e-9, max_grad_norm=clip,
                         augmentation_multiplicity=k, seed=0)  # fmt: skip
    total, result = private_gradient_sum(model, data, config, noise_share=1e-9)
    assert result.steps == 1 and result.sample_rate == 1.0  # every tile is in the step
    # Each tile drawn K times in the step (tile 0 also once or twice before, for shapes).
    assert data.calls[1:] == [k] * 4 and data.calls[0] >= k
    expected = [torch.zeros_like(p) for p in model.parameters()]
    norms = []
    for tile in range(5):
        views = [_gradient(model, *data.view(tile, n)) for n in range(data.calls[tile] - k, data.calls[tile])]
        mean = [torch.stack(parts).mean(0) for parts in zip(*views, strict=True)]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in mean))
        norms.append(norm)
        for e, g in zip(expected, mean, strict=True):
            e += g * min(1.0, clip / norm)
    assert min(norms) > clip
    for (name, got), want in zip(total.items(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def test_the_privacy_accounting_does_not_change_with_k():
    """The tile is still the privacy unit: K = 1 and K = 4 take the same steps at the same rate and noise."""
    spent = {}
    for k in (1, 4):
        config = TrainConfig(steps=3, batch_size=4, max_physical_batch_size=4, noise_multiplier=1.2,
                             augmentation_multiplicity=k, seed=0)  # fmt: skip
        data = _CountedViews(tiles=12)
        result = train_local(_model(), data, config)
        assert result.steps == 3 and result.sample_rate == pytest.approx(1 / 3)
        assert all(n % k == 0 for n in data.calls[1:]) and max(data.calls) >= k  # tiles drawn K at a time
        spent[k] = (result.accountant_state["history"], result.epsilon)
    assert spent[4] == spent[1] and spent[1][1] > 0


def test_k_needs_dp_sgd_and_a_dataset_that_augments():
    with pytest.raises(ValueError, match="dp_mode='none'"):
        TrainConfig(dp_mode="none", augmentation_multiplicity=2)
    with pytest.raises(ValueError):
        TrainConfig(augmentation_multiplicity=0)
    fixed = _CountedViews(tiles=4)
    fixed.mode = "center"  # the same crop every time: K copies would add nothing
    with pytest.raises(ValueError, match="augmented crop"):
        train_local(_model(), fixed, TrainConfig(steps=1, batch_size=2, augmentation_multiplicity=2))
    with pytest.raises(SettingsError, match="augmentation-multiplicity 2 needs dp-mode 'sample'"):
        RunSettings(dp_mode="none", augmentation_multiplicity=2)


def test_a_run_passes_k_to_the_labs_dp_training_only():
    settings = RunSettings(augmentation_multiplicity=4)
    assert settings.to_run_config()["augmentation-multiplicity"] == 4
    assert RunSettings.from_run_config(settings.to_run_config()).train_config(
        NodeSettings()).augmentation_multiplicity == 4
