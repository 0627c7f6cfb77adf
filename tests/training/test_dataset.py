"""Dataset loading: MoNuSeg as-is, resampling, deterministic modes, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_feddp.training import DatasetError, SegmentationDataset, dataset_fingerprint, find_pairs
from napari_feddp.training.metrics import IGNORE_INDEX

from .conftest import shared_data, write_dataset

# ----------------------------------------------------------------------------- MoNuSeg


@pytest.mark.parametrize("split, raw_values", [("train", {0, 1}), ("test", {0, 255})])
def test_monuseg_splits_load_as_they_are(split, raw_values):
    root = shared_data(f"monuseg/{split}")
    first_mask = sorted((root / "masks").glob("*.png"))[0]
    assert set(np.unique(np.asarray(Image.open(first_mask))).tolist()) == raw_values
    dataset = SegmentationDataset(root, crop_size=64, mode="center", source_mpp=0.25, target_mpp=0.5)
    assert len(dataset) == len(list((root / "images").glob("*.tif")))
    image, mask = dataset.load_tile(0)
    assert image.shape == (500, 500, 3) and image.dtype == np.uint8  # 1000 px at 0.25 -> 500 px at 0.5
    assert set(np.unique(mask).tolist()) == {0, 1}
    x, y = dataset[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert y.shape == (64, 64) and y.dtype == torch.int64


def test_monuseg_resampling_preserves_nucleus_fraction():
    root = shared_data("monuseg/train")
    native = SegmentationDataset(root, crop_size=64, mode="center").load_tile(0)[1]
    half = SegmentationDataset(root, crop_size=64, mode="center", target_mpp=0.5).load_tile(0)[1]
    assert native.shape == (1000, 1000)
    assert half.mean() == pytest.approx(native.mean(), abs=0.01)


# ----------------------------------------------------------------------------- modes


def test_sliding_mode_covers_every_pixel_once(tiny_dir):
    dataset = SegmentationDataset(tiny_dir, crop_size=32, mode="sliding")
    # 40x48 tiles with 32-px windows -> 2x2 windows per tile, 3 tiles.
    assert len(dataset) == 12
    scored = sum(int((dataset[i][1] != IGNORE_INDEX).sum()) for i in range(len(dataset)))
    assert scored == 3 * 40 * 48
    # Re-assemble tile 0 from its four windows: identical to the mask on disk.
    truth = np.asarray(Image.open(tiny_dir / "masks" / "tile00.png"))
    canvas = np.full((64, 64), -1)
    for i, (y0, x0) in enumerate([(0, 0), (0, 32), (32, 0), (32, 32)]):
        canvas[y0 : y0 + 32, x0 : x0 + 32] = dataset[i][1].numpy()
    assert np.array_equal(canvas[:40, :48], truth)
    assert (canvas[40:, :] == IGNORE_INDEX).all()


def test_center_mode_is_deterministic_and_unaugmented(tiny_dir):
    dataset = SegmentationDataset(tiny_dir, crop_size=32, mode="center")
    a, b = dataset[1], dataset[1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    truth = np.asarray(Image.open(tiny_dir / "masks" / "tile01.png"))
    assert np.array_equal(a[1].numpy(), truth[4:36, 8:40])


def test_train_mode_seeded_and_random(tiny_dir):
    first = SegmentationDataset(tiny_dir, crop_size=32, seed=3)
    second = SegmentationDataset(tiny_dir, crop_size=32, seed=3)
    crops = [first[0][1] for _ in range(4)]
    assert all(torch.equal(c, second[0][1]) for c in crops)
    assert not all(torch.equal(crops[0], c) for c in crops[1:])


def test_crop_larger_than_tile_is_padded_with_ignore(tiny_dir):
    dataset = SegmentationDataset(tiny_dir, crop_size=64, mode="center")
    _, mask = dataset[0]
    assert int((mask != IGNORE_INDEX).sum()) == 40 * 48


def test_provenance_mpp_overrides_source_mpp(tiny_dir):
    (tiny_dir / "provenance.jsonl").write_text('{"name": "tile00", "mpp": 0.5}\n')
    dataset = SegmentationDataset(tiny_dir, crop_size=16, source_mpp=0.25, target_mpp=0.5)
    assert [p.mpp for p in dataset.pairs] == [0.5, 0.25, 0.25]
    assert dataset.load_tile(0)[0].shape == (40, 48, 3)
    assert dataset.load_tile(1)[0].shape == (20, 24, 3)


def test_for_model_takes_card_settings(tiny_dir):
    from napari_feddp.models import default_card

    card = default_card(mpp=0.5, tile_size=32)
    dataset = SegmentationDataset.for_model(tiny_dir, card, source_mpp=0.5, mode="center")
    image, _ = dataset[0]
    assert dataset.crop_size == 32 and dataset.target_mpp == 0.5
    assert float(image.min()) < 0  # ImageNet normalisation applied


def test_tiff_images_and_0_255_masks(tmp_path):
    root = write_dataset(tmp_path / "d", n=2, image_suffix=".tif", mask_scale=255)
    dataset = SegmentationDataset(root, crop_size=16, mode="center")
    assert set(np.unique(dataset.load_tile(0)[1]).tolist()) == {0, 1}


def test_fingerprint_tracks_files(tiny_dir):
    before = dataset_fingerprint(tiny_dir)
    assert before == dataset_fingerprint(tiny_dir)
    (tiny_dir / "provenance.jsonl").write_text("{}\n")  # metadata does not count
    assert before == dataset_fingerprint(tiny_dir)
    write_dataset(tiny_dir, n=4)  # adds tile03
    assert before != dataset_fingerprint(tiny_dir)


# ----------------------------------------------------------------------------- errors


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found: .*nowhere"):
        SegmentationDataset(tmp_path / "nowhere")


def test_missing_masks_subfolder(tiny_dir):
    shutil.rmtree(tiny_dir / "masks")
    with pytest.raises(DatasetError, match="'masks' is missing"):
        find_pairs(tiny_dir)


def test_empty_images_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no images in .*images.*found only \['notes.txt'\]"):
        find_pairs(tmp_path)


def test_mask_without_image(tiny_dir):
    (tiny_dir / "images" / "tile01.png").unlink()
    with pytest.raises(DatasetError, match=r"mask\(s\) without an image.*masks/tile01.png"):
        find_pairs(tiny_dir)


def test_image_without_mask(tiny_dir):
    (tiny_dir / "masks" / "tile02.png").unlink()
    with pytest.raises(DatasetError, match=r"image\(s\) without a mask.*images/tile02.png"):
        find_pairs(tiny_dir)


def test_mismatched_sizes_name_both_files(tiny_dir):
    Image.fromarray(np.zeros((40, 47), np.uint8)).save(tiny_dir / "masks" / "tile01.png")
    with pytest.raises(DatasetError, match=r"sizes differ: .*images/tile01.png is 40x48.*masks/tile01.png is 40x47"):
        find_pairs(tiny_dir)


def test_garbage_file_is_unreadable(tiny_dir):
    (tiny_dir / "images" / "tile00.png").write_bytes(b"this is not a png")
    with pytest.raises(DatasetError, match=r"cannot read .*images/tile00.png"):
        find_pairs(tiny_dir)


def test_truncated_file_fails_on_decode_naming_it(tiny_dir):
    path = tiny_dir / "images" / "tile02.png"
    path.write_bytes(path.read_bytes()[:120])  # header intact, pixel data cut
    dataset = SegmentationDataset(tiny_dir, crop_size=16)  # headers are fine
    with pytest.raises(DatasetError, match=r"cannot read .*images/tile02.png: file is corrupt or truncated"):
        dataset.verify()


def test_unexpected_mask_values(tiny_dir):
    Image.fromarray(np.full((40, 48), 7, np.uint8)).save(tiny_dir / "masks" / "tile00.png")
    dataset = SegmentationDataset(tiny_dir, crop_size=16)
    with pytest.raises(DatasetError, match=r"masks/tile00.png: expected 0/1, 0/255 or class indices 0..1.*mask_mode='binary'"):
        dataset.load_tile(0)
    binary = SegmentationDataset(tiny_dir, crop_size=16, mask_mode="binary")
    assert set(np.unique(binary.load_tile(0)[1]).tolist()) == {1}


def test_colour_mask_rejected(tiny_dir):
    rgb = np.zeros((40, 48, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tiny_dir / "masks" / "tile00.png")
    with pytest.raises(DatasetError, match="masks/tile00.png: expected a greyscale label mask"):
        SegmentationDataset(tiny_dir, crop_size=16).load_tile(0)


def test_greyscale_image_rejected(tiny_dir):
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(tiny_dir / "images" / "tile00.png")
    with pytest.raises(DatasetError, match=r"images/tile00.png: expected an RGB image"):
        SegmentationDataset(tiny_dir, crop_size=16).load_tile(0)


def test_duplicate_stem(tiny_dir):
    Image.open(tiny_dir / "images" / "tile00.png").save(tiny_dir / "images" / "tile00.tif")
    with pytest.raises(DatasetError, match="two files named 'tile00'"):
        find_pairs(tiny_dir)


def test_bad_arguments(tiny_dir: Path):
    with pytest.raises(ValueError, match="mode: expected one of"):
        SegmentationDataset(tiny_dir, mode="random")
    with pytest.raises(ValueError, match="crop_size: expected a positive integer"):
        SegmentationDataset(tiny_dir, crop_size=0)
    with pytest.raises(ValueError, match="source_mpp: expected a positive number"):
        SegmentationDataset(tiny_dir, source_mpp=-1)


def test_contour_targets_come_from_instances_or_mask_components(tmp_path):
    import tifffile

    from napari_feddp.training.dataset import contour_target

    for sub in ("images", "masks", "instances"):
        (tmp_path / sub).mkdir()
    instances = np.zeros((32, 32), np.uint16)
    instances[4:16, 4:16], instances[4:16, 16:28] = 1, 2  # touching: one blob in the mask
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(((instances > 0) * 255).astype(np.uint8)).save(tmp_path / "masks" / "a.png")
    tifffile.imwrite(tmp_path / "instances" / "a.tif", instances)
    with_instances = SegmentationDataset(tmp_path, n_classes=3, crop_size=32, mode="center")
    assert with_instances.contours
    _, target = with_instances.load_tile(0)
    assert np.array_equal(target, contour_target(instances.astype(np.int32)))
    (tmp_path / "instances" / "a.tif").unlink()
    from_mask = SegmentationDataset(tmp_path, n_classes=3, crop_size=32, mode="center")
    _, merged = from_mask.load_tile(0)
    assert (merged[5:15, 15:17] == 1).all()  # one component: no contour between the two
    # Resampled to half the pixel size, ids are not interpolated.
    half = SegmentationDataset(tmp_path, n_classes=3, crop_size=16, mode="center", source_mpp=0.25, target_mpp=0.5)
    assert set(np.unique(half.load_tile(0)[1])) <= {0, 1, 2}
    with pytest.raises(ValueError, match="3 classes"):
        SegmentationDataset(tmp_path, n_classes=2, contours=True)


def test_rim_targets_cut_each_nucleus_inner_distance_at_a_fraction(tmp_path):
    from skimage.measure import label

    from napari_feddp.training.dataset import contour_target

    instances = np.zeros((40, 60), np.int32)
    instances[5:26, 5:26] = 3  # 21 x 21 square: largest inner distance 9 (from its outline)
    instances[5:26, 26:35] = 8  # a 9 px wide nucleus touching it: largest inner distance 3
    outline = contour_target(instances)
    rim = contour_target(instances, 0.5)
    # The outline is always rim; the rim is a band of the nucleus's own size.
    assert ((outline == 2) <= (rim == 2)).all() and (rim > 0).sum() == (instances > 0).sum()
    big_core, small_core = (rim == 1) & (instances == 3), (rim == 1) & (instances == 8)
    assert big_core[15].sum() == 11 and small_core[15].sum() == 5  # distances >= 4.5 and >= 1.5
    # Touching nuclei: the cores lie farther apart than two outline pixels.
    assert label(rim == 1, connectivity=1).max() == 2
    gap = np.flatnonzero(small_core[15]).min() - np.flatnonzero(big_core[15]).max() - 1
    assert gap > np.flatnonzero((outline == 1)[15] & (instances[15] == 8)).min() \
        - np.flatnonzero((outline == 1)[15] & (instances[15] == 3)).max() - 1
    assert np.array_equal(contour_target(instances, 0.0), outline)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="rim_fraction"):
            contour_target(instances, bad)


def test_dataset_passes_rim_fraction_to_its_targets(tmp_path):
    import tifffile

    from napari_feddp.training.dataset import contour_target

    for sub in ("images", "masks", "instances"):
        (tmp_path / sub).mkdir()
    instances = np.zeros((32, 32), np.uint16)
    instances[4:16, 4:16], instances[4:16, 16:28] = 1, 2
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(((instances > 0) * 255).astype(np.uint8)).save(tmp_path / "masks" / "a.png")
    tifffile.imwrite(tmp_path / "instances" / "a.tif", instances)
    dataset = SegmentationDataset(tmp_path, n_classes=3, crop_size=32, mode="center", rim_fraction=0.4)
    _, target = dataset.load_tile(0)
    assert np.array_equal(target, contour_target(instances.astype(np.int32), 0.4))
    assert not np.array_equal(target, contour_target(instances.astype(np.int32)))
    with pytest.raises(ValueError, match="rim_fraction"):
        SegmentationDataset(tmp_path, n_classes=3, rim_fraction=1.5)
