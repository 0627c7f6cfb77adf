"""Whole-slide image I/O without Qt: open lazily, read metadata, detect tissue."""

from ._metadata import SlideMetadata, read_slide_metadata
from ._open import (
    ASSOCIATED_NAMES,
    SLIDE_SUFFIXES,
    NotASlideError,
    Slide,
    SlideError,
    is_slide_path,
    open_slide,
)

__all__ = [
    "ASSOCIATED_NAMES",
    "SLIDE_SUFFIXES",
    "NotASlideError",
    "Slide",
    "SlideError",
    "SlideMetadata",
    "is_slide_path",
    "open_slide",
    "read_slide_metadata",
]
