"""Nuclei from a nucleus mask: touching nuclei become separate labels."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from napari_feddp.inference.instances import split_nuclei


def _two_touching_disks(radius_px: int, gap_px: int = 0) -> np.ndarray:
    mask = np.zeros((4 * radius_px, 6 * radius_px), bool)
    centre_row = 2 * radius_px
    left = (centre_row, 2 * radius_px)
    right = (centre_row, 2 * radius_px + 2 * radius_px - 2 + gap_px)  # overlapping by 2 px: one blob
    mask[disk(left, radius_px, shape=mask.shape)] = True
    mask[disk(right, radius_px, shape=mask.shape)] = True
    return mask


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_two_touching_nuclei_become_two_labels(mpp):
    radius_px = int(round(3.0 / mpp))  # 6 µm nuclei at either pixel size
    mask = _two_touching_disks(radius_px)
    from skimage.measure import label

    assert label(mask).max() == 1  # one blob for connected components
    labels = split_nuclei(mask, mpp)
    assert labels.max() == 2
    assert np.array_equal(labels > 0, mask)  # nothing added, nothing lost
    sizes = np.bincount(labels.ravel())[1:]
    assert abs(int(sizes[0]) - int(sizes[1])) < 0.1 * sizes.max()  # split near the neck


def test_small_and_separate_objects_each_keep_one_label():
    mask = np.zeros((40, 40), bool)
    mask[2:4, 2:4] = True  # 2x2 px speck: no interior peak of its own
    mask[20:30, 20:30] = True
    labels = split_nuclei(mask, 0.5)
    assert labels.max() == 2 and np.array_equal(labels > 0, mask)
    assert split_nuclei(np.zeros((5, 5), bool), 0.5).max() == 0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        split_nuclei(np.zeros((2, 2, 2), bool), 0.5)
    with pytest.raises(ValueError, match="mpp"):
        split_nuclei(np.zeros((2, 2), bool), 0)
