"""The fast Conv2d per-sample-gradient sampler equals Opacus' and plain autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from napari_feddp.training._grad_samplers import fast_conv2d_grad_sample, install_fast_conv_sampler

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        nn.Conv2d(6, 6, 3, padding="same"),  # string padding: falls back to Opacus' sampler
        nn.Conv2d(6, 2, 1),
    )


def _per_sample(model: nn.Module, x: torch.Tensor, *, fast: bool) -> dict[str, torch.Tensor]:
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    if fast:
        assert install_fast_conv_sampler(gsm)
    gsm(x).square().sum().backward()
    return {name: p.grad_sample.clone() for name, p in gsm._module.named_parameters()}


def test_matches_opacus_and_autograd():
    model = _net()
    x = torch.randn(3, 3, 10, 12)
    fast, stock = _per_sample(model, x, fast=True), _per_sample(model, x, fast=False)
    for i in range(len(x)):
        reference = copy.deepcopy(model)
        reference(x[i : i + 1]).square().sum().backward()
        for name, p in reference.named_parameters():
            assert torch.allclose(fast[name][i], p.grad, rtol=1e-4, atol=1e-5), name
            assert torch.allclose(stock[name][i], p.grad, rtol=1e-4, atol=1e-5), name


def test_install_is_local_to_one_module():
    gsm = GradSampleModule(_net())
    assert install_fast_conv_sampler(gsm)
    assert gsm.GRAD_SAMPLERS[nn.Conv2d] is fast_conv2d_grad_sample
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] is not fast_conv2d_grad_sample
    assert GradSampleModule(_net()).GRAD_SAMPLERS[nn.Conv2d] is not fast_conv2d_grad_sample


def test_empty_batch():
    layer = nn.Conv2d(2, 3, 3, padding=1)
    out = fast_conv2d_grad_sample(layer, [torch.zeros(0, 2, 5, 5)], torch.zeros(0, 3, 5, 5))
    assert out[layer.weight].shape[1:] == layer.weight.shape


@pytest.mark.parametrize("fast", [True, False])
def test_train_local_uses_it(fast, tiny_dir, monkeypatch):
    import napari_feddp.training._grad_samplers as samplers
    from napari_feddp.training import SegmentationDataset, TrainConfig, train_local

    from .conftest import tiny_model

    calls = []
    original = samplers.fast_conv2d_grad_sample
    monkeypatch.setattr(samplers, "fast_conv2d_grad_sample", lambda *a: calls.append(1) or original(*a))
    data = SegmentationDataset(tiny_dir, crop_size=16, seed=0)
    train_local(tiny_model(), data, TrainConfig(steps=1, batch_size=3, fast_conv_grads=fast, seed=1))
    assert bool(calls) == fast
