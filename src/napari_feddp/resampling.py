"""Resampling of images and label maps, the same for training and inference.

A model sees its training tiles and the slide tiles it segments through
:func:`resize_image`, so both are interpolated alike: bilinear, antialiased
when shrinking (torch's ``interpolate``, as PIL and torchvision resize).
Label maps are never interpolated: :func:`resize_labels` picks the nearest pixel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a ``(h, w, C)`` image to ``(size, size, C)`` (or ``size = (height, width)``).

    Bilinear with half-pixel centres, antialiased when shrinking. uint8 images
    come back as uint8 (rounded); other dtypes as float32.
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    tensor = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)[None]
    antialias = image.shape[0] > height or image.shape[1] > width
    resized = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias)
    resized = resized[0].permute(1, 2, 0)
    if image.dtype == np.uint8:
        return resized.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return resized.contiguous().numpy()


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label map (instance ids or class indices) to ``size``."""
    if tuple(labels.shape[:2]) == tuple(size):
        return labels
    rows = np.minimum(((np.arange(size[0]) + 0.5) * labels.shape[0] / size[0]).astype(int), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * labels.shape[1] / size[1]).astype(int), labels.shape[1] - 1)
    return labels[np.ix_(rows, cols)]
