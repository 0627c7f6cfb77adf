"""Fixtures for the training tests: tiny synthetic datasets, a tiny model, shared data.

Data under ``<repo>/../shared/data`` is located by :func:`shared_data`, which
*fails* instead of skipping when ``FEDDP_REQUIRE_DATA=1`` (CI).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

# One lookup for all tests: skips without the data, fails when FEDDP_REQUIRE_DATA=1.
from ..conftest import require_data as shared_data  # noqa: F401


@pytest.fixture(autouse=True)
def _torch_on_one_thread(one_torch_thread):
    """Every test in this folder."""


def synthetic_tile(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pink 'tissue' with dark purple disks ('nuclei'): (RGB uint8, 0/1 mask)."""
    yy, xx = np.mgrid[:height, :width]
    mask = np.zeros((height, width), dtype=np.uint8)
    for _ in range(max(2, height * width // 300)):
        cy, cx, r = rng.integers(height), rng.integers(width), rng.integers(3, 7)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = (235, 170, 205)
    image[mask == 1] = (70, 40, 120)
    noise = rng.integers(-12, 13, size=image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8), mask


def write_dataset(root: Path, n: int = 3, size: tuple[int, int] = (40, 48), *, seed: int = 0,
                  image_suffix: str = ".png", mask_scale: int = 1) -> Path:
    """Write ``n`` synthetic image/mask pairs into ``root/images`` and ``root/masks``."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, mask = synthetic_tile(rng, *size)
        name = f"tile{i:02d}"
        if image_suffix == ".png":
            Image.fromarray(image).save(root / "images" / f"{name}.png")
        else:
            import tifffile

            tifffile.imwrite(root / "images" / f"{name}{image_suffix}", image, photometric="rgb")
        Image.fromarray(mask * mask_scale).save(root / "masks" / f"{name}.png")
    return root


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """Three 40x48 synthetic tiles with 0/1 PNG masks."""
    return write_dataset(tmp_path / "lab")


def tiny_model() -> nn.Module:
    """The project's UNet at its smallest useful size (GroupNorm, Opacus-compatible)."""
    from napari_feddp.models import UNet

    torch.manual_seed(0)
    return UNet(in_channels=3, n_classes=2, depth=2, base_width=4, groups=2)
