"""npe2 writer: a napari Labels layer -> pyramidal OME-TIFF in micrometres."""

from __future__ import annotations

from .export import write_ome_labels

_MICRONS = ("micrometer", "µm", "um", "micron")


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Write a Labels layer (level 0 of a multiscale one, with a rebuilt pyramid) as OME-TIFF.

    The physical size is the layer's ``scale`` when it is in micrometres (``units``, or ``mpp``
    in its FedDP metadata); a layer in pixel units is written without one rather than a wrong
    one. A FedDP segmentation shown in part carries ``metadata["origin"]``, the ``(row, col)`` of
    its first pixel in the full map: the file then starts at the map's origin, so it overlays
    the slide like the layer. Returns the written file, as napari expects.
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
    units, scale = meta.get("units"), meta.get("scale")
    if scale is not None and units is not None and all(str(u) in _MICRONS for u in tuple(units)[-2:]):
        return (float(scale[-2]), float(scale[-1]))
    return None
