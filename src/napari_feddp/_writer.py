"""npe2 writer: a napari Labels layer -> pyramidal OME-TIFF in micrometres."""

from __future__ import annotations

from .export import write_ome_labels


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Write a Labels layer; its ``scale`` is taken as micrometres per pixel.

    Parameters
    ----------
    path : str
        Output file (``.ome.tif`` or ``.ome.tiff``).
    data : array-like or sequence of array-like
        What napari hands over: a numpy, dask or zarr array for a single-scale
        layer, ``MultiScaleData`` (or a list or tuple of levels) for a
        multiscale one. Level 0 is written, with a pyramid rebuilt from it.
    meta : dict
        The layer's attributes (``name``, ``scale``, ``units``, ``metadata``).
        A FedDP segmentation shown in part carries ``metadata["origin"]``, the
        ``(row, col)`` of its first pixel in the full label map: the file then
        starts at the map's origin, so it overlays the slide like the layer.

    Returns
    -------
    list of str
        The written file.

    Notes
    -----
    The physical size is recorded only when the layer is in micrometres
    (``units``) or carries ``mpp`` in its FedDP metadata; a layer in pixel units
    is written without a physical size rather than with a wrong one.
    """
    mpp = _layer_mpp(meta)
    origin = (meta.get("metadata") or {}).get("origin") or (0, 0)
    written = write_ome_labels(path, data, mpp=mpp, name=meta.get("name") or "labels", offset=tuple(origin))
    return [str(written)]


def _layer_mpp(meta: dict) -> tuple[float, float] | None:
    feddp = (meta.get("metadata") or {}).get("feddp") or {}
    if feddp.get("mpp"):
        dy, dx = (meta.get("scale") or (1.0, 1.0))[-2:]
        return (float(dy), float(dx))
    units = meta.get("units")
    scale = meta.get("scale")
    if scale is not None and units is not None and all(
        str(u) in ("micrometer", "µm", "um", "micron") for u in tuple(units)[-2:]
    ):
        return (float(scale[-2]), float(scale[-1]))
    return None
