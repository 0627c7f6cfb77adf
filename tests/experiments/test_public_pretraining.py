"""Public pretraining on the annotated TNBC set: its patches, and the initial model trained on them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import require_data


def test_tnbc_tiles_become_patches_at_the_model_pixel_size(tmp_path):
    from experiments.pretraining import prepare_tnbc_patches
    from napari_feddp.training import SegmentationDataset
    from napari_feddp.training._io import read_image, read_mask

    source = require_data("tnbc")
    out = prepare_tnbc_patches(tmp_path / "tnbc", source=source, mpp=0.5)
    images = sorted((out / "images").iterdir())
    masks = sorted((out / "masks").iterdir())
    assert len(images) == len(masks) == len(list((source / "images").iterdir())) == 50
    assert [p.name for p in images] == [p.name for p in masks]
    # 512 px at 0.25 µm/px: 256 px at 0.5 µm/px, the mask resampled with the image.
    first = read_image(images[0])
    assert first.shape == (256, 256, 3) and first.dtype == np.uint8
    mask = read_mask(masks[0], n_classes=2)
    full = read_mask(source / "masks" / masks[0].name, n_classes=2)
    assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 1}
    assert abs(mask.mean() - full.mean()) < 0.02  # the nuclei cover the same fraction
    stamp = json.loads((out / "prepared.json").read_text())
    assert stamp["patches"] == 50 and 0.05 < stamp["foreground"] < 0.5
    assert len(SegmentationDataset(out, crop_size=128, source_mpp=0.5, target_mpp=0.5)) == 50
    # Prepared once: a second call reuses the files; another pixel size writes them again.
    mtime = images[0].stat().st_mtime_ns
    assert prepare_tnbc_patches(tmp_path / "tnbc", source=source, mpp=0.5) == out
    assert images[0].stat().st_mtime_ns == mtime
    prepare_tnbc_patches(tmp_path / "tnbc", source=source, mpp=1.0)
    assert read_image(images[0]).shape == (128, 128, 3)


def test_pretraining_on_tnbc_refuses_contour_models_and_unknown_data(tmp_path):
    from dataclasses import replace

    from experiments.pretraining import pretrain_public
    from experiments.runner import quick_budget

    contours = replace(quick_budget(), pretrain_steps=2, pretrain_data="tnbc")
    with pytest.raises(ValueError, match="foreground-only"):
        pretrain_public(tmp_path, contours)
    with pytest.raises(ValueError, match="unknown public data"):
        pretrain_public(tmp_path, replace(quick_budget(), pretrain_steps=2, pretrain_data="imagenet"))
    assert not list(tmp_path.iterdir())


def test_cli_needs_steps_and_a_foreground_model_for_tnbc(tmp_path, capsys):
    from experiments.cli import main

    base = ["run", "--quick", "--out", str(tmp_path / "g"), "--settings", "centralized"]
    assert main(base + ["--pretrain-data", "tnbc"]) == 2
    assert "--pretrain-steps" in capsys.readouterr().err
    assert main(base + ["--pretrain-steps", "2", "--pretrain-data", "tnbc"]) == 2
    assert "--foreground-only" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


@pytest.mark.slow
def test_tnbc_pretrained_model_starts_every_setting(tmp_path):
    from dataclasses import replace

    from experiments.pretraining import pretrain_public
    from experiments.runner import quick_budget
    from napari_feddp.models import load_checkpoint

    require_data("tnbc")
    budget = replace(quick_budget(), contours=False, pretrain_steps=3, pretrain_data="tnbc")
    checkpoint = pretrain_public(tmp_path, budget)
    stamp = json.loads((tmp_path / "pretrained.json").read_text())
    assert stamp["params"]["data"] == "tnbc" and stamp["params"]["pretrain_steps"] == 3
    assert (tmp_path / "tnbc-patches" / "prepared.json").is_file()
    assert not (tmp_path / "public-patches").exists()
    model, _ = load_checkpoint(checkpoint)
    assert model.state_dict()  # a model the grid loads as its initial weights
    # The same budget reuses it; pretraining on the sample slide instead trains another.
    mtime = checkpoint.stat().st_mtime_ns
    assert pretrain_public(tmp_path, budget).stat().st_mtime_ns == mtime
    other = pretrain_public(tmp_path, replace(budget, pretrain_data=None))
    assert json.loads((tmp_path / "pretrained.json").read_text())["params"]["data"] == "cmu1"
    assert other.stat().st_mtime_ns != mtime
