"""Polygon regions to segment: from GeoJSON (QuPath) or napari shapes, rasterised on any grid.

Coordinates are level-0 pixels of the slide in QuPath's convention: pixel
``(r, c)`` covers ``[r, r + 1) x [c, c + 1)``, so its centre is at
``(r + 0.5, c + 0.5)``. A pixel of any grid belongs to the region when its
centre lies inside a polygon (even-odd rule, so holes are holes). No Qt here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Rows rasterised at once: bounds the ``rows x edges`` crossing table.
_SCAN_ROWS = 256


@dataclass(frozen=True)
class PolygonRegion:
    """Polygons as closed rings: ``(N, 2)`` float ``(y, x)`` vertices of every ring, exteriors and
    holes alike (the even-odd rule makes a ring inside another a hole)."""

    rings: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        rings = tuple(np.asarray(r, dtype=float).reshape(-1, 2) for r in self.rings)
        if not rings or any(len(r) < 3 for r in rings):
            raise ValueError("region: expected polygons with at least 3 vertices each")
        if not all(np.isfinite(r).all() for r in rings):
            raise ValueError("region: polygon coordinates must be finite numbers")
        object.__setattr__(self, "rings", rings)

    @classmethod
    def from_yx(cls, polygons: Iterable[Sequence[Sequence[float]]]) -> PolygonRegion:
        """Region from polygons given as ``(y, x)`` vertex lists (no holes)."""
        return cls(tuple(np.asarray(p, dtype=float) for p in polygons))

    def bounds(self) -> tuple[int, int, int, int]:
        """Level-0 ``(y0, x0, y1, x1)`` rectangle enclosing every polygon (the engine's region)."""
        points = np.concatenate(self.rings)
        (ymin, xmin), (ymax, xmax) = points.min(axis=0), points.max(axis=0)
        return (math.floor(ymin), math.floor(xmin), math.ceil(ymax), math.ceil(xmax))

    def mask(self, shape: tuple[int, int], *, downsample: tuple[float, float] = (1.0, 1.0),
             origin: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Boolean ``(height, width)`` mask of the grid pixels whose centre lies inside the region.

        ``downsample`` is the ``(y, x)`` level-0 pixels per grid pixel (a label map's), ``origin``
        the ``(row, col)`` of the mask's first pixel in the grid (a window of a large map).
        """
        dy, dx = downsample
        # Grid pixel (i, j) has its centre at level-0 ((i + 0.5) dy, (j + 0.5) dx):
        # in grid units, with centres on integers, a vertex v becomes v / d - 0.5.
        return rasterise([np.column_stack([r[:, 0] / dy - 0.5 - origin[0], r[:, 1] / dx - 0.5 - origin[1]])
                          for r in self.rings], shape)


def ellipse_polygon(corners: np.ndarray, n_vertices: int = 128) -> np.ndarray:
    """``(n_vertices, 2)`` polygon approximating the ellipse inscribed in a (possibly rotated) box,
    given by its ``(4, 2)`` corners in order (as napari stores an ellipse shape)."""
    corners = np.asarray(corners, dtype=float)
    centre = corners.mean(axis=0)
    half_u, half_v = (corners[1] - corners[0]) / 2, (corners[3] - corners[0]) / 2
    angles = np.linspace(0.0, 2 * np.pi, n_vertices, endpoint=False)[:, None]
    return centre + np.cos(angles) * half_u + np.sin(angles) * half_v


def rasterise(rings: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of ``(y, x)`` rings on a grid whose pixel centres are at integers.

    A scanline fill: for each row, where the rings' edges cross the line
    through its pixel centres, then toggles between crossings. Its cost grows
    with ``rows x edges + pixels``, not ``pixels x edges`` as a point-in-polygon
    test per pixel would, which matters for hand-drawn outlines with thousands
    of vertices over whole-slide label maps.
    """
    height, width = int(shape[0]), int(shape[1])
    out = np.zeros((height, width), dtype=bool)
    if height == 0 or width == 0 or not rings:
        return out
    starts = np.concatenate([np.asarray(r, dtype=float) for r in rings])
    ends = np.concatenate([np.roll(np.asarray(r, dtype=float), -1, axis=0) for r in rings])
    keep = starts[:, 0] != ends[:, 0]  # horizontal edges never cross a scanline
    y_a, x_a, y_b, x_b = starts[keep, 0], starts[keep, 1], ends[keep, 0], ends[keep, 1]
    if y_a.size == 0:
        return out
    ymin, ymax = np.minimum(y_a, y_b), np.maximum(y_a, y_b)
    first = max(int(math.ceil(ymin.min())), 0)
    last = min(int(math.ceil(ymax.max())), height)  # rows r < ymax only (half-open)
    for top in range(first, last, _SCAN_ROWS):
        rows = np.arange(top, min(top + _SCAN_ROWS, last), dtype=float)[:, None]
        # Half-open in y so a vertex shared by two edges is crossed once.
        crosses = (ymin <= rows) & (rows < ymax)
        r_index, e_index = np.nonzero(crosses)
        if r_index.size == 0:
            continue
        t = (rows[r_index, 0] - y_a[e_index]) / (y_b[e_index] - y_a[e_index])
        x = x_a[e_index] + t * (x_b[e_index] - x_a[e_index])
        # The first pixel centre at or right of a crossing is where "inside" flips.
        cols = np.clip(np.ceil(x), 0, width).astype(np.int64)
        toggles = np.zeros((rows.shape[0], width + 1), dtype=np.int32)
        np.add.at(toggles, (r_index, cols), 1)
        out[top : top + rows.shape[0]] = (np.cumsum(toggles[:, :width], axis=1) & 1).astype(bool)
    return out


def mask_outside(labels, region: PolygonRegion, downsample: tuple[float, float]) -> int:
    """Set the pixels of a writable ``(H, W)`` label map outside ``region`` to 0, chunk by chunk;
    returns how many labelled pixels were cleared.

    Pixel ``(i, j)`` covers level-0 pixels ``[i dy, (i + 1) dy) x [j dx, (j + 1) dx)`` with
    ``(dy, dx) = downsample``.
    """
    height, width = (int(s) for s in labels.shape)
    chunk_h, chunk_w = (int(c) for c in getattr(labels, "chunks", None) or (1024, 1024))
    y0, x0, y1, x1 = region.bounds()
    # Everything beyond the region's bounding box (plus a pixel of rounding) is
    # already 0: the engine only writes labels inside its rectangle.
    top = max(int(y0 // downsample[0]) - 1, 0)
    bottom = min(int(math.ceil(y1 / downsample[0])) + 1, height)
    left = max(int(x0 // downsample[1]) - 1, 0)
    right = min(int(math.ceil(x1 / downsample[1])) + 1, width)
    cleared = 0
    for cy in range((top // chunk_h) * chunk_h, bottom, chunk_h):
        for cx in range((left // chunk_w) * chunk_w, right, chunk_w):
            window = (slice(cy, min(cy + chunk_h, height)), slice(cx, min(cx + chunk_w, width)))
            block = np.asarray(labels[window])
            if not block.any():
                continue
            outside = ~region.mask(block.shape, downsample=downsample, origin=(cy, cx)) & (block != 0)
            if outside.any():
                cleared += int(outside.sum())
                block = block.copy()
                block[outside] = 0
                labels[window] = block
    return cleared


# --------------------------------------------------------------------------- GeoJSON


def region_from_geojson(source: str | os.PathLike | dict | list) -> PolygonRegion:
    """Every Polygon and MultiPolygon in a GeoJSON file or object, as one region.

    Accepts a geometry, a Feature, a FeatureCollection, or a JSON list of
    features (what older QuPath versions export). Coordinates are ``[x, y]``
    level-0 pixels, as QuPath writes them; other geometry types are ignored.

    Raises
    ------
    ValueError
        The file is not JSON, or holds no polygon.
    FileNotFoundError
        ``source`` is a path that does not exist.
    """
    name = "GeoJSON"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = path.name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name}: not a GeoJSON file ({exc.msg} at line {exc.lineno})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{name}: not a GeoJSON file (not UTF-8 text)") from None
    else:
        data = source
    rings: list[np.ndarray] = []
    for geometry in _geometries(data):
        kind = geometry.get("type")
        coordinates = geometry.get("coordinates")
        polygons = [coordinates] if kind == "Polygon" else coordinates if kind == "MultiPolygon" else []
        for polygon in polygons or []:
            for ring in polygon:
                xy = np.asarray(ring, dtype=float)
                if xy.ndim != 2 or xy.shape[1] < 2:
                    raise ValueError(f"{name}: expected polygon rings of [x, y] pairs")
                if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
                    xy = xy[:-1]  # GeoJSON repeats the first vertex to close a ring
                rings.append(xy[:, [1, 0]])
    if not rings:
        raise ValueError(f"{name}: expected at least one Polygon or MultiPolygon geometry, found none")
    try:
        return PolygonRegion(tuple(rings))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _geometries(data) -> Iterable[dict]:
    if isinstance(data, list):
        for item in data:
            yield from _geometries(item)
    elif isinstance(data, dict):
        kind = data.get("type")
        if kind == "FeatureCollection":
            yield from _geometries(data.get("features") or [])
        elif kind == "Feature":
            if data.get("geometry"):
                yield from _geometries(data["geometry"])
        elif kind == "GeometryCollection":
            yield from _geometries(data.get("geometries") or [])
        elif kind in ("Polygon", "MultiPolygon"):
            yield data
