"""Per-nucleus measurements a pathologist uses, and a summary per slide (no Qt).

:func:`measure_nuclei` turns a nucleus label image into a table (a dict of
equal-length NumPy columns, the format of :func:`skimage.measure.regionprops_table`)
in physical units: centroid (µm, slide coordinates), area (µm²), perimeter and
equivalent diameter (µm), eccentricity, solidity, and the mean haematoxylin
optical density of the nucleus (colour deconvolution, :func:`skimage.color.rgb2hed`).
:func:`summarise` gives the nucleus count, the density per mm² of tissue and
the size distribution; :func:`write_csv` writes the table.
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
    from skimage.measure import regionprops_table

    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ValueError(f"measure_nuclei: expected a 2-D integer label image, received {labels.shape} {labels.dtype}")
    if not (isinstance(mpp, (int, float)) and mpp > 0):
        raise ValueError(f"measure_nuclei: mpp must be a positive number, received {mpp!r}")
    intensity = None
    if rgb is not None:
        from skimage.color import rgb2hed

        rgb = np.asarray(rgb)
        if rgb.shape[:2] != labels.shape or rgb.ndim != 3 or rgb.shape[2] < 3:
            raise ValueError(f"measure_nuclei: rgb shape {rgb.shape} does not match labels {labels.shape}")
        intensity = rgb2hed(rgb[..., :3])[..., 0]
    properties = ["label", "centroid", "area", "perimeter", "equivalent_diameter_area", "eccentricity", "solidity"]
    if intensity is not None:
        properties.append("intensity_mean")
    table = regionprops_table(labels, intensity_image=intensity, properties=properties)
    n = len(table["label"])
    return {
        "label": table["label"].astype(np.int64),
        "centroid_y_um": table["centroid-0"] * mpp + origin_um[0],
        "centroid_x_um": table["centroid-1"] * mpp + origin_um[1],
        "area_um2": table["area"] * mpp * mpp,
        "perimeter_um": table["perimeter"] * mpp,
        "equivalent_diameter_um": table["equivalent_diameter_area"] * mpp,
        "eccentricity": table["eccentricity"],
        "solidity": table["solidity"],
        "mean_haematoxylin_od": table["intensity_mean"] if intensity is not None else np.full(n, np.nan),
    }


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
    """:func:`measure_nuclei` over a slide-sized label image, one window at a time.

    Each window is read with a margin of ``halo_um`` (more than a nucleus) so
    every nucleus is measured whole, by the window that holds its centroid.

    Parameters
    ----------
    labels : array-like
        ``(H, W)`` nucleus labels (NumPy, zarr or dask; read by slices).
    mpp : float
        Micrometres per pixel of ``labels``.
    read_rgb : callable, optional
        ``read_rgb(top, left, bottom, right) -> (h, w, 3) uint8`` on the label
        grid, for the staining column.
    origin_um : (float, float)
        Slide position of ``labels[0, 0]`` in micrometres.
    window : int
        Window edge in pixels.
    halo_um : float
        Margin in micrometres.
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
