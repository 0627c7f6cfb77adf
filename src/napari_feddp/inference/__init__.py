"""Whole-slide inference without Qt: tissue-only tiling, seamless blending, chunked zarr output.

Start with :func:`segment_slide` (a generator of :class:`Progress` whose return
value is a :class:`SegmentationResult`) and :func:`run_to_completion`.
"""

from .blending import TileBlender, tile_profiles, window_2d, window_profile
from .device import autocast, select_device
from .engine import Progress, SegmentationResult, run_to_completion, segment_slide
from .errors import InferenceCancelled, InferenceError
from .spec import InferenceSpec
from .tiling import Geometry, TilePlan, choose_geometry, grid_starts, plan_tiles
from .tissue import TissueMask, detect_tissue, tissue_mask

__all__ = [
    "Geometry",
    "InferenceCancelled",
    "InferenceError",
    "InferenceSpec",
    "Progress",
    "SegmentationResult",
    "TileBlender",
    "TilePlan",
    "TissueMask",
    "autocast",
    "choose_geometry",
    "detect_tissue",
    "grid_starts",
    "plan_tiles",
    "run_to_completion",
    "segment_slide",
    "select_device",
    "tissue_mask",
    "tile_profiles",
    "window_2d",
    "window_profile",
]
