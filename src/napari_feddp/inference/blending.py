"""Blend overlapping tile predictions with a smooth window, in bounded memory.

Every tile's class probabilities are multiplied by a window that is 1 in the
middle and falls smoothly towards the tile border, and added into an
accumulator. A pixel's blended probabilities are the accumulated sums divided
by the summed weights, so overlapping tiles fade into each other (no seams)
and tile borders, where a network sees no context, count for little. On sides
where a tile touches the image border the window stays at 1: there the network
saw the same zero padding as a whole-image prediction would, and a
neighbouring tile that overlaps almost entirely must not outweigh it.

Because probabilities sum to 1 over classes, the summed weights of a pixel are
the sum of its accumulator over classes; no separate weight map is stored.

Memory: tiles arrive in row-major order; accumulators are kept per column
block (one output chunk wide) and a block's rows are handed to ``on_final`` as
soon as no later tile can touch them. What stays alive is the overlap band
below the current tile row (``overlap x width`` pixels; at most
``tile - stride / 2`` rows, at the last tile row) plus the blocks under the
current tile, whatever the slide's height.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .tiling import TilePlan

#: Smallest window weight, relative to the centre, so that every pixel of a tile
#: carries some weight (a pixel seen by one tile only is still normalised).
WINDOW_FLOOR = 1e-3
WINDOWS = ("hann", "gaussian")


def window_profile(size: int, kind: str = "hann", *, at_start: bool = False, at_end: bool = False,
                   sigma_scale: float = 0.125) -> np.ndarray:
    """1-D blending weights along one side of a tile, ``(size,)`` float32, maximum 1.

    Parameters
    ----------
    size : int
        Tile side.
    kind : {"hann", "gaussian"}
        ``"hann"``: ``sin^2(pi (i + 0.5) / size)``, zero slope at the centre and
        near-zero weight at the border. ``"gaussian"``: MONAI's importance map,
        ``exp(-(i - c)^2 / (2 (sigma_scale size)^2))``.
    at_start, at_end : bool
        The tile touches the image border on that side. Its weights are then
        kept at 1 from the centre to that border: there the network saw the same
        (zero) padding a whole-image prediction sees, so those pixels are
        trustworthy, and no other tile may be there to take over.
    sigma_scale : float
        Gaussian sigma as a fraction of ``size``.
    """
    i = np.arange(size, dtype=np.float64)
    if kind == "hann":
        profile = np.sin(np.pi * (i + 0.5) / size) ** 2
    elif kind == "gaussian":
        centre, sigma = (size - 1) / 2.0, sigma_scale * size
        profile = np.exp(-((i - centre) ** 2) / (2.0 * sigma**2))
    else:
        raise ValueError(f"window: expected one of {WINDOWS}, received {kind!r}")
    profile /= profile.max()
    half = size // 2
    if at_start:
        profile[:half] = 1.0
    if at_end:
        profile[half:] = 1.0
    return np.maximum(profile, WINDOW_FLOOR).astype(np.float32)


def window_2d(size: int, kind: str = "hann", **kwargs: float) -> np.ndarray:
    """Separable 2-D window ``(size, size)`` of an interior tile (see :func:`window_profile`)."""
    profile = window_profile(size, kind, **kwargs)
    return np.outer(profile, profile)


def tile_profiles(plan: TilePlan, row: int, col: int) -> tuple[tuple[bool, bool], tuple[bool, bool]]:
    """Which image borders grid tile ``(row, col)`` touches: ``((top, bottom), (left, right))``."""
    y, x = plan.origin(row, col)
    size = plan.tile_size
    return (y == 0, y + size >= plan.shape[0]), (x == 0, x + size >= plan.shape[1])


@dataclass
class _Block:
    """Accumulator for rows ``[top, top + data.shape[1])`` of one column block."""

    top: int
    data: np.ndarray


class TileBlender:
    """Accumulate weighted tile predictions and emit finished pixels.

    Parameters
    ----------
    plan : TilePlan
        The tile grid; tiles must be added in the plan's row-major order.
    n_channels : int
        Channels of each tile (classes).
    on_final : callable
        ``on_final(y0, x0, acc)`` receives a finished part of the image, with
        ``acc`` of shape ``(n_channels, h, w)`` holding weighted sums (divide by
        ``acc.sum(0)`` for probabilities; 0 where no tile was predicted). The
        array is only valid during the call.
    """

    def __init__(
        self,
        plan: TilePlan,
        n_channels: int,
        on_final: Callable[[int, int, np.ndarray], None],
    ) -> None:
        self.plan = plan
        self.n_channels = int(n_channels)
        self.on_final = on_final
        self.block_width = plan.chunks[1]
        self.blocks: dict[int, _Block] = {}
        self.peak_bytes = 0
        #: Every row above this one has been handed to ``on_final``.
        self.done_rows = 0
        self._last: tuple[int, int] | None = None
        self._next_x = self._next_kept_x(plan)

    @staticmethod
    def _next_kept_x(plan: TilePlan) -> dict[tuple[int, int], int]:
        """For each kept tile, where the next kept tile in its row starts (or the width)."""
        following: dict[tuple[int, int], int] = {}
        width = plan.shape[1]
        for row in range(plan.keep.shape[0]):
            cols = np.nonzero(plan.keep[row])[0]
            for k, col in enumerate(cols):
                following[(row, int(col))] = int(plan.xs[cols[k + 1]]) if k + 1 < len(cols) else width
        return following

    def add(self, row: int, col: int, tile: np.ndarray) -> None:
        """Add the weighted prediction ``tile`` (``(C, T, T)``) of grid tile ``(row, col)``."""
        plan = self.plan
        if self._last is not None and (row, col) <= self._last:
            raise ValueError(f"tiles must be added in row-major order: ({row}, {col}) after {self._last}")
        if self._last is None or row != self._last[0]:
            self._finalise_all(int(plan.ys[row]))
        self._last = (row, col)
        y, x = plan.origin(row, col)
        height, width = plan.shape
        y_end, x_end = min(y + plan.tile_size, height), min(x + plan.tile_size, width)
        size = self.block_width
        for c in range(x // size, (x_end - 1) // size + 1):
            bx0, bx1 = max(x, c * size), min(x_end, (c + 1) * size)
            block = self._ensure(c, y, y_end)
            block.data[:, y - block.top : y_end - block.top, bx0 - c * size : bx1 - c * size] += tile[
                :, : y_end - y, bx0 - x : bx1 - x
            ]
        self.peak_bytes = max(self.peak_bytes, sum(block.data.nbytes for block in self.blocks.values()))
        # Blocks left of the next tile in this row are done down to the next grid row.
        next_x = self._next_x[(row, col)]
        next_y = int(plan.ys[row + 1]) if row + 1 < len(plan.ys) else height
        for c in [c for c in self.blocks if (c + 1) * size <= next_x]:
            self._finalise(c, next_y)

    def finish(self) -> None:
        """Emit everything still held (call once, after the last tile)."""
        self._finalise_all(self.plan.shape[0])

    def _ensure(self, c: int, y: int, y_end: int) -> _Block:
        block = self.blocks.get(c)
        width = min(self.block_width, self.plan.shape[1] - c * self.block_width)
        if block is None:
            block = _Block(y, np.zeros((self.n_channels, y_end - y, width), np.float32))
            self.blocks[c] = block
        elif block.top + block.data.shape[1] < y_end:
            grown = np.zeros((self.n_channels, y_end - block.top, width), np.float32)
            grown[:, : block.data.shape[1]] = block.data
            block.data = grown
        return block

    def _finalise(self, c: int, upto: int) -> None:
        block = self.blocks[c]
        held = block.data.shape[1]
        n = min(upto, block.top + held) - block.top
        if n > 0:
            self.on_final(block.top, c * self.block_width, block.data[:, :n])
        if n >= held:
            del self.blocks[c]
        elif n > 0:
            block.data = block.data[:, n:].copy()
            block.top += n

    def _finalise_all(self, upto: int) -> None:
        for c in sorted(self.blocks):
            self._finalise(c, upto)
        self.done_rows = max(self.done_rows, upto)
