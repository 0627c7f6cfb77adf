"""Colour-deconvolution pseudo-labels and the public pretraining patches they label."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.color import hed2rgb
from skimage.draw import disk

from napari_feddp.training.pseudo_labels import nuclei_pseudo_mask, stained


def _synthetic_he(nuclei: list[tuple[int, int, int]], shape=(160, 160), seed=0):
    """An H&E-like image mixed from stain concentrations: eosin everywhere, haematoxylin in the disks."""
    rng = np.random.default_rng(seed)
    h = np.zeros(shape)
    truth = np.zeros(shape, bool)
    for y, x, r in nuclei:
        rr, cc = disk((y, x), r, shape=shape)
        h[rr, cc] = 0.15
        truth[rr, cc] = True
    e = np.full(shape, 0.05) + rng.normal(0, 0.005, shape)
    hed = np.stack([0.02 + h + rng.normal(0, 0.005, shape), e, np.zeros(shape)], axis=-1)
    rgb = (np.clip(hed2rgb(hed), 0, 1) * 255).astype(np.uint8)
    return rgb, truth


def test_recovers_haematoxylin_disks():
    centres = [(20 + 30 * i, 20 + 30 * j, 7) for i in range(5) for j in range(5) if (i + j) % 2 == 0]
    rgb, truth = _synthetic_he(centres)
    mask = nuclei_pseudo_mask(rgb, mpp=0.5)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.9, dice
    assert stained(rgb).all()  # eosin background is tissue, not glass


def test_drops_specks_smaller_than_a_nucleus():
    rgb, truth = _synthetic_he([(40, 40, 8), (120, 120, 1)])  # one nucleus and a 5-pixel speck
    mask = nuclei_pseudo_mask(rgb, mpp=0.5)
    assert mask[40, 40] and not mask[120, 120]
    # Sizes are physical: at 0.1 µm/px the 8-pixel-radius disk is a 2 µm² speck, dropped too.
    assert not nuclei_pseudo_mask(rgb, mpp=0.1).any()


def test_nothing_outside_tissue_and_nothing_on_glass():
    rgb, truth = _synthetic_he([(40, 40, 8), (120, 120, 8)])
    tissue = np.zeros(truth.shape, bool)
    tissue[:80] = True
    mask = nuclei_pseudo_mask(rgb, tissue, mpp=0.5)
    assert mask[40, 40] and not mask[80:].any()
    glass = np.full((64, 64, 3), 245, np.uint8)
    assert not stained(glass).any() and not nuclei_pseudo_mask(glass).any()


def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"\(h, w, 3\) uint8"):
        nuclei_pseudo_mask(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="tissue mask shape"):
        nuclei_pseudo_mask(np.zeros((10, 10, 3), np.uint8), np.ones((5, 5), bool))
    with pytest.raises(ValueError, match="mpp"):
        nuclei_pseudo_mask(np.zeros((10, 10, 3), np.uint8), mpp=0)


def test_public_patches_from_the_bundled_sample_slide(tmp_path):
    from experiments.pretraining import PATCH, prepare_public_patches
    from napari_feddp.training import SegmentationDataset
    from napari_feddp.training._io import read_mask

    out = prepare_public_patches(tmp_path / "public")
    images = sorted((out / "images").iterdir())
    masks = sorted((out / "masks").iterdir())
    assert len(images) == len(masks) > 100
    assert [p.name for p in images] == [p.name for p in masks]
    stamp = json.loads((out / "prepared.json").read_text())
    # Nuclei are a minority of H&E tissue, but not absent.
    assert 0.05 < stamp["pseudo_foreground"] < 0.3
    mask = read_mask(masks[len(masks) // 2], n_classes=2)
    assert mask.shape == (PATCH, PATCH) and set(np.unique(mask)) <= {0, 1}
    # A dataset folder the trainer reads as it is.
    dataset = SegmentationDataset(out, crop_size=128, source_mpp=0.5, target_mpp=0.5)
    assert len(dataset) == len(images)
    # Prepared once: a second call reuses the files.
    mtime = images[0].stat().st_mtime_ns
    assert prepare_public_patches(tmp_path / "public") == out
    assert images[0].stat().st_mtime_ns == mtime


def test_public_slide_at_the_wrong_pixel_size_is_refused(tmp_path):
    from experiments.pretraining import prepare_public_patches

    with pytest.raises(ValueError, match="µm/px"):
        prepare_public_patches(tmp_path / "public", mpp=0.25)
    assert not (tmp_path / "public" / "prepared.json").exists()
