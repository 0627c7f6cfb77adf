"""Cut an aligned image/mask tile out of two napari layers (no Qt).

The Labels layer a pathologist corrected may live on another grid than the
slide (the segmentation runs at the model's resolution): the mask is resampled
onto the slide's level-0 pixels through world coordinates, nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Largest tile side (level-0 pixels) added in one go; larger views are refused.
MAX_TILE_SIDE = 2048


def aligned_tile(
    image,
    image_scale: Sequence[float],
    image_translate: Sequence[float],
    labels,
    labels_scale: Sequence[float],
    labels_translate: Sequence[float],
    region: tuple[int, int, int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(rgb, mask)`` for ``region`` = level-0 ``(y0, x0, y1, x1)`` of ``image``.

    ``image`` is ``(Y, X, 3)`` and ``labels`` ``(Y, X)`` (numpy, dask or zarr);
    scales and translates are napari's (pixel centre ``i`` at ``translate + i * scale``).
    """
    y0, x0, y1, x1 = _clip(region, image.shape[:2])
    if y1 - y0 > MAX_TILE_SIDE or x1 - x0 > MAX_TILE_SIDE:
        raise ValueError(
            f"region is {x1 - x0} x {y1 - y0} px: zoom in to at most {MAX_TILE_SIDE} x {MAX_TILE_SIDE} "
            "level-0 pixels before adding it to the training set"
        )
    rgb = np.asarray(image[y0:y1, x0:x1])[..., :3]
    rows = _nearest(np.arange(y0, y1), image_scale[-2], image_translate[-2], labels_scale[-2],
                    labels_translate[-2], labels.shape[0])
    cols = _nearest(np.arange(x0, x1), image_scale[-1], image_translate[-1], labels_scale[-1],
                    labels_translate[-1], labels.shape[1])
    if rows is None or cols is None:
        raise ValueError("the Labels layer does not overlap this region of the image")
    block = np.asarray(labels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1])
    mask = block[rows - rows.min()][:, cols - cols.min()]
    return rgb, mask


def _clip(region, shape) -> tuple[int, int, int, int]:
    y0, x0, y1, x1 = (int(round(v)) for v in region)
    y0, x0 = max(y0, 0), max(x0, 0)
    y1, x1 = min(y1, shape[0]), min(x1, shape[1])
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"region {tuple(region)} lies outside the image ({shape[1]} x {shape[0]} px)")
    return y0, x0, y1, x1


def _nearest(index, scale_from, translate_from, scale_to, translate_to, size):
    world = translate_from + index * scale_from
    target = np.rint((world - translate_to) / scale_to).astype(np.int64)
    if target.max() < 0 or target.min() >= size:
        return None
    return np.clip(target, 0, size - 1)
