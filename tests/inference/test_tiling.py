"""Level choice, resampling geometry and the tile grid."""

from __future__ import annotations

import numpy as np
import pytest

from napari_feddp.inference import InferenceError, TissueMask, choose_geometry, grid_starts, plan_tiles
from napari_feddp.slides import Slide


@pytest.mark.parametrize(
    ("length", "tile", "stride"),
    [(1000, 128, 96), (128, 128, 96), (129, 128, 64), (5000, 512, 384), (8000, 256, 192), (1000, 100, 90)],
)
def test_grid_covers_the_axis_without_padding(length, tile, stride):
    starts = grid_starts(length, tile, stride)
    assert starts[0] == 0 and starts[-1] + tile == length
    steps = np.diff(starts)
    assert (steps <= stride).all() and (steps > 0).all()
    # MONAI's grid (multiples of the stride) except the last two steps, which share
    # the slack so that no tile is squeezed against its neighbour.
    assert (starts[:-2] == stride * np.arange(len(starts) - 2)).all()
    if len(steps) > 1:
        assert steps[-2:].min() >= stride // 2
    covered = np.zeros(length, bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered.all()


def test_grid_matches_monai_where_the_last_step_is_long_enough():
    # MONAI: starts = min(i * interval, length - roi) for i in range(ceil((length - roi) / interval) + 1)
    assert grid_starts(1000, 100, 90).tolist() == list(range(0, 901, 90))  # identical
    # MONAI: 0, 96, ..., 768, 864, 872 (last step 8); here 864 moves to share the slack.
    assert grid_starts(1000, 128, 96).tolist() == [0, 96, 192, 288, 384, 480, 576, 672, 768, 820, 872]
    assert grid_starts(8000, 256, 192)[-3:].tolist() == [7488, 7616, 7744]  # 7680 moved: last step was 64


def test_grid_on_axis_shorter_than_tile_is_one_padded_tile():
    assert grid_starts(50, 128, 96).tolist() == [0]


def _pyramid(mpp=(0.25, 0.25)) -> Slide:
    return Slide([np.zeros((4096 // f, 3072 // f, 3), np.uint8) for f in (1, 4, 16)], mpp=mpp)


@pytest.mark.parametrize(
    ("target", "level", "scale"),
    [
        (None, 0, 1.0),
        (0.25, 0, 1.0),
        (0.27, 0, 1.0),  # within 10 %: no resampling
        (0.5, 0, 2.0),  # read level 0 and shrink, never upsample level 1
        (1.0, 1, 1.0),
        (2.0, 1, 2.0),
        (4.0, 2, 1.0),
        (10.0, 2, 2.5),
        (0.125, 0, 0.5),  # finer than level 0: the only case that upsamples
    ],
)
def test_level_choice_prefers_downsampling(target, level, scale):
    geometry = choose_geometry(_pyramid(), target)
    assert geometry.level == level
    assert geometry.scale == pytest.approx((scale, scale), rel=0.01)
    mpp = 0.25 * geometry.downsample[0]
    if target is not None:
        assert mpp == pytest.approx(target if abs(target / (0.25 * 4**level) - 1) > 0.1 else 0.25 * 4**level, rel=0.01)
    assert geometry.shape[0] == pytest.approx(4096 / geometry.downsample[0], abs=1)


def test_real_slide_geometry(cmu_slide):
    # The file stores level 0 only; its coarser levels are computed, so tiles are
    # read from level 0 and resized once instead.
    assert not cmu_slide.pyramid_in_file and len(cmu_slide.levels) == 3
    assert choose_geometry(cmu_slide, 0.5) == choose_geometry(cmu_slide, None)  # 0.499: no resampling
    assert choose_geometry(cmu_slide, 2.0).level == 0  # level 2 (2 um/px) is computed: not read
    geometry = choose_geometry(cmu_slide, 1.5)
    assert geometry.level == 0 and geometry.resampled
    assert geometry.downsample == pytest.approx((3.006, 3.006), rel=0.01)
    assert geometry.shape == (987, 739)


def test_model_mpp_needs_slide_mpp():
    with pytest.raises(InferenceError, match="has no pixel size; pass mpp="):
        choose_geometry(_pyramid(mpp=None), 0.5)


def test_plan_keeps_tiles_touching_region_and_tissue():
    geometry = choose_geometry(Slide.from_array(np.zeros((1000, 1200, 3), np.uint8)), None)
    full = plan_tiles(geometry, 128, 0.25)
    assert full.n_tiles == full.n_grid == len(full.ys) * len(full.xs)

    region = plan_tiles(geometry, 128, 0.25, region=(300, 400, 500, 700))
    for row, col in region.tiles():
        y, x = region.origin(row, col)
        assert y < 500 and y + 128 > 300 and x < 700 and x + 128 > 400
    assert 0 < region.n_tiles < full.n_tiles

    mask = np.zeros((100, 120), bool)
    mask[0:5, 0:5] = True  # level-0 [0, 50) x [0, 50)
    tissue = plan_tiles(geometry, 128, 0.25, tissue=TissueMask(mask, (10.0, 10.0)))
    assert tissue.tiles() == [(0, 0)]
