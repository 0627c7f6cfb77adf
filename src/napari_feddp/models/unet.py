"""A small, configurable U-Net that Opacus can train with per-sample gradients.

Design constraints come from differential privacy, not from accuracy:

* **GroupNorm, never BatchNorm.** BatchNorm mixes statistics across the samples
  of a batch, so one sample's gradient depends on the others and per-sample
  clipping no longer bounds its influence; Opacus refuses such models.
* **Only layers with an Opacus grad sampler.** In ``grad_sample_mode="hooks"``
  Opacus can compute per-sample gradients for ``Conv2d`` and ``GroupNorm`` but
  not for ``ConvTranspose2d``. The "transposed" upsampling is therefore built as
  a 1x1 ``Conv2d`` followed by ``PixelShuffle(2)``, which computes exactly the
  same family of functions as a ``ConvTranspose2d(kernel_size=2, stride=2)``.
* **No in-place activations.** Opacus hooks keep references to layer inputs;
  an in-place op could change them before the backward pass reads them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ACTIVATIONS = ("relu", "silu")
UPSAMPLINGS = ("bilinear", "transposed")


def _activation(name: str) -> nn.Module:
    return nn.ReLU(inplace=False) if name == "relu" else nn.SiLU(inplace=False)


class ConvBlock(nn.Sequential):
    """Two (3x3 conv -> GroupNorm -> activation) layers, optional spatial dropout.

    The convolutions have no bias because GroupNorm's shift makes it redundant.
    """

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, activation: str, dropout: float) -> None:
        layers: list[nn.Module] = []
        for block_in in (in_channels, out_channels):
            layers += [
                nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1, bias=False),
                nn.GroupNorm(groups, out_channels),
                _activation(activation),
            ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class Upsample2x(nn.Module):
    """Double the spatial size and map ``in_channels`` to ``out_channels``.

    ``mode="bilinear"``: parameter-free interpolation, then a 1x1 conv.
    ``mode="transposed"``: learned upsampling equivalent to
    ``ConvTranspose2d(in, out, kernel_size=2, stride=2)``, written as
    1x1 conv + ``PixelShuffle`` so Opacus can compute per-sample gradients.
    """

    def __init__(self, in_channels: int, out_channels: int, mode: str) -> None:
        super().__init__()
        if mode == "bilinear":
            self.resize = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            self.project = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.resize = None
            self.project = nn.Conv2d(in_channels, out_channels * 4, kernel_size=1)
            self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize is not None:
            return self.project(self.resize(x))
        return self.shuffle(self.project(x))


class UNet(nn.Module):
    """U-Net for semantic segmentation, safe for Opacus differential privacy.

    Parameters
    ----------
    in_channels : int
        Channels of the input image (3 for RGB H&E).
    n_classes : int
        Number of output classes, background included.
    depth : int
        Number of resolution levels. ``depth - 1`` 2x2 max-poolings are applied,
        so input height and width must be multiples of ``2 ** (depth - 1)``
        (8 for the default depth of 4).
    base_width : int
        Channels at the first level; level ``i`` has ``base_width * 2**i``.
        Must be divisible by ``groups``.
    groups : int
        Number of GroupNorm groups in every normalisation layer.
    dropout : float
        Spatial dropout probability after each conv block, in ``[0, 1)``.
    activation : {"relu", "silu"}
        Non-linearity after every normalisation layer.
    upsampling : {"bilinear", "transposed"}
        How the decoder doubles resolution (see :class:`Upsample2x`).

    Notes
    -----
    ``forward`` returns raw logits of shape ``(B, n_classes, H, W)``; apply
    ``softmax`` over dim 1 for probabilities. With the defaults the model has
    about 0.45 M parameters (1.8 MB of float32 weights).
    """

    def __init__(
        self,
        in_channels: int = 3,
        n_classes: int = 2,
        depth: int = 4,
        base_width: int = 16,
        groups: int = 8,
        dropout: float = 0.0,
        activation: str = "relu",
        upsampling: str = "bilinear",
    ) -> None:
        super().__init__()
        config = {"in_channels": in_channels, "n_classes": n_classes, "depth": depth, "base_width": base_width,
                  "groups": groups, "dropout": dropout, "activation": activation, "upsampling": upsampling}
        _check_config(config)
        self._config: dict[str, Any] = {**config, "dropout": float(dropout)}
        widths = [base_width * 2**level for level in range(depth)]
        block = {"groups": groups, "activation": activation, "dropout": dropout}

        self.encoder = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.encoder.append(ConvBlock(previous, width, **block))
            previous = width
        self.pool = nn.MaxPool2d(kernel_size=2)

        self.upsamplers = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for deeper, width in zip(reversed(widths[1:]), reversed(widths[:-1])):
            self.upsamplers.append(Upsample2x(deeper, width, upsampling))
            # Input is the upsampled path concatenated with the skip connection.
            self.decoder.append(ConvBlock(2 * width, width, **block))

        self.head = nn.Conv2d(widths[0], n_classes, kernel_size=1)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable: ``UNet(**model.config)`` rebuilds it."""
        return dict(self._config)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (``2 ** (depth - 1)``)."""
        return 2 ** (self._config["depth"] - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, in_channels, H, W)`` to logits ``(B, n_classes, H, W)``."""
        self._check_input(x)
        skips: list[torch.Tensor] = []
        for level, encode in enumerate(self.encoder):
            if level > 0:
                x = self.pool(x)
            x = encode(x)
            skips.append(x)
        skips.pop()  # the deepest level feeds the decoder directly, not as a skip
        for upsample, decode in zip(self.upsamplers, self.decoder):
            x = decode(torch.cat([upsample(x), skips.pop()], dim=1))
        return self.head(x)

    def _check_input(self, x: torch.Tensor) -> None:
        expected_channels = self._config["in_channels"]
        if x.ndim != 4 or x.shape[1] != expected_channels:
            raise ValueError(
                f"UNet expects input of shape (B, {expected_channels}, H, W), "
                f"received {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(
                f"UNet with depth={self._config['depth']} needs height and width that are "
                f"multiples of {multiple}, received {height}x{width}; pad or crop the tile "
                f"(e.g. to {-(-height // multiple) * multiple}x{-(-width // multiple) * multiple})"
            )


def _check_config(config: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad constructor argument."""
    for name in ("in_channels", "n_classes", "depth", "base_width", "groups"):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"UNet {name}: expected a positive integer, received {value!r}")
    if config["base_width"] % config["groups"]:
        raise ValueError(
            f"UNet base_width: expected a multiple of groups={config['groups']} (GroupNorm splits "
            f"channels evenly into groups), received {config['base_width']}"
        )
    dropout = config["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"UNet dropout: expected a number in [0, 1), received {dropout!r}")
    if config["activation"] not in ACTIVATIONS:
        raise ValueError(f"UNet activation: expected one of {ACTIVATIONS}, received {config['activation']!r}")
    if config["upsampling"] not in UPSAMPLINGS:
        raise ValueError(f"UNet upsampling: expected one of {UPSAMPLINGS}, received {config['upsampling']!r}")
