"""Blending: exact where tiles agree, seam-free where they do not, bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

from napari_feddp.inference import TileBlender, plan_tiles, tile_profiles, window_2d, window_profile
from napari_feddp.inference.blending import WINDOW_FLOOR
from napari_feddp.inference.tiling import Geometry


def _plan(height, width, tile, overlap, keep=None):
    geometry = Geometry(0, (1.0, 1.0), (height, width), (1.0, 1.0))
    plan = plan_tiles(geometry, tile, overlap)
    if keep is not None:
        object.__setattr__(plan, "keep", keep(plan))
    return plan


def _blend(plan, tile_values, channels=2):
    """Blend tiles produced by ``tile_values(y, x) -> (C, T, T)``; return sums and weights."""
    height, width = plan.shape
    sums = np.zeros((channels, height, width), np.float64)
    seen = np.zeros((height, width), np.int32)

    def on_final(y0, x0, acc):
        h, w = acc.shape[1:]
        sums[:, y0 : y0 + h, x0 : x0 + w] += acc
        seen[y0 : y0 + h, x0 : x0 + w] += 1

    blender = TileBlender(plan, channels, on_final)
    for row, col in plan.tiles():
        y, x = plan.origin(row, col)
        (top, bottom), (left, right) = tile_profiles(plan, row, col)
        weights = np.outer(
            window_profile(plan.tile_size, at_start=top, at_end=bottom),
            window_profile(plan.tile_size, at_start=left, at_end=right),
        )
        blender.add(row, col, tile_values(y, x) * weights)
    blender.finish()
    return sums, seen, blender


def _field(height, width, size):
    """A smooth 2-class probability field, padded so that tiles may overhang."""
    yy, xx = np.mgrid[0 : height + size, 0 : width + size]
    p = 0.5 + 0.4 * np.sin(yy / 37.0) * np.cos(xx / 23.0)
    return np.stack([1 - p, p]).astype(np.float32)


@pytest.mark.parametrize("kind", ["hann", "gaussian"])
def test_window_shape(kind):
    window = window_2d(64, kind)
    assert window.shape == (64, 64) and window.dtype == np.float32
    assert window.max() == pytest.approx(1.0, abs=1e-3)
    assert window.min() >= WINDOW_FLOOR**2
    np.testing.assert_allclose(window, window[::-1, ::-1], atol=1e-6)
    edge = window_profile(64, kind, at_start=True)
    assert (edge[:32] == 1).all() and edge[-1] < 0.05


def test_window_rejects_unknown_kind():
    with pytest.raises(ValueError, match="expected one of"):
        window_2d(8, "box")


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"),
    [(300, 410, 64, 0.25), (300, 410, 64, 0.0), (257, 129, 64, 0.5), (200, 200, 64, 0.75), (40, 50, 64, 0.25)],
)
def test_blending_reconstructs_a_field_exactly(height, width, tile, overlap):
    """When every tile predicts the same field, the blend is that field: no seams, no bias."""
    field = _field(height, width, tile)
    plan = _plan(height, width, tile, overlap)
    sums, seen, _ = _blend(plan, lambda y, x: field[:, y : y + tile, x : x + tile])
    assert (seen == 1).all()  # every pixel handed out exactly once
    probabilities = sums / sums.sum(0)
    np.testing.assert_allclose(probabilities, field[:, :height, :width], atol=1e-5)


def test_blending_is_seam_free_between_disagreeing_tiles():
    """Tiles predicting different constants fade into each other instead of jumping."""
    rng = np.random.default_rng(1)
    height, width, tile = 448, 448, 64  # grids without slack for both overlaps below

    def blend(overlap):
        plan = _plan(height, width, tile, overlap)
        values = rng.random((len(plan.ys), len(plan.xs)))
        lookup = {plan.origin(r, c): values[r, c] for r, c in plan.tiles()}

        def tile_values(y, x):
            p = np.full((tile, tile), lookup[(y, x)], np.float32)
            return np.stack([1 - p, p])

        sums, _, _ = _blend(plan, tile_values)
        p = sums[1] / sums.sum(0)
        return max(np.abs(np.diff(p, axis=0)).max(), np.abs(np.diff(p, axis=1)).max())

    assert blend(0.0) > 0.5  # hard seams without overlap
    assert blend(0.25) < 0.15  # at most a gentle ramp over the 16-pixel overlap
    assert blend(0.5) < 0.08


def test_skipped_tiles_leave_zero_weight():
    plan = _plan(300, 300, 64, 0.25, keep=lambda p: np.eye(len(p.ys), len(p.xs), dtype=bool))
    field = _field(300, 300, 64)
    sums, seen, _ = _blend(plan, lambda y, x: field[:, y : y + 64, x : x + 64])
    covered = sums.sum(0) > 0
    assert covered[:40, :40].all() and not covered[:40, 150:].any()
    assert (seen <= 1).all()
    np.testing.assert_allclose((sums / np.maximum(sums.sum(0), 1e-30))[:, covered], field[:, :300, :300][:, covered], atol=1e-5)


@pytest.mark.parametrize("height", [1000, 1999, 4000])
def test_memory_is_the_overlap_band_not_the_image(height):
    """Live accumulators: the overlap band across the width plus the blocks under one tile."""
    width, tile, overlap_rows = 4000, 64, 16
    plan = _plan(height, width, tile, overlap_rows / tile)
    _, _, blender = _blend(plan, lambda y, x: np.full((2, tile, tile), 0.5, np.float32))
    assert not blender.blocks  # everything handed out
    stride = tile - overlap_rows
    assert int(np.diff(plan.ys).min()) >= stride // 2  # no squeezed last row
    band = 2 * 4 * (tile - stride // 2) * width  # 2 classes, float32: the widest carried band
    assert blender.peak_bytes <= band + 2 * 4 * tile * 2 * plan.chunks[1]
    assert blender.peak_bytes < 2 * 4 * tile * width  # below one full tile row


def test_tiles_must_come_in_row_major_order():
    plan = _plan(200, 200, 64, 0.25)
    blender = TileBlender(plan, 2, lambda *args: None)
    blender.add(1, 1, np.zeros((2, 64, 64), np.float32))
    with pytest.raises(ValueError, match="row-major order"):
        blender.add(0, 2, np.zeros((2, 64, 64), np.float32))
