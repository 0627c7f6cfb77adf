"""Saving a napari-annotated region as a training tile with provenance."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from napari_feddp.training import DatasetError, SegmentationDataset, read_provenance, save_annotated_tile

from .conftest import synthetic_tile


def _region(seed=0, size=(36, 44)):
    image, mask = synthetic_tile(np.random.default_rng(seed), *size)
    labels = mask.astype(np.int32) * np.random.default_rng(seed).integers(1, 9, size=mask.shape)  # instance ids
    return image, labels


PROVENANCE = {"source": "/slides/case 7.svs", "level": 0, "region": [1200, 3400, 1236, 3444],
              "mpp": 0.25, "layer": "nuclei", "annotator": "pathologist-1"}


def test_saved_tile_loads_as_training_data(tmp_path):
    image, labels = _region()
    saved = save_annotated_tile(tmp_path / "lab", image, labels, PROVENANCE)
    assert saved.name.startswith("case-7_y1200_x3400_")
    assert saved.image == tmp_path / "lab" / "images" / f"{saved.name}.png"
    assert saved.mask == tmp_path / "lab" / "masks" / f"{saved.name}.png"
    dataset = SegmentationDataset(tmp_path / "lab", crop_size=16, target_mpp=0.25)
    loaded_image, loaded_mask = dataset.load_tile(0)
    assert np.array_equal(loaded_image, image)
    assert np.array_equal(loaded_mask, (labels > 0).astype(np.uint8))  # painted ids -> nucleus


def test_provenance_record(tmp_path):
    image, labels = _region()
    saved = save_annotated_tile(tmp_path, image, labels, PROVENANCE, image_format="tif", name="t1")
    (record,) = read_provenance(tmp_path)
    assert record["name"] == "t1" and record["image"] == "images/t1.tif" and record["mask"] == "masks/t1.png"
    assert record["image_sha256"] == hashlib.sha256(saved.image.read_bytes()).hexdigest()
    assert record["provenance"] == json.loads(json.dumps(PROVENANCE))
    assert record["mpp"] == 0.25 and record["shape"] == [36, 44]
    # The recorded mpp drives resampling: 0.25 -> 0.5 halves the tile.
    half = SegmentationDataset(tmp_path, crop_size=8, source_mpp=1.0, target_mpp=0.5)
    assert half.load_tile(0)[0].shape == (18, 22, 3)


def test_second_tile_appends(tmp_path):
    for seed in (0, 1):
        save_annotated_tile(tmp_path, *_region(seed), {"mpp": 0.5})
    assert len(read_provenance(tmp_path)) == 2
    assert len(SegmentationDataset(tmp_path, crop_size=8)) == 2


def test_size_mismatch_is_clear(tmp_path):
    image, labels = _region()
    with pytest.raises(DatasetError, match=r"image is 36x44 but mask is 36x43"):
        save_annotated_tile(tmp_path, image, labels[:, :-1], {})


def test_existing_tile_needs_overwrite(tmp_path):
    image, labels = _region()
    save_annotated_tile(tmp_path, image, labels, {}, name="a")
    with pytest.raises(DatasetError, match="tile 'a' already exists"):
        save_annotated_tile(tmp_path, image, labels, {}, name="a", image_format="tif")
    save_annotated_tile(tmp_path, image, labels, {}, name="a", image_format="tif", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["a.tif"]


def test_bad_inputs(tmp_path):
    image, labels = _region()
    with pytest.raises(DatasetError, match="expected a uint8 array of shape"):
        save_annotated_tile(tmp_path, image.astype(np.float32), labels, {})
    with pytest.raises(DatasetError, match="JSON-serialisable"):
        save_annotated_tile(tmp_path, image, labels, {"when": object()})
    with pytest.raises(DatasetError, match="tile name"):
        save_annotated_tile(tmp_path, image, labels, {}, name="../escape")
    with pytest.raises(DatasetError, match="'mpp'"):
        save_annotated_tile(tmp_path, image, labels, {"mpp": 0})
    assert not (tmp_path / "images").exists()  # nothing written on error


def test_painted_nuclei_are_kept_as_instances_for_contour_models(tmp_path):
    from napari_feddp.training.dataset import contour_target

    image = np.full((24, 24, 3), 150, np.uint8)
    labels = np.zeros((24, 24), np.int32)
    labels[4:14, 2:12], labels[4:14, 12:22] = 7, 40  # two touching nuclei, napari ids
    saved = save_annotated_tile(tmp_path, image, labels, {"mpp": 0.5}, name="t")
    instances = tmp_path / "instances" / "t.png"
    assert instances.is_file()
    dataset = SegmentationDataset(tmp_path, n_classes=3, crop_size=24, mode="center", source_mpp=0.5)
    _, target = dataset.load_tile(0)
    expected = contour_target(np.where(labels == 7, 1, np.where(labels == 40, 2, 0)))
    assert np.array_equal(target, expected)  # the pathologist's separation, not one merged blob
    # The two-class view of the same tile is unchanged: non-zero = nucleus.
    _, mask = SegmentationDataset(tmp_path, crop_size=24, mode="center", source_mpp=0.5).load_tile(0)
    assert np.array_equal(mask, (labels > 0).astype(np.uint8))
    # A tile saved again as a plain mask drops its old nuclei.
    save_annotated_tile(tmp_path, image, labels > 0, {"mpp": 0.5}, name="t", overwrite=True)
    assert not instances.exists() and saved.mask.is_file()
