"""Shared fixtures. Data under ../shared/data is required in CI (FEDDP_REQUIRE_DATA=1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDDP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def require_data(relative: str) -> Path:
    """Path of a file under ../shared/data; skip if absent, fail if CI requires it."""
    path = SHARED_DATA / relative
    if not path.exists():
        message = f"test data not found: {path}"
        if os.environ.get("FEDDP_REQUIRE_DATA") == "1":
            pytest.fail(message + " (FEDDP_REQUIRE_DATA=1)")
        pytest.skip(message)
    return path


@pytest.fixture
def shared_data() -> Path:
    return require_data("")


@pytest.fixture
def cmu1_path() -> Path:
    return require_data("slides/CMU-1-Small-Region.svs")


@pytest.fixture(autouse=True)
def isolated_feddp_home(tmp_path_factory, monkeypatch):
    """Every test gets an empty lab data folder (model store, ledgers)."""
    home = tmp_path_factory.mktemp("feddp-home")
    monkeypatch.setenv("FEDDP_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small untrained GroupNorm U-Net checkpoint (real safetensors + card)."""
    import torch

    from napari_feddp.models import build_model, default_card, save_checkpoint

    torch.manual_seed(0)
    card = default_card(name="tiny-unet", tile_size=256, depth=3, base_width=8, groups=4)
    model = build_model(card)
    # Bias the output towards "nucleus" in dark (haematoxylin-rich) pixels so the
    # untrained net still finds objects in tissue and none in white background.
    with torch.no_grad():
        final = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        final.bias.copy_(torch.tensor([0.0, 0.0]))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-unet", model, card)
