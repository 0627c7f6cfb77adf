"""Whole-slide image I/O without Qt: open lazily as a multiscale pyramid, read metadata."""

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
from ._plain import PLAIN_IMAGE_SUFFIXES, is_plain_image_path, open_plain_image

__all__ = [
    "ASSOCIATED_NAMES",
    "SLIDE_SUFFIXES",
    "NotASlideError",
    "PLAIN_IMAGE_SUFFIXES",
    "Slide",
    "SlideError",
    "SlideMetadata",
    "is_plain_image_path",
    "is_slide_path",
    "open_plain_image",
    "open_slide",
    "read_slide_metadata",
]
