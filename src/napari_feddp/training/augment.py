"""Training-time augmentation of H&E tiles: geometry on image+mask, colour on image only.

Colour augmentation perturbs the stain concentrations in the
haematoxylin-eosin-DAB (HED) space of Ruifrok & Johnston, the "HED jitter" of
Tellez et al. (Med. Image Anal. 2019), so the model sees the staining
variation between labs that a federation of hospitals brings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.color import hed_from_rgb, rgb_from_hed

_HED_FROM_RGB = np.asarray(hed_from_rgb, dtype=np.float32)
_RGB_FROM_HED = np.asarray(rgb_from_hed, dtype=np.float32)


@dataclass(frozen=True)
class Augmentation:
    """Random flips, 90-degree rotations and stain/colour jitter.

    Parameters
    ----------
    flips : bool
        Random horizontal and vertical flips.
    rotations : bool
        Random rotation by 0, 90, 180 or 270 degrees.
    hed_scale : float
        Each stain concentration is multiplied by ``U(1 - hed_scale, 1 + hed_scale)``.
    hed_shift : float
        ...and shifted by ``U(-hed_shift, hed_shift)`` (optical-density units).
    brightness : float
        Additive brightness change ``U(-brightness, brightness)`` on [0, 1] pixels.
    contrast : float
        Contrast factor ``U(1 - contrast, 1 + contrast)`` around the tile mean.

    Geometric transforms are applied identically to image and mask, colour transforms to the
    image only, so image and mask stay aligned pixel for pixel.
    """

    flips: bool = True
    rotations: bool = True
    hed_scale: float = 0.05
    hed_shift: float = 0.05
    brightness: float = 0.05
    contrast: float = 0.05

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augment one ``(H, W, 3)`` uint8 RGB tile and its ``(H, W)`` labels; returns both
        contiguous, in the dtypes given."""
        image, mask = random_flip_rotate(image, mask, rng, flips=self.flips, rotations=self.rotations)
        if self.hed_scale > 0 or self.hed_shift > 0:
            image = hed_jitter(image, rng, scale=self.hed_scale, shift=self.hed_shift)
        if self.brightness > 0 or self.contrast > 0:
            image = brightness_contrast(image, rng, brightness=self.brightness, contrast=self.contrast)
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def random_flip_rotate(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, flips: bool = True, rotations: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the same random flips / 90-degree rotation to ``image`` (H, W, C) and ``mask`` (H, W)."""
    if flips and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if flips and rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    if rotations:
        k = int(rng.integers(4))
        image, mask = np.rot90(image, k, axes=(0, 1)), np.rot90(mask, k, axes=(0, 1))
    return image, mask


def rgb_to_hed(image: np.ndarray) -> np.ndarray:
    """Stain concentrations ``(H, W, 3)`` float32 of a uint8 RGB image (exactly invertible)."""
    optical_density = -np.log((image.astype(np.float32) + 1.0) / 256.0)
    return optical_density @ _HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hed`, rounded and clipped to uint8."""
    rgb = 256.0 * np.exp(-(hed @ _RGB_FROM_HED)) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def hed_jitter(image: np.ndarray, rng: np.random.Generator, *, scale: float, shift: float) -> np.ndarray:
    """Randomly rescale and shift each stain channel of a uint8 RGB tile."""
    alpha = rng.uniform(1.0 - scale, 1.0 + scale, size=3).astype(np.float32)
    beta = rng.uniform(-shift, shift, size=3).astype(np.float32)
    return hed_to_rgb(rgb_to_hed(image) * alpha + beta)


def brightness_contrast(image: np.ndarray, rng: np.random.Generator, *, brightness: float, contrast: float) -> np.ndarray:
    """Random brightness offset and contrast factor on a uint8 RGB tile."""
    pixels = image.astype(np.float32) / 255.0
    factor = rng.uniform(1.0 - contrast, 1.0 + contrast)
    offset = rng.uniform(-brightness, brightness)
    mean = pixels.mean()
    pixels = (pixels - mean) * factor + mean + offset
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
