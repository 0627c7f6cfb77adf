"""Tissue detection on thumbnails: real H&E, blank glass, synthetic pieces."""

from __future__ import annotations

import numpy as np
import pytest
from inference_helpers import paste_tissue, white_image

from napari_feddp.inference import InferenceError, TissueMask, detect_tissue, tissue_mask
from napari_feddp.inference import tissue as tissue_module
from napari_feddp.slides import Slide


def test_real_slide_mask_covers_tissue_not_glass(cmu_slide):
    mask = detect_tissue(cmu_slide)
    # 8 um/px on a 0.499 um/px slide: a 16x smaller mask, read from level 2 and averaged.
    assert mask.downsample == pytest.approx((16.0, 16.0), rel=0.01)
    assert mask.mask.shape == (185, 138)
    assert 0.25 < mask.fraction < 0.6
    # The top-left corner is glass (with a speck of dust); the bottom centre is tissue.
    assert not mask.mask[:40, :40].any()
    assert mask.mask[150:, 50:90].all()
    assert 0.05 <= mask.threshold <= 0.15


def test_blank_glass_has_no_tissue():
    with pytest.raises(InferenceError, match="no tissue found"):
        detect_tissue(white_image(400, 500))


def test_noisy_glass_has_no_tissue():
    with pytest.raises(InferenceError, match="no tissue found"):
        detect_tissue(white_image(600, 600, noise=8), mpp=0.5)


def test_tinted_glass_is_not_tissue():
    # Bright, slightly yellow background (old slides, scanner white balance).
    image = np.empty((400, 400, 3), np.uint8)
    image[...] = (250, 245, 215)
    with pytest.raises(InferenceError, match="no tissue found"):
        detect_tissue(image)


def test_pasted_tissue_is_found_and_dust_removed(cmu_crop):
    image = white_image(2000, 2400, noise=4)
    paste_tissue(image, cmu_crop[:400, :400], 200, 1500)
    image[1500:1506, 300:306] = (120, 40, 120)  # a 3 um speck of dust
    mask = detect_tissue(image, mpp=0.5)
    dy, dx = mask.downsample
    assert mask.window_any(300, 1600, 500, 1800)  # centre of the pasted tissue
    assert not mask.window_any(1400, 200, 1600, 400)  # dust removed
    assert not mask.window_any(1200, 0, 2000, 1200)  # glass
    # The mask hugs the tissue: a margin of a few mask pixels at most.
    ys, xs = np.nonzero(mask.mask)
    assert ys.min() * dy >= 200 - 48 and (ys.max() + 1) * dy <= 600 + 48
    assert xs.min() * dx >= 1500 - 48 and (xs.max() + 1) * dx <= 1900 + 48


def test_enclosed_small_holes_are_filled_open_glass_is_not():
    image = white_image(1200, 1200)
    tissue = np.empty((800, 800, 3), np.uint8)
    tissue[...] = (200, 120, 180)  # pink
    tissue[380:420, 380:420] = 242  # a 20 um lumen inside the tissue
    paste_tissue(image, tissue, 200, 200)
    mask = detect_tissue(image, mpp=0.5, target_mpp=4.0)
    assert mask.window_any(390, 390, 410, 410)  # hole filled
    assert not mask.window_any(1100, 1100, 1200, 1200)  # open glass stays glass


def test_tissue_mask_rejects_wrong_input():
    with pytest.raises(InferenceError, match=r"expected a \(h, w, 3\) uint8 image"):
        tissue_mask(np.zeros((10, 10), np.uint8))
    with pytest.raises(InferenceError, match="uint8"):
        tissue_mask(np.zeros((10, 10, 3), np.float32))


def test_thumbnail_is_capped_and_streamed(monkeypatch):
    monkeypatch.setattr(tissue_module, "MAX_THUMBNAIL_SIDE", 100)
    slide = Slide.from_array(white_image(1000, 800), mpp=0.25)
    thumbnail, downsample = tissue_module.read_thumbnail(slide, 2.0)
    assert max(thumbnail.shape[:2]) <= 100
    assert downsample == pytest.approx((10.0, 10.0))
    assert thumbnail.dtype == np.uint8 and (thumbnail == 242).all()


def test_mask_from_user_array():
    user = np.zeros((10, 20), bool)
    user[2:4, 5:7] = True
    mask = TissueMask.from_array(user, (100, 200))
    assert mask.downsample == (10.0, 10.0)
    assert mask.window_any(20, 50, 30, 60)
    assert not mask.window_any(0, 0, 20, 50)
    with pytest.raises(InferenceError, match="2-D boolean mask"):
        TissueMask.from_array(np.zeros((2, 2, 2)), (10, 10))
