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


def _field_of_nuclei(shape=(300, 420), radius=6, seed=0):
    """Disks on a jittered grid, some touching: a small 'slide' of nuclei."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    for cy in range(10, shape[0] - 10, 15):
        for cx in range(10, shape[1] - 10, 15):  # 15 px apart, radius 6, jitter +-2: some pairs touch
            mask[disk((cy + rng.integers(-2, 3), cx + rng.integers(-2, 3)), radius, shape=shape)] = True
    return mask


def test_tiled_labels_match_the_whole_image_and_every_seam_nucleus_is_labelled_once():
    from napari_feddp.inference.instances import label_nuclei_tiled
    from napari_feddp.training.instance_metrics import panoptic_quality

    mask = _field_of_nuclei()
    from skimage.measure import label

    assert label(mask).max() < split_nuclei(mask, 0.5).max()  # some nuclei touch
    whole = split_nuclei(mask, 0.5)
    tiled = label_nuclei_tiled(mask.astype(np.uint8), 0.5, window=64, halo_um=12.0)
    assert not np.any((tiled > 0) & ~mask)  # nothing outside the nuclei
    assert np.count_nonzero(tiled) >= 0.995 * np.count_nonzero(mask)
    ids = np.unique(tiled[tiled > 0])
    assert np.array_equal(ids, np.arange(1, len(ids) + 1))  # unique, consecutive slide-wide
    # Same objects as one pass over the whole image: a seam never splits or duplicates a nucleus.
    pq = panoptic_quality(whole, tiled)
    assert pq["fp"] == 0 and pq["fn"] == 0 and pq["sq"] > 0.95


def test_tiled_labels_write_into_a_zarr_array(tmp_path):
    import zarr

    from napari_feddp.inference.instances import label_nuclei_tiled

    mask = _field_of_nuclei(shape=(130, 150))
    out = zarr.open_array(str(tmp_path / "nuclei.zarr"), mode="w", shape=mask.shape, chunks=(64, 64), dtype="int32")
    label_nuclei_tiled(zarr.array(mask.astype(np.uint8), chunks=(50, 50)), 0.5, out=out, window=64)
    assert int(out[:].max()) == split_nuclei(mask, 0.5).max()


# ----------------------------------------------------------------------------- contour models


def _outlined(instances: np.ndarray) -> np.ndarray:
    from napari_feddp.training.dataset import contour_target

    return contour_target(instances)


def test_contour_target_outlines_each_nucleus_and_separates_touching_ones():
    instances = np.zeros((20, 30), np.int32)
    instances[5:15, 3:13] = 1
    instances[5:15, 13:23] = 2  # touches nucleus 1 along a column
    target = _outlined(instances)
    assert set(np.unique(target)) == {0, 1, 2}
    assert np.array_equal(target > 0, instances > 0)
    # Both columns of the shared edge are contour: the interiors do not touch.
    assert (target[6:14, 12] == 2).all() and (target[6:14, 13] == 2).all()
    from skimage.measure import label

    assert label(target == 1, connectivity=1).max() == 2


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_touching_nuclei_with_contours_become_two_labels(mpp):
    from napari_feddp.inference.instances import nuclei_from_contours

    radius_px = int(round(3.0 / mpp))
    a = _two_touching_disks(radius_px)
    left = np.zeros(a.shape, bool)
    left[disk((2 * radius_px, 2 * radius_px), radius_px, shape=a.shape)] = True
    instances = np.where(left, 1, np.where(a, 2, 0)).astype(np.int32)
    labels = nuclei_from_contours(_outlined(instances), mpp)
    assert labels.max() == 2
    assert np.array_equal(labels > 0, a)
    # Each predicted nucleus is the annotated one (up to a contour pixel or so).
    for k in (1, 2):
        overlap = np.bincount(instances[labels == k], minlength=3)
        assert overlap.max() >= 0.95 * (labels == k).sum()


def test_contour_only_pieces_and_specks_still_become_nuclei():
    from napari_feddp.inference.instances import nuclei_from_classes, nuclei_from_contours

    classes = np.zeros((30, 30), np.uint8)
    classes[2:5, 2:5] = 2  # a tiny nucleus drawn as contour only
    classes[10:20, 10:20] = 2
    classes[11:19, 11:19] = 1
    classes[15, 15] = 2  # a contour pixel inside does not split it
    labels = nuclei_from_contours(classes, 0.5)
    assert labels.max() == 2 and np.array_equal(labels > 0, classes > 0)
    # What the product shows drops pieces under 3 µm² as noise (the 3x3 px piece is 2.25 µm²)...
    shown = nuclei_from_classes(classes, 0.5, contour_class=2)
    assert shown.max() == 1 and not shown[2:5, 2:5].any()
    assert nuclei_from_classes(classes, 0.5, contour_class=2, min_area_um2=0).max() == 2
    # ...and a foreground-only model's map goes through the watershed instead.
    assert nuclei_from_classes((classes > 0).astype(np.uint8), 0.5, min_area_um2=0).max() == 2
    with pytest.raises(ValueError, match="2-D"):
        nuclei_from_contours(classes[None], 0.5)
    with pytest.raises(ValueError, match="mpp"):
        nuclei_from_contours(classes, 0)


def test_a_foreground_map_is_split_with_the_given_watershed_parameters():
    from napari_feddp.inference.instances import nuclei_from_classes

    mpp = 0.25
    classes = _two_touching_disks(int(round(3.0 / mpp))).astype(np.uint8)  # 6 µm nuclei, centres 5.5 µm apart
    assert nuclei_from_classes(classes, mpp).max() == 2
    # Centres must lie further apart than the two nuclei do: they stay one object.
    assert nuclei_from_classes(classes, mpp, min_centre_distance_um=8.0).max() == 1
    assert nuclei_from_classes(classes, mpp, smoothing_um=0.5, min_centre_distance_um=2.0).max() == 2


def test_contour_class_is_found_by_name():
    from napari_feddp.inference.instances import contour_class_of

    assert contour_class_of(("background", "nucleus", "contour")) == 2
    assert contour_class_of(["background", "nucleus"]) is None
    assert contour_class_of(None) is None


def test_tiled_contour_labels_match_the_whole_image():
    from napari_feddp.inference.instances import label_nuclei_tiled, nuclei_from_contours

    rng = np.random.default_rng(3)
    instances = np.zeros((120, 150), np.int32)
    for k, (y, x) in enumerate(rng.integers(8, [112, 142], size=(40, 2)), start=1):
        instances[disk((y, x), 5, shape=instances.shape)] = k
    classes = _outlined(instances)
    whole = nuclei_from_contours(classes, 0.5)
    tiled = label_nuclei_tiled(classes, 0.5, window=32, contour_class=2)
    assert tiled.max() == whole.max()
    assert np.array_equal(tiled > 0, whole > 0)
    from skimage.metrics import variation_of_information

    assert sum(variation_of_information(whole, tiled)) < 1e-9  # the same partition, other ids
