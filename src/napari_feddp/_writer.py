"""npe2 writer: a napari Labels layer -> pyramidal OME-TIFF in micrometres."""

from __future__ import annotations

from .export import write_ome_labels


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Write a Labels layer; its ``scale`` is taken as micrometres per pixel.

    The physical size is recorded only when the layer is in micrometres
    (``units``) or carries ``mpp`` in its FedDP metadata; a layer in pixel units
    is written without a physical size rather than with a wrong one.
    """
    mpp = _layer_mpp(meta)
    written = write_ome_labels(path, data, mpp=mpp, name=meta.get("name") or "labels")
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
