"""One label per nucleus from a nucleus mask: marker-controlled watershed on the distance map.

Touching nuclei form one connected blob in a foreground mask. Inside a blob
the distance to the background peaks once per roughly convex nucleus; those
peaks, at least a nucleus radius apart, are the markers of a watershed on the
negated (lightly smoothed) distance map, restricted to the mask. Distances are
set in micrometres, so the same defaults hold at any pixel size.
"""

from __future__ import annotations

import numpy as np

#: Smoothing of the distance map before peak finding (µm): removes ridges from jagged borders.
SMOOTHING_UM = 0.25
#: Smallest distance between two nucleus centres (µm): about the radius of a small lymphocyte.
MIN_CENTRE_DISTANCE_UM = 1.5


def split_nuclei(
    mask: np.ndarray,
    mpp: float,
    *,
    smoothing_um: float = SMOOTHING_UM,
    min_centre_distance_um: float = MIN_CENTRE_DISTANCE_UM,
) -> np.ndarray:
    """Instance labels (0 background, 1..N nuclei) from a boolean nucleus mask.

    Parameters
    ----------
    mask : numpy.ndarray of bool
        ``(h, w)`` nucleus mask.
    mpp : float
        Micrometres per pixel of ``mask``.
    smoothing_um, min_centre_distance_um : float
        Gaussian sigma of the distance map and the smallest distance between two
        markers, in micrometres.

    Returns
    -------
    numpy.ndarray of int32
        Every connected component of ``mask`` is one or more nuclei; no pixel
        outside ``mask`` is labelled.
    """
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian
    from skimage.measure import label
    from skimage.segmentation import watershed

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"split_nuclei: expected a 2-D mask, received shape {mask.shape}")
    if not (isinstance(mpp, (int, float)) and mpp > 0):
        raise ValueError(f"split_nuclei: mpp must be a positive number, received {mpp!r}")
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    distance = ndi.distance_transform_edt(mask)
    sigma = smoothing_um / mpp
    if sigma > 0:
        distance = gaussian(distance, sigma=sigma, preserve_range=True)
    blobs = label(mask, connectivity=1)
    min_distance = max(1, int(round(min_centre_distance_um / mpp)))
    # Peaks inside the mask (one label for all blobs: per-blob search is much slower and
    # differs only for peaks of two blobs closer than min_distance, where the blob that
    # loses its peak still becomes a nucleus below).
    peaks = peak_local_max(distance, min_distance=min_distance, labels=mask.astype(np.uint8), exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    # A blob without a peak (too small or flat) still becomes one nucleus: it is its own marker.
    marked = np.zeros(blobs.max() + 1, bool)
    marked[blobs[tuple(peaks.T)]] = True
    marked[0] = True
    new_ids = np.zeros(blobs.max() + 1, np.int32)
    new_ids[~marked] = np.arange(len(peaks) + 1, len(peaks) + 1 + int((~marked).sum()), dtype=np.int32)
    markers = np.where(markers > 0, markers, new_ids[blobs])
    labels = watershed(-distance, markers, mask=mask)
    return labels.astype(np.int32, copy=False)


#: Smallest nucleus interior kept as a marker (µm²); smaller specks of the interior class are noise.
MIN_MARKER_AREA_UM2 = 1.0


def nuclei_from_contours(
    classes: np.ndarray,
    mpp: float,
    *,
    nucleus_class: int = 1,
    contour_class: int = 2,
    min_marker_area_um2: float = MIN_MARKER_AREA_UM2,
) -> np.ndarray:
    """Instance labels (int32, 0 background, 1..N) from a three-class map ``(h, w)`` of
    background, ``nucleus_class`` interiors and ``contour_class`` contours at ``mpp`` µm/px.

    A model that predicts each nucleus's contour separates touching nuclei itself: the
    interiors are disjoint, so each connected interior of at least ``min_marker_area_um2``
    is one nucleus (its marker), and a watershed on the distance to the background gives
    every contour pixel (and smaller interior piece) to the nucleus it borders. Foreground
    without any marker (a small nucleus drawn as contour only) is one nucleus per connected piece.
    """
    from skimage.measure import label
    from skimage.morphology import remove_small_objects

    classes = np.asarray(classes)
    if classes.ndim != 2:
        raise ValueError(f"nuclei_from_contours: expected a 2-D class map, received shape {classes.shape}")
    if not (isinstance(mpp, (int, float)) and mpp > 0):
        raise ValueError(f"nuclei_from_contours: mpp must be a positive number, received {mpp!r}")
    foreground = (classes == nucleus_class) | (classes == contour_class)
    if not foreground.any():
        return np.zeros(classes.shape, np.int32)
    min_size = max(1, int(round(min_marker_area_um2 / mpp**2)))
    interior = remove_small_objects(classes == nucleus_class, max_size=min_size - 1) if min_size > 1 \
        else classes == nucleus_class
    return grow_markers(label(interior, connectivity=1).astype(np.int32), foreground)


def grow_markers(markers: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Instance labels (int32) grown from ``markers`` (int, 0: none) over the boolean ``foreground``
    by a watershed on the distance to the background; a foreground piece holding no marker
    becomes one nucleus of its own."""
    from scipy import ndimage as ndi
    from skimage.measure import label
    from skimage.segmentation import watershed

    count = int(markers.max())
    pieces = label(foreground, connectivity=1)
    unmarked = np.setdiff1d(np.unique(pieces[foreground]), np.unique(pieces[markers > 0]))
    if unmarked.size:
        extra = np.zeros(int(pieces.max()) + 1, np.int32)
        extra[unmarked] = np.arange(count + 1, count + 1 + unmarked.size, dtype=np.int32)
        markers = np.where(markers > 0, markers, extra[pieces])
    distance = ndi.distance_transform_edt(foreground)
    return watershed(-distance, markers, mask=foreground).astype(np.int32, copy=False)


#: Pieces of nucleus foreground smaller than this (µm²) are model noise, not nuclei: a
#: lymphocyte, the smallest nucleus, is about 5 µm across (20 µm²).
MIN_NUCLEUS_AREA_UM2 = 3.0


def nuclei_from_classes(
    classes: np.ndarray,
    mpp: float,
    *,
    nucleus_class: int = 1,
    contour_class: int | None = None,
    min_area_um2: float = MIN_NUCLEUS_AREA_UM2,
    smoothing_um: float = SMOOTHING_UM,
    min_centre_distance_um: float = MIN_CENTRE_DISTANCE_UM,
) -> np.ndarray:
    """One label per nucleus from a class map: what the product shows as nuclei.

    Foreground pieces smaller than ``min_area_um2`` are dropped as noise; then, with a
    ``contour_class`` (see :func:`contour_class_of`), :func:`nuclei_from_contours`; without
    (a foreground-only model), :func:`split_nuclei` on the nucleus class (``smoothing_um``,
    ``min_centre_distance_um``: its parameters).
    """
    from skimage.morphology import remove_small_objects

    classes = np.asarray(classes)
    min_pixels = round(min_area_um2 / mpp**2)
    if min_pixels > 1:  # foreground pieces smaller than that become background
        mask = np.isin(classes, (nucleus_class,) if contour_class is None else (nucleus_class, contour_class))
        specks = mask & ~remove_small_objects(mask, max_size=min_pixels - 1)
        if specks.any():
            classes = np.where(specks, 0, classes).astype(classes.dtype, copy=False)
    if contour_class is None:
        return split_nuclei(classes == nucleus_class, mpp, smoothing_um=smoothing_um,
                            min_centre_distance_um=min_centre_distance_um)
    return nuclei_from_contours(classes, mpp, nucleus_class=nucleus_class, contour_class=contour_class)


def contour_class_of(class_names) -> int | None:
    """Index of the ``"contour"`` class in a model's class names, or None (a foreground-only model)."""
    names = [str(n).lower() for n in (class_names or ())]
    return names.index("contour") if "contour" in names else None


#: Margin read around each window (µm): larger than any nucleus, so a nucleus owned by a
#: window is never cut by the window's edge.
HALO_UM = 16.0


def windows(height: int, width: int, window: int, halo: int):
    """Tiles of a ``(height, width)`` image with a margin: ``(core, padded)`` rectangles.

    Yields ``((y0, x0, y1, x1), (top, left, bottom, right))``: the window itself and
    the window grown by ``halo`` pixels on every side, clipped to the image. Whatever
    is computed on the padded rectangle is kept only for objects centred in the core,
    so every object is handled once and whole.
    """
    for y0 in range(0, height, window):
        for x0 in range(0, width, window):
            y1, x1 = min(y0 + window, height), min(x0 + window, width)
            yield (y0, x0, y1, x1), (max(0, y0 - halo), max(0, x0 - halo), min(height, y1 + halo),
                                     min(width, x1 + halo))


def label_nuclei_tiled(
    classes,
    mpp: float,
    *,
    out=None,
    window: int = 2048,
    halo_um: float = HALO_UM,
    nucleus_class: int = 1,
    contour_class: int | None = None,
    min_area_um2: float = MIN_NUCLEUS_AREA_UM2,
) -> np.ndarray:
    """Slide-wide nucleus labels from a (chunked) class map, one window at a time.

    Each ``window``-pixel window is read with a margin of ``halo_um`` on every side and split
    into nuclei (:func:`nuclei_from_classes`); a nucleus belongs to the window that holds its
    centroid, so a nucleus cut by a window seam is labelled once, whole, and a piece that looks
    small only because the margin cuts it is never kept. Ids are unique slide-wide
    (consecutive per window). Memory is bounded by one window plus its margin.

    Parameters
    ----------
    classes : array-like
        ``(H, W)`` class indices (NumPy, zarr or dask; read by slices).
    mpp : float
        Micrometres per pixel of ``classes``.
    out : array-like, optional
        ``(H, W)`` integer array written in place (e.g. a zarr array); default a new int32 array.
    nucleus_class, contour_class, min_area_um2
        As :func:`nuclei_from_classes`.

    Returns
    -------
    array-like
        ``out`` (0 background, 1..N nuclei).
    """
    height, width = (int(n) for n in classes.shape[-2:])
    if out is None:
        out = np.zeros((height, width), np.int32)
    from scipy import ndimage as ndi

    next_id = 1
    for (y0, x0, y1, x1), (top, left, bottom, right) in windows(height, width, window, int(np.ceil(halo_um / mpp))):
        block = np.asarray(classes[top:bottom, left:right])
        if not ((block == nucleus_class) | ((block == contour_class) if contour_class is not None else False)).any():
            continue
        labels = nuclei_from_classes(block, mpp, nucleus_class=nucleus_class, contour_class=contour_class,
                                     min_area_um2=min_area_um2)
        count = int(labels.max())
        if not count:
            continue
        # Centroid of every nucleus in the window's coordinates: keep the window's own.
        index = np.arange(1, count + 1)
        centres = np.asarray(ndi.center_of_mass(np.ones_like(labels), labels, index)).reshape(-1, 2)
        cy, cx = centres[:, 0] + top, centres[:, 1] + left
        own = (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)
        new_ids = np.zeros(count + 1, np.int64)
        new_ids[index[own]] = np.arange(next_id, next_id + int(own.sum()))
        next_id += int(own.sum())
        relabelled = new_ids[labels]
        # Earlier windows keep the pixels they labelled (a seam nucleus is theirs).
        current = np.asarray(out[top:bottom, left:right])
        write = (relabelled > 0) & (current == 0)
        if write.any():
            current = current.copy()
            current[write] = relabelled[write]
            out[top:bottom, left:right] = current
    return out
