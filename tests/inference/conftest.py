"""Fixtures for the inference tests (helpers live in ``inference_helpers``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from inference_helpers import CMU_SMALL, shared_data


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    """The test machine has two shared cores: keep torch from oversubscribing them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def cmu_path() -> Path:
    return shared_data(CMU_SMALL)


@pytest.fixture()
def cmu_slide(cmu_path):
    from napari_feddp.slides import open_slide

    slide = open_slide(cmu_path)
    yield slide
    slide.close()


@pytest.fixture(scope="session")
def cmu_crop(cmu_path) -> np.ndarray:
    """A 600 x 800 level-0 crop of real H&E, mostly tissue with some glass."""
    from napari_feddp.slides import open_slide

    slide = open_slide(cmu_path)
    try:
        return np.asarray(slide.levels[0][1000:1600, 500:1300])
    finally:
        slide.close()
