"""Helpers for the inference tests: shared data lookup, tiny deterministic models, images.

Tests that need ``shared/data`` (beside the repository) use :func:`shared_data`:
it skips when the data is absent, but fails when ``FEDDP_REQUIRE_DATA=1`` (CI),
so a missing data set can never make the suite pass by skipping.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests.conftest import require_data as shared_data  # noqa: F401 - one data lookup for all tests

CMU_SMALL = "slides/CMU-1-Small-Region.svs"


class StainNet(nn.Sequential):
    """Fixed 2-layer net: class 1 where the 3x3 mean of (R + B) / 2 - G exceeds 0.05.

    Pink and purple (H&E) pixels have little green; glass is grey. Deterministic,
    and its 3x3 receptive field makes tile borders matter (1 pixel of context).
    """

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 2, 1))
        with torch.no_grad():
            weight = torch.zeros(1, 3, 3, 3)
            weight[0, 0], weight[0, 1], weight[0, 2] = 0.5 / 9, -1.0 / 9, 0.5 / 9
            self[0].weight.copy_(weight)
            self[0].bias.zero_()
            self[2].weight.copy_(torch.tensor([-20.0, 20.0]).view(2, 1, 1, 1))
            self[2].bias.copy_(torch.tensor([0.5, -0.5]))
        self.eval()


class PixelNet(nn.Module):
    """1x1 convolution (no spatial context): tiled and direct predictions must match exactly.

    Three colour classes on H&E: 0 glass (bright green channel), 1 eosin (pink:
    bright red), 2 haematoxylin (purple: darker red).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[0.0, 10, 0], [10, 0, 0], [-10, 0, 0]]).view(3, 3, 1, 1))
            self.conv.bias.copy_(torch.tensor([-7.8, -7.0, 8.0]))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class RecordingNet(nn.Module):
    """Wraps a model and keeps every input batch it receives (normalised tensors)."""

    def __init__(self, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.inner = inner if inner is not None else StainNet()
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.detach().cpu().clone())
        return self.inner(x)

    @property
    def tiles(self) -> torch.Tensor:
        return torch.cat(self.batches) if self.batches else torch.empty(0, 3, 0, 0)


def direct_prediction(model: nn.Module, image: np.ndarray) -> np.ndarray:
    """Class probabilities ``(C, H, W)`` of the whole image in one forward pass."""
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
        return torch.softmax(model(x), 1)[0].numpy()


def white_image(height: int, width: int, noise: int = 0, seed: int = 0) -> np.ndarray:
    """Glass: near-white RGB, optionally with grey noise."""
    image = np.full((height, width, 3), 242, np.uint8)
    if noise:
        rng = np.random.default_rng(seed)
        image = np.clip(image.astype(int) + rng.integers(-noise, noise + 1, image.shape), 0, 255).astype(np.uint8)
    return image


def paste_tissue(image: np.ndarray, tissue: np.ndarray, y: int, x: int) -> np.ndarray:
    """Copy real tissue pixels into a synthetic slide."""
    image[y : y + tissue.shape[0], x : x + tissue.shape[1]] = tissue
    return image
