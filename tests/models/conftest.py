"""Shared fixtures for the models tests: tiny networks so every test runs in milliseconds."""

import pytest
import torch

from napari_feddp.models import build_model, default_card


@pytest.fixture(autouse=True)
def _torch_on_one_thread(one_torch_thread):
    """Every test in this folder."""


@pytest.fixture
def tiny_card():
    """A valid 2-class card for a 2-level, 8-channel U-Net on 32-pixel tiles."""
    return default_card("tiny-test-unet", tile_size=32, depth=2, base_width=8, groups=4)


@pytest.fixture
def tiny_model(tiny_card):
    """Network matching ``tiny_card``, deterministically initialised."""
    torch.manual_seed(0)
    return build_model(tiny_card)
