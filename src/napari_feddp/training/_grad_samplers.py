"""Faster per-sample gradients for ``nn.Conv2d`` in Opacus' ``"hooks"`` mode.

Opacus' stock Conv2d sampler materialises the unfolded input (im2col, ``k*k``
times the activation) and contracts it per sample with ``einsum``; at
histology resolutions that dominates a DP-SGD step on CPU. The per-sample
weight gradient of a convolution is itself a convolution: stacking the batch
into the channel axis and running the ordinary weight-gradient kernel with
``groups = batch * layer.groups`` gives all ``B`` gradients at about the cost
of the usual batch gradient (``torch.nn.grad.conv2d_weight``, a public wrapper
of the ATen convolution backward).

The override is installed on one ``GradSampleModule`` instance only
(:func:`install_fast_conv_sampler`), never into Opacus' global registry.
Layers it does not cover (string padding, non-zero padding modes) fall back to
Opacus' own sampler, so results are identical either way (up to float
rounding), which the tests check.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def fast_conv2d_grad_sample(
    layer: nn.Conv2d, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d's weight and bias (Opacus grad-sampler signature).

    Parameters
    ----------
    layer : nn.Conv2d
        The layer.
    activations : sequence of Tensor
        ``[input]`` as captured by Opacus' forward hook, ``(B, C, H, W)``.
    backprops : Tensor
        Gradient of the (per-sample-scaled) loss w.r.t. the layer output ``(B, O, H', W')``.

    Returns
    -------
    dict
        ``{weight: (B, *weight.shape), bias: (B, O)}`` for parameters that require grad.
    """
    from opacus.grad_sample.conv import compute_conv_grad_sample

    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if n == 0 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return compute_conv_grad_sample(layer, activations, backprops)
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out_channels, in_per_group, kh, kw = layer.weight.shape
        grad = torch.nn.grad.conv2d_weight(
            x.reshape(1, n * x.shape[1], *x.shape[2:]),
            (n * out_channels, in_per_group, kh, kw),
            backprops.reshape(1, n * out_channels, *backprops.shape[2:]),
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=n * layer.groups,
        )
        out[layer.weight] = grad.view(n, out_channels, in_per_group, kh, kw)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


def install_fast_conv_sampler(grad_sample_module: nn.Module) -> bool:
    """Use :func:`fast_conv2d_grad_sample` for the Conv2d layers of one Opacus ``GradSampleModule``.

    Returns
    -------
    bool
        ``True`` if installed; ``False`` for modules without a grad-sampler
        table (e.g. ``grad_sample_mode="ew"``), which are left unchanged.
    """
    samplers = getattr(type(grad_sample_module), "GRAD_SAMPLERS", None)
    if not isinstance(samplers, dict) or nn.Conv2d not in samplers:
        return False
    # An instance attribute shadows the class-wide registry for this module only.
    grad_sample_module.GRAD_SAMPLERS = {**samplers, nn.Conv2d: fast_conv2d_grad_sample}
    return True
