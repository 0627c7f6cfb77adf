"""Augmentation keeps image and mask aligned; stain jitter changes colour only."""

from __future__ import annotations

import numpy as np
import torch

from napari_feddp.training import Augmentation, SegmentationDataset
from napari_feddp.training.augment import hed_to_rgb, random_flip_rotate, rgb_to_hed


def _encoded_pair(rng):
    """Image whose pixels are dark exactly where the (asymmetric) mask is 1."""
    mask = (rng.random((24, 32)) < 0.3).astype(np.uint8)
    image = np.where(mask[..., None] == 1, np.uint8(40), np.uint8(220)).repeat(3, axis=2).astype(np.uint8)
    return image, mask


def test_full_augmentation_keeps_alignment():
    rng = np.random.default_rng(0)
    augment = Augmentation(hed_scale=0.1, hed_shift=0.1, brightness=0.1, contrast=0.1)
    for _ in range(20):
        image, mask = _encoded_pair(rng)
        out_image, out_mask = augment(image, mask, rng)
        assert out_image.dtype == np.uint8 and out_mask.dtype == mask.dtype
        assert sorted(np.unique(out_mask).tolist()) == sorted(np.unique(mask).tolist())
        assert np.array_equal(out_image.mean(axis=2) < 130, out_mask == 1)


def test_geometry_is_applied_to_both():
    rng = np.random.default_rng(1)
    index = np.arange(6 * 8).reshape(6, 8)
    image = np.stack([index, index, index], axis=2)
    seen = set()
    for _ in range(30):
        out_image, out_mask = random_flip_rotate(image, index, rng)
        assert np.array_equal(out_image[..., 0], out_mask)
        seen.add(out_mask.tobytes())
    assert len(seen) == 8  # the 8 symmetries of the square (dihedral group)


def test_hed_round_trip_is_exact_and_jitter_changes_colour():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    assert np.array_equal(hed_to_rgb(rgb_to_hed(image)), image)
    out, _ = Augmentation(flips=False, rotations=False, brightness=0, contrast=0)(image, image[..., 0], rng)
    assert not np.array_equal(out, image)
    assert np.abs(out.astype(int) - image.astype(int)).mean() < 25


def test_dataset_train_crops_stay_aligned(tiny_dir):
    dataset = SegmentationDataset(tiny_dir, crop_size=32, seed=0)
    for _ in range(6):
        image, mask = dataset[0]
        dark = image.mean(0) < 0.5  # nuclei are dark purple on pink
        agreement = (dark == (mask == 1)).float().mean()
        assert agreement > 0.97, agreement
        assert torch.isin(mask, torch.tensor([0, 1])).all()
