"""Label map -> GeoJSON FeatureCollection that QuPath imports (one polygon per object).

:func:`labels_to_features` exports a class map (one polygon per connected
object of each class); :func:`nuclei_to_features` an instance label map (one
polygon per nucleus id, with its measurements).

Coordinates are level-0 pixels of the slide (QuPath's image space), whatever the
resolution the label map was computed at. The label map is processed in strips
of rows so that memory stays bounded for whole-slide outputs.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours

from .._atomic import atomic_path

#: Rows of the label map processed at once.
STRIP_ROWS = 2048
#: Extra rows read below each strip so objects crossing its lower edge stay whole
#: (doubled as often as needed for larger objects).
MARGIN_ROWS = 512


def labels_to_features(
    labels,
    *,
    class_names: Sequence[str],
    class_colors: Sequence[str] | None = None,
    downsample: float | tuple[float, float] = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    object_type: str = "detection",
) -> Iterator[dict]:
    """Yield one GeoJSON feature per connected object of every class > 0.

    Parameters
    ----------
    labels : array-like
        ``(Y, X)`` class-index map (numpy, dask or zarr); 0 is background.
    class_names : sequence of str
        Name of each class index (index 0 = background, never exported).
    class_colors : sequence of str, optional
        ``#rrggbb`` colour of each class, written as QuPath's ``classification.color``.
    downsample : float or (float, float)
        ``(y, x)`` size of one label pixel in level-0 pixels.
    offset : (float, float)
        ``(y, x)`` level-0 position of the label map's first pixel.
    object_type : str
        QuPath object type: ``"detection"`` (cells, fast to display) or ``"annotation"``.
    """

    def connected_objects(strip, core_start, core_stop):
        """(class, bounding box, mask) of the connected objects whose first row is in the core rows."""
        for class_index in np.unique(strip):
            if class_index == 0:
                continue
            if class_index >= len(class_names):
                raise ValueError(
                    f"label map contains class {class_index} but only {len(class_names)} "
                    f"class names were given: {list(class_names)}"
                )
            components, _ = ndimage.label(strip == class_index)
            for index, box in enumerate(ndimage.find_objects(components), start=1):
                if box is not None and core_start <= box[0].start < core_stop:
                    yield class_index, box, components[box] == index

    for class_index, ring in _object_rings(labels, connected_objects, downsample, offset):
        yield _feature(ring, {"objectType": object_type,
                              "classification": _classification(class_index, class_names, class_colors)})


def nuclei_to_features(
    labels,
    *,
    table: dict[str, np.ndarray] | None = None,
    class_name: str = "nucleus",
    class_color: str | None = None,
    downsample: float | tuple[float, float] = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
) -> Iterator[dict]:
    """Yield one QuPath detection per nucleus id of an instance label map, with its measurements.

    Parameters
    ----------
    labels : array-like
        ``(Y, X)`` nucleus ids (numpy, dask or zarr); 0 is background. Each id
        is one polygon: the outline of its largest connected piece.
    table : dict of str to numpy.ndarray, optional
        Measurements with a ``"label"`` column (:func:`napari_feddp.measure.measure_nuclei`):
        every other column of a nucleus's row goes into the feature's
        ``measurements`` (QuPath's measurement list; NaN values are left out).
    class_name : str
        QuPath classification of every nucleus.
    class_color : str, optional
        ``#rrggbb`` colour of the classification.
    downsample : float or (float, float)
        ``(y, x)`` size of one label pixel in level-0 pixels.
    offset : (float, float)
        ``(y, x)`` level-0 position of the label map's first pixel.
    """
    classification = _classification(0, [class_name], [class_color] if class_color else None)
    measured = _rows_by_label(table)
    for label, ring in _object_rings(labels, _nuclei_starting_in, downsample, offset):
        properties = {"objectType": "detection", "name": f"nucleus {label}", "classification": classification}
        if measured is not None:
            properties["measurements"] = measured(label)
        yield _feature(ring, properties)


def _object_rings(labels, find_objects, downsample, offset) -> Iterator[tuple[int, np.ndarray]]:
    """``(key, ring)`` of every object, strip by strip, each object once and whole.

    ``find_objects(strip, core_start, core_stop)`` yields ``(key, box, mask)``
    for the objects whose first row is in the strip's core rows; ``ring`` is
    the outline's ``(y, x)`` vertices in level-0 pixels.
    """
    dy, dx = (downsample, downsample) if np.isscalar(downsample) else downsample
    height = labels.shape[0]
    for top in range(0, height, STRIP_ROWS):
        # One row above the strip tells which objects began in the previous
        # strip (they were emitted there); rows below the strip keep objects whole.
        first = max(top - 1, 0)
        core_start = top - first
        core_stop = core_start + STRIP_ROWS
        margin = MARGIN_ROWS
        while True:
            bottom = min(top + STRIP_ROWS + margin, height)
            strip = np.asarray(labels[first:bottom])
            objects = list(find_objects(strip, core_start, core_stop))
            cut = any(box[0].stop == strip.shape[0] for _, box, _ in objects)
            if not cut or bottom == height:
                break
            margin *= 2  # an object runs past the margin: read further down, never cut it
        for key, box, mask in objects:
            ring = _outer_ring(mask)
            ys = (ring[:, 0] + box[0].start + first) * dy + offset[0]
            xs = (ring[:, 1] + box[1].start) * dx + offset[1]
            yield key, np.column_stack([ys, xs])


def _feature(ring: np.ndarray, properties: dict) -> dict:
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": {"type": "Polygon",
                     "coordinates": [[[round(float(x), 2), round(float(y), 2)] for y, x in ring]]},
        "properties": properties,
    }


def _nuclei_starting_in(strip, core_start, core_stop):
    """(id, bounding box, mask) of the nuclei whose first row is in the core rows."""
    strip = np.asarray(strip)
    if strip.dtype.kind not in "iu":
        raise ValueError(f"nucleus labels: expected an integer label image, received dtype {strip.dtype}")
    foreground = strip != 0
    if not foreground.any():
        return
    # find_objects lists every id from 1 to the largest: shift the strip's ids to start at 1.
    low = int(strip[foreground].min()) - 1
    shifted = np.where(foreground, strip - strip.dtype.type(low), 0).astype(strip.dtype, copy=False) if low else strip
    for index, box in enumerate(ndimage.find_objects(shifted), start=1):
        if box is not None and core_start <= box[0].start < core_stop:
            yield low + index, box, shifted[box] == index


def _rows_by_label(table):
    """``measurements(label)``: a nucleus's row of ``table`` as a dict (NaN left out), or None."""
    if table is None:
        return None
    if "label" not in table:
        raise ValueError(f"table: expected a 'label' column, received columns {sorted(table)}")
    labels = np.asarray(table["label"])
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    columns = [(name, np.asarray(values, dtype=float)) for name, values in table.items() if name != "label"]

    def measurements(label: int) -> dict:
        at = int(np.searchsorted(sorted_labels, label))
        if at == len(sorted_labels) or sorted_labels[at] != label:
            return {}
        row = order[at]
        return {name: float(values[row]) for name, values in columns if np.isfinite(values[row])}

    return measurements


def write_geojson(path: str | os.PathLike, labels, **kwargs) -> tuple[Path, int]:
    """Write :func:`labels_to_features` as a FeatureCollection; returns (path, n_features)."""
    return _write_features(path, labels_to_features(labels, **kwargs))


def write_nuclei_geojson(path: str | os.PathLike, labels, **kwargs) -> tuple[Path, int]:
    """Write :func:`nuclei_to_features` as a FeatureCollection; returns (path, n_features)."""
    return _write_features(path, nuclei_to_features(labels, **kwargs))


def _write_features(path: str | os.PathLike, features: Iterator[dict]) -> tuple[Path, int]:
    path = Path(path)
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write('{"type": "FeatureCollection", "features": [\n')
        for feature in features:
            handle.write((",\n" if count else "") + json.dumps(feature))
            count += 1
        handle.write("\n]}\n")
    return path, count


def _classification(index: int, names: Sequence[str], colors: Sequence[str] | None) -> dict:
    result: dict = {"name": str(names[index])}
    if colors is not None and index < len(colors):
        hex_colour = colors[index].lstrip("#")
        result["color"] = [int(hex_colour[i : i + 2], 16) for i in (0, 2, 4)]
    return result


def _outer_ring(mask: np.ndarray) -> np.ndarray:
    """Closed outer boundary of a binary object, through the pixel-edge midpoints.

    ``find_contours`` at level 0.5 on the zero-padded mask traces the line halfway
    between object and background pixel centres; shifting by half a pixel puts it
    on the pixel edges, so rasterising the polygon gives back the object's pixels.
    """
    padded = np.pad(mask.astype(np.uint8), 1)
    contours = find_contours(padded, 0.5)
    # -1 undoes the padding; +0.5 moves each point from between two pixel
    # centres onto their shared edge (QuPath: pixel (r, c) is [c, c+1) x [r, r+1)).
    ring = max(contours, key=len) - 1.0 + 0.5
    if not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])
    return ring
