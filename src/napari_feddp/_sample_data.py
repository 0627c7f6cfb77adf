"""napari sample data: a real Aperio H&E scan bundled with the package (CC0)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ._reader import read_slide

SAMPLE_FILE = "CMU-1-Small-Region.svs"


def sample_slide_path() -> Path:
    """Path of the bundled CMU-1 small region slide."""
    return Path(str(files("napari_feddp") / "data" / SAMPLE_FILE))


def cmu1_small_region():
    """CMU-1 small region: Aperio SVS, 2220 x 2967 px at 0.499 µm/px, H&E."""
    return read_slide(str(sample_slide_path()))
