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


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test, restored after: the test machines share a couple of cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


def save_received_model(store: Path, run: str = "run7", *, epsilon: float = 3.0, test_dice: float = 0.5) -> Path:
    """Write a federated model as the lab's ClientApp does: ``<store>/federation-<run>``.

    A small real U-Net with a card that records a DP budget and a test score,
    so that what the widgets and the CLI print can be checked against it.
    """
    import dataclasses

    import torch

    from napari_feddp.models import build_model, default_card, save_checkpoint
    from napari_feddp.models.card import Privacy, Provenance

    torch.manual_seed(1)
    card = default_card(name="tiny-federated", tile_size=256, depth=3, base_width=8, groups=4)
    card = dataclasses.replace(
        card,
        provenance=Provenance(training_data="federated", federated_rounds=3, round=3,
                              privacy=Privacy(epsilon=epsilon, delta=1e-5, dp_mode="sample")),
        metrics={"test_dice": test_dice},
    )
    return save_checkpoint(store / f"federation-{run}", build_model(card), card)


@pytest.fixture
def received_model(isolated_feddp_home) -> Path:
    """A promoted federated model in this test's lab model store (the default model)."""
    return save_received_model(isolated_feddp_home / "models")


def docked_segment_widget(viewer, checkpoint):
    """A Segment dock widget in ``viewer``, set to run ``checkpoint`` (the "checkpoint file…" choice)."""
    from napari_feddp.widgets.segment import MODEL_FILE, SegmentWidget

    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    widget.model_source.value = MODEL_FILE
    widget.checkpoint.value = str(checkpoint)
    return widget
