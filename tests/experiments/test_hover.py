"""Horizontal-vertical (HoVer-Net) maps: targets, per-sample loss, decoding and DP-SGD training."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _touching_squares(side: int = 15) -> np.ndarray:
    instances = np.zeros((side + 9, 2 * side + 10), np.int64)
    instances[4:4 + side, 4:4 + side] = 1
    instances[4:4 + side, 4 + side:4 + 2 * side] = 2
    return instances


def test_maps_run_from_minus_one_to_one_across_each_nucleus():
    from experiments.hover import hv_maps

    instances = np.zeros((2, 6, 8), np.int64)
    instances[0, 1, 1:6] = 5  # a 5-px row: centre at column 3
    instances[0, 3:5, 2:5] = 7  # 2 x 3: centre row 3.5, column 3
    instances[1, 2, 0:4] = 5  # the same id in another sample is another nucleus: centre at column 1.5
    instances[1, 5, 7] = -100  # outside the tile
    maps = hv_maps(torch.from_numpy(instances)).numpy()
    assert maps.shape == (2, 2, 6, 8) and maps.dtype == np.float32
    np.testing.assert_allclose(maps[0, 0, 1, 1:6], [-1, -0.5, 0, 0.5, 1])
    np.testing.assert_allclose(maps[0, 1, 1, 1:6], 0)  # one row: no vertical offset
    np.testing.assert_allclose(maps[0, 0, 3, 2:5], [-1, 0, 1])
    np.testing.assert_allclose(maps[0, 1, 3:5, 3], [-1, 1])
    np.testing.assert_allclose(maps[1, 0, 2, 0:4], [-1, -1 / 3, 1 / 3, 1])
    outside = np.broadcast_to((instances <= 0)[:, None], maps.shape)
    assert not maps[outside].any()


def test_each_side_of_the_centre_is_scaled_on_its_own():
    from experiments.hover import hv_maps

    instances = np.zeros((1, 2, 5), np.int64)
    instances[0, 0, :] = 1
    instances[0, 1, 0] = 1  # an L: centre column 10/6, so 5/3 px to its left edge and 7/3 to its right
    maps = hv_maps(torch.from_numpy(instances)).numpy()[0, 0]
    np.testing.assert_allclose(maps[0], [-1, -0.4, 1 / 7, 4 / 7, 1], rtol=1e-6)
    np.testing.assert_allclose(maps[1, 0], -1)
    with pytest.raises(ValueError, match=r"instance maps \(B, H, W\)"):
        hv_maps(torch.zeros(4, 4, dtype=torch.long))


def test_loss_is_per_sample_and_lowest_for_the_true_maps():
    from experiments.hover import HoverLoss, hv_maps

    target = torch.from_numpy(np.stack([_touching_squares(), np.zeros_like(_touching_squares())]))
    target[1, :3, :3] = -100
    output = torch.randn(2, 4, *target.shape[1:], generator=torch.Generator().manual_seed(0))
    loss = HoverLoss()
    batch = loss.per_sample(output, target)
    alone = torch.cat([loss.per_sample(output[i:i + 1], target[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(batch, alone)  # no sample changes another's loss
    torch.testing.assert_close(loss(output, target), batch.mean())
    right = output.clone()
    right[:, 2:] = hv_maps(target)
    wrong = output.clone()
    wrong[:, 2:] = -hv_maps(target)
    assert (loss.per_sample(right, target)[0] < loss.per_sample(output, target)[0]) \
        and (loss.per_sample(right, target)[0] < loss.per_sample(wrong, target)[0])
    with pytest.raises(ValueError, match="HoverLoss: expected output"):
        loss(output[:, :3], target)


def test_true_maps_split_touching_nuclei_the_mask_alone_does_not():
    from experiments.hover import hv_maps, nuclei_from_maps

    instances = _touching_squares()
    maps = hv_maps(torch.from_numpy(instances[None]))[0].numpy()
    probability = (instances > 0).astype(np.float32)
    labels = nuclei_from_maps(probability, maps, 0.5, smoothing_um=0.0)
    assert labels.max() == 2
    for nucleus in (1, 2):
        found = labels[instances == nucleus]
        assert (found == np.bincount(found).argmax()).mean() > 0.9
    assert nuclei_from_maps(probability, np.zeros_like(maps), 0.5).max() == 1  # flat maps: no border
    assert not nuclei_from_maps(np.zeros_like(probability), maps, 0.5).any()


def test_dp_sgd_trains_the_four_output_model_on_instance_targets(tmp_path):
    import tifffile
    from PIL import Image

    from experiments.hover import InstanceDataset, train
    from experiments.runner import _grid_settings

    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "instances"):
        (tmp_path / sub).mkdir()
    for i in range(4):
        instances = np.roll(_touching_squares(), 3 * i, axis=1).astype(np.uint16)
        Image.fromarray(rng.integers(0, 255, (*instances.shape, 3), dtype=np.uint8)).save(tmp_path / "images" / f"t{i}.png")
        Image.fromarray(((instances > 0) * 255).astype(np.uint8)).save(tmp_path / "masks" / f"t{i}.png")
        tifffile.imwrite(tmp_path / "instances" / f"t{i}.tif", instances)
    dataset = InstanceDataset(tmp_path, crop_size=16, source_mpp=0.5, target_mpp=0.5, seed=0)
    _, target = dataset[0]
    assert target.dtype == torch.int64 and set(target.unique().tolist()) <= {0, 1, 2}
    settings = _grid_settings().replace(batch_size=2, crop_size=16)
    model, record = train(tmp_path, settings, steps=2, seed=0, noise=1.0)
    assert record["steps"] == 2 and 0 < record["epsilon"] < float("inf")
    assert not hasattr(next(model.parameters()), "grad_sample")  # Opacus' hooks removed
    # Tiles at another pixel size are resampled with their instance maps (ids kept, none invented).
    image, instances = InstanceDataset(tmp_path, crop_size=16, source_mpp=0.25, target_mpp=0.5).load_tile(0)
    assert image.shape == (12, 20, 3) and instances.shape == (12, 20) and instances.dtype == np.int32
    assert set(np.unique(instances).tolist()) == {0, 1, 2}


def test_map_fit_is_one_for_the_true_maps_and_zero_for_flat_maps():
    from experiments.hover import hv_maps, map_fit

    instances = _touching_squares()
    maps = hv_maps(torch.from_numpy(instances[None]))[0].numpy()
    output = np.concatenate([np.zeros((2, *instances.shape), np.float32), maps])
    fit = map_fit([output], [instances])
    assert fit["map_r2"] == pytest.approx(1.0) and fit["map_mean_abs"] == pytest.approx(fit["true_map_mean_abs"])
    flat = map_fit([np.zeros_like(output)], [instances])
    assert flat["map_r2"] == pytest.approx(0.0) and flat["map_mean_abs"] == 0
