"""Physical pixel size, vendor and magnification from a slide's TIFF metadata.

Every scanner stores microns-per-pixel (mpp) somewhere else: Aperio in the
ImageDescription (``MPP = 0.499``), Hamamatsu and Leica in the TIFF resolution
tags, OME-TIFF in ``PhysicalSizeX``/``PhysicalSizeY``, Ventana in an XMP packet.
Each reader below returns ``None`` rather than guessing when the value is absent.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import tifffile

# Plausible range for a microscope's pixel size in micrometres. A TIFF written
# by a generic tool often carries 72 or 96 dpi (≈ 350 µm/px): that is not a
# physical pixel size and must not be shown as one.
MPP_RANGE_UM = (0.01, 100.0)

_UNIT_TO_UM = {
    "INCH": 25_400.0,
    "CENTIMETER": 10_000.0,
    "MILLIMETER": 1_000.0,
    "MICROMETER": 1.0,
}

_OME_UNIT_TO_UM = {
    "m": 1e6,
    "cm": 1e4,
    "mm": 1e3,
    "µm": 1.0,
    "um": 1.0,
    "\u03bcm": 1.0,
    "nm": 1e-3,
    "pm": 1e-6,
}


@dataclass(frozen=True)
class SlideMetadata:
    """What a pathologist or the inference engine needs to know about a slide."""

    vendor: str
    mpp: tuple[float, float] | None  # (y, x) micrometres per level-0 pixel
    objective_power: float | None


def vendor_of(tif: tifffile.TiffFile) -> str:
    """Return a short vendor/format name from tifffile's format flags."""
    flags = tif.flags
    for flag, name in (
        ("svs", "aperio"),
        ("ndpi", "hamamatsu"),
        ("scn", "leica"),
        ("bif", "ventana"),
        ("philips", "philips"),
        ("ome", "ome-tiff"),
    ):
        if flag in flags:
            return name
    return "generic-tiff"


def read_slide_metadata(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> SlideMetadata:
    """Collect vendor, mpp and objective power for the level-0 ``page`` of ``tif``."""
    vendor = vendor_of(tif)
    mpp: tuple[float, float] | None = None
    power: float | None = None
    if vendor == "aperio":
        fields = aperio_description_fields(page.description)
        value = _to_float(fields.get("MPP"))
        mpp, power = ((value, value) if value is not None else None), _to_float(fields.get("AppMag"))
    elif vendor == "ome-tiff":
        mpp, power = ome_physical_size(tif.ome_metadata or "")
    elif vendor == "ventana":
        mpp, power = ventana_xmp(page)
    elif vendor == "hamamatsu":
        ndpi_tags = getattr(page, "ndpi_tags", None) or {}
        power = _to_float(ndpi_tags.get("Magnification"))
    elif vendor == "leica":
        power = _leica_objective(tif.scn_metadata or "")
    if mpp is None:
        mpp = resolution_tag_mpp(page)
    if mpp is not None and not all(MPP_RANGE_UM[0] <= v <= MPP_RANGE_UM[1] for v in mpp):
        mpp = None
    return SlideMetadata(vendor=vendor, mpp=mpp, objective_power=power)


def aperio_description_fields(description: str) -> dict[str, str]:
    """Parse the ``key = value`` fields of an Aperio ImageDescription."""
    fields: dict[str, str] = {}
    for part in description.split("|")[1:]:
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def resolution_tag_mpp(page: tifffile.TiffPage) -> tuple[float, float] | None:
    """Micrometres per pixel from XResolution/YResolution/ResolutionUnit, if set."""
    tags = page.tags
    xres, yres, unit = tags.get("XResolution"), tags.get("YResolution"), tags.get("ResolutionUnit")
    if xres is None or yres is None or unit is None:
        return None
    scale = _UNIT_TO_UM.get(getattr(unit.value, "name", str(unit.value)))
    try:
        px_per_unit_x = xres.value[0] / xres.value[1]
        px_per_unit_y = yres.value[0] / yres.value[1]
    except (TypeError, ZeroDivisionError, IndexError):
        return None
    if scale is None or px_per_unit_x <= 0 or px_per_unit_y <= 0:
        return None
    return (scale / px_per_unit_y, scale / px_per_unit_x)


def ome_physical_size(ome_xml: str) -> tuple[tuple[float, float] | None, float | None]:
    """(mpp, objective power) of the first image in an OME-XML document."""
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None, None
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels")), None)
    mpp = None
    if pixels is not None:
        sizes = []
        for axis in ("Y", "X"):
            value = _to_float(pixels.get(f"PhysicalSize{axis}"))
            unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
            factor = _OME_UNIT_TO_UM.get(unit)
            sizes.append(None if value is None or factor is None else value * factor)
        if None not in sizes:
            mpp = (sizes[0], sizes[1])
    objective = next((el for el in root.iter() if el.tag.endswith("}Objective")), None)
    power = _to_float(objective.get("NominalMagnification")) if objective is not None else None
    return mpp, power


def ventana_xmp(page: tifffile.TiffPage) -> tuple[tuple[float, float] | None, float | None]:
    """(mpp, objective power) from a Ventana BIF XMP packet (tag 700)."""
    tag = page.tags.get("XMP")
    if tag is None:
        return None, None
    text = tag.value.decode("utf-8", "replace") if isinstance(tag.value, bytes) else str(tag.value)
    res = re.search(r'ScanRes="([0-9.]+)"', text)
    mag = re.search(r'Magnification="([0-9.]+)"', text)
    mpp_value = _to_float(res.group(1)) if res else None
    mpp = (mpp_value, mpp_value) if mpp_value else None
    return mpp, (_to_float(mag.group(1)) if mag else None)


def _leica_objective(scn_xml: str) -> float | None:
    match = re.search(r"<objective>([0-9.]+)</objective>", scn_xml)
    return _to_float(match.group(1)) if match else None


def _to_float(value: object) -> float | None:
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return result if result > 0 else None
