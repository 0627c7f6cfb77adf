"""Per-nucleus measurements a pathologist uses, and a summary per slide (no Qt).

:func:`measure_nuclei` turns a nucleus label image into a table (a dict of equal-length
columns, as :func:`skimage.measure.regionprops_table`) in physical units, with the mean
haematoxylin optical density (:func:`skimage.color.rgb2hed`). The columns equal
:func:`skimage.measure.regionprops`' values; all but ``solidity`` (a convex hull per
nucleus, from ``regionprops_table``) are computed for every nucleus at once with
:func:`numpy.bincount`, which is what makes measuring a whole slide's nuclei affordable
(regionprops spends most of its time in per-region Python).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .inference.instances import HALO_UM

#: Columns of :func:`measure_nuclei`, in order.
COLUMNS = (
    "label", "centroid_y_um", "centroid_x_um", "area_um2", "perimeter_um", "equivalent_diameter_um",
    "eccentricity", "solidity", "mean_haematoxylin_od",
)  # fmt: skip


def measure_nuclei(
    labels: np.ndarray,
    mpp: float,
    *,
    rgb: np.ndarray | None = None,
    origin_um: tuple[float, float] = (0.0, 0.0),
) -> dict[str, np.ndarray]:
    """Measurements of every nucleus of ``labels``.

    Parameters
    ----------
    labels : numpy.ndarray of int
        ``(h, w)`` nucleus labels (0 background).
    mpp : float
        Micrometres per pixel of ``labels`` (square pixels).
    rgb : numpy.ndarray, optional
        ``(h, w, 3)`` uint8 H&E image on the same pixel grid, for the staining
        column (NaN without it).
    origin_um : (float, float)
        Slide position of ``labels[0, 0]`` in micrometres ``(y, x)``.

    Returns
    -------
    dict of str to numpy.ndarray
        One entry per column of :data:`COLUMNS`, one row per nucleus.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ValueError(f"measure_nuclei: expected a 2-D integer label image, received {labels.shape} {labels.dtype}")
    if not (isinstance(mpp, (int, float)) and mpp > 0):
        raise ValueError(f"measure_nuclei: mpp must be a positive number, received {mpp!r}")
    if rgb is not None:
        rgb = np.asarray(rgb)
        if rgb.shape[:2] != labels.shape or rgb.ndim != 3 or rgb.shape[2] < 3:
            raise ValueError(f"measure_nuclei: rgb shape {rgb.shape} does not match labels {labels.shape}")
    rows, cols = np.nonzero(labels)
    ids, index = _compact_ids(labels[rows, cols])
    n = len(ids)
    area = np.bincount(index, minlength=n).astype(float)
    mean_row = _per_object_mean(index, rows, area)
    mean_col = _per_object_mean(index, cols, area)
    haematoxylin = np.full(n, np.nan)
    if rgb is not None and n:
        from skimage.color import rgb2hed

        # Colour deconvolution is per pixel: the nuclei's pixels alone give the same values.
        haematoxylin = _per_object_mean(index, rgb2hed(rgb[rows, cols, :3][None])[0, :, 0], area)
    return {
        "label": ids.astype(np.int64),
        "centroid_y_um": mean_row * mpp + origin_um[0],
        "centroid_x_um": mean_col * mpp + origin_um[1],
        "area_um2": area * mpp * mpp,
        "perimeter_um": _perimeters(labels, rows, cols, index, n) * mpp,
        "equivalent_diameter_um": np.sqrt(4 * area / np.pi) * mpp,
        "eccentricity": _eccentricities(index, rows, cols, mean_row, mean_col, area),
        "solidity": area / _convex_areas(labels, ids),
        "mean_haematoxylin_od": haematoxylin,
    }


def _compact_ids(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct ``values`` and, for every value, its position among them.

    Labels in a window are mostly a compact range of ids: a count over the
    range avoids sorting every pixel; scattered ids fall back to a sort.
    """
    if values.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.intp)
    low, high = int(values.min()), int(values.max())
    if high - low > 4 * values.size + 4096:
        return np.unique(values, return_inverse=True)
    shifted = (values - low).astype(np.intp, copy=False)
    present = np.bincount(shifted, minlength=high - low + 1) > 0
    position = np.cumsum(present) - 1
    return np.flatnonzero(present) + low, position[shifted]


def _per_object_mean(index: np.ndarray, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.bincount(index, weights=values, minlength=len(counts)) / counts


def _eccentricities(index, rows, cols, mean_row, mean_col, area) -> np.ndarray:
    """Eccentricity of the ellipse with the same second moments, as :func:`skimage.measure.regionprops`."""
    n = len(area)
    dy, dx = rows - mean_row[index], cols - mean_col[index]
    var_row = np.bincount(index, weights=dy * dy, minlength=n) / area
    var_col = np.bincount(index, weights=dx * dx, minlength=n) / area
    covariance = np.bincount(index, weights=dy * dx, minlength=n) / area
    half_sum, half_difference = (var_row + var_col) / 2, (var_row - var_col) / 2
    root = np.sqrt(half_difference**2 + covariance**2)
    major, minor = np.clip(half_sum + root, 0, None), np.clip(half_sum - root, 0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(major > 0, np.sqrt(np.clip(1 - minor / major, 0, None)), 0.0)


#: Weight of every neighbourhood code of :func:`skimage.measure.perimeter` (4-connected border).
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2


def _perimeters(labels, rows, cols, index, n) -> np.ndarray:
    """:func:`skimage.measure.perimeter` of every object at once (as regionprops gives it).

    A border pixel is an object pixel with a 4-neighbour outside the object;
    each border pixel's code counts the border pixels of the same object
    around it (2 per side neighbour, 10 per corner neighbour), and the code's
    weight is its share of the outline.
    """
    padded = np.pad(labels, 1)
    height, width = labels.shape

    def shifted(array, dy, dx):
        return array[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    sides, corners = ((-1, 0), (1, 0), (0, -1), (0, 1)), ((-1, -1), (-1, 1), (1, -1), (1, 1))
    border = np.zeros(labels.shape, bool)
    for dy, dx in sides:
        border |= shifted(padded, dy, dx) != labels
    border &= labels != 0
    padded_border = np.pad(border, 1)
    code = border.astype(np.uint8)
    for weight, offsets in ((2, sides), (10, corners)):
        for dy, dx in offsets:
            same = shifted(padded_border, dy, dx) & (shifted(padded, dy, dx) == labels)
            code += weight * same.astype(np.uint8)
    return np.bincount(index, weights=_PERIMETER_WEIGHTS[code[rows, cols]], minlength=n)


def _convex_areas(labels, ids) -> np.ndarray:
    """Pixels of every object's convex hull (:func:`skimage.measure.regionprops` ``area_convex``)."""
    from skimage.measure import regionprops_table

    if len(ids) == 0:
        return np.zeros(0)
    table = regionprops_table(labels, properties=("label", "area_convex"))
    order = np.searchsorted(table["label"], ids)
    return np.asarray(table["area_convex"], dtype=float)[order]


def summarise(table: dict[str, np.ndarray], tissue_area_um2: float | None) -> dict[str, float | int | None]:
    """Nucleus count, density per mm² of tissue and the size distribution of a table."""
    areas = np.asarray(table["area_um2"], dtype=float)
    count = int(areas.size)
    tissue_mm2 = None if not tissue_area_um2 else float(tissue_area_um2) / 1e6
    out: dict[str, float | int | None] = {
        "nuclei": count,
        "tissue_area_mm2": tissue_mm2,
        "density_per_mm2": (count / tissue_mm2) if tissue_mm2 else None,
    }
    for name, q in (("area_um2_p10", 10), ("area_um2_median", 50), ("area_um2_p90", 90)):
        out[name] = float(np.percentile(areas, q)) if count else None
    out["area_um2_mean"] = float(areas.mean()) if count else None
    return out


def write_csv(table: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write the table as CSV (header: :data:`COLUMNS`); return the path."""
    path = Path(path)
    rows = len(table["label"])
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for i in range(rows):
            writer.writerow([int(table["label"][i]), *(f"{float(table[c][i]):.6g}" for c in COLUMNS[1:])])
    return path


def measure_nuclei_tiled(
    labels,
    mpp: float,
    *,
    read_rgb=None,
    origin_um: tuple[float, float] = (0.0, 0.0),
    window: int = 2048,
    halo_um: float = HALO_UM,
) -> dict[str, np.ndarray]:
    """:func:`measure_nuclei` over a slide-sized label image (read by slices), one window at a time.

    Each ``window``-pixel window is read with a margin of ``halo_um`` (more than a nucleus) so
    every nucleus is measured whole, by the window that holds its centroid. ``read_rgb(top,
    left, bottom, right)`` gives the ``(h, w, 3)`` uint8 image on the label grid, for the
    staining column; ``origin_um`` is the slide position of ``labels[0, 0]``.
    """
    from .inference.instances import windows

    height, width = (int(n) for n in labels.shape[-2:])
    parts: list[dict[str, np.ndarray]] = []
    for (y0, x0, y1, x1), (top, left, bottom, right) in windows(height, width, window, int(np.ceil(halo_um / mpp))):
        block = np.asarray(labels[top:bottom, left:right])
        if not block.any():
            continue
        rgb = read_rgb(top, left, bottom, right) if read_rgb is not None else None
        origin = (origin_um[0] + top * mpp, origin_um[1] + left * mpp)
        table = measure_nuclei(block.astype(np.int64, copy=False), mpp, rgb=rgb, origin_um=origin)
        cy = (table["centroid_y_um"] - origin_um[0]) / mpp
        cx = (table["centroid_x_um"] - origin_um[1]) / mpp
        own = (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)
        parts.append({k: v[own] for k, v in table.items()})
    if not parts:
        return measure_nuclei(np.zeros((1, 1), np.int64), mpp)
    merged = {k: np.concatenate([p[k] for p in parts]) for k in COLUMNS}
    order = np.argsort(merged["label"], kind="stable")
    return {k: v[order] for k, v in merged.items()}
