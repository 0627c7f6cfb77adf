"""Nuclei pseudo-labels for unannotated H&E from colour deconvolution.

Haematoxylin stains nuclei. Separating it from eosin by colour deconvolution
(Ruifrok & Johnston 2001, :func:`skimage.color.rgb2hed`) and thresholding its
optical density with Otsu's method gives a rough nuclei mask with no training
and no annotation. napari-feddp uses it to make training labels for *public*
slides (the CC0 sample slide), so that a model can be pretrained before any
lab's private data is touched.

The rule has no tuned parameters: Otsu picks the threshold on each image, and
the only sizes are physical (objects and holes smaller than a few µm², the
size of debris and of stain speckle, are dropped / filled).
"""

from __future__ import annotations

import numpy as np

#: Objects (and holes) smaller than this are removed (filled); a small lymphocyte is ~20 µm².
MIN_NUCLEUS_UM2 = 7.5
#: Haematoxylin optical densities above this percentile of the stained pixels (pigment, folds,
#: pen marks) are clipped before Otsu, so that a few very dark pixels do not set the threshold.
CLIP_PERCENTILE = 99.5


def stained(rgb: np.ndarray) -> np.ndarray:
    """Pixels that carry stain (not glass or white background): saturation > 20 and mean < 220."""
    rgb = _check_rgb(rgb)
    saturation = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1)
    return (saturation > 20) & (rgb.mean(axis=-1) < 220)


def nuclei_pseudo_mask(rgb: np.ndarray, tissue: np.ndarray | None = None, *, mpp: float = 0.5) -> np.ndarray:
    """Boolean nuclei mask of an H&E image from its haematoxylin channel.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(h, w, 3)`` uint8 H&E image.
    tissue : numpy.ndarray of bool, optional
        Where tissue is (same ``h, w``); default :func:`stained`. Nothing outside it is
        labelled, and the threshold is chosen on the tissue pixels only.
    mpp : float
        Micrometres per pixel of ``rgb`` (sets the size of removed objects and filled holes).

    Returns
    -------
    numpy.ndarray of bool
        ``(h, w)``; all False where there is no tissue.
    """
    from skimage import morphology
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    rgb = _check_rgb(rgb)
    if not (isinstance(mpp, (int, float)) and mpp > 0):
        raise ValueError(f"nuclei_pseudo_mask: mpp must be a positive number, received {mpp!r}")
    if tissue is None:
        tissue = stained(rgb)
    tissue = np.asarray(tissue, dtype=bool)
    if tissue.shape != rgb.shape[:2]:
        raise ValueError(f"nuclei_pseudo_mask: tissue mask shape {tissue.shape} does not match the image's "
                         f"{rgb.shape[:2]}")
    empty = np.zeros(rgb.shape[:2], dtype=bool)
    if tissue.sum() < 2:
        return empty
    density = rgb2hed(rgb)[..., 0]
    values = np.clip(density[tissue], 0.0, np.percentile(density[tissue], CLIP_PERCENTILE))
    if values.min() == values.max():
        return empty  # uniform stain: nothing to separate
    mask = (density > threshold_otsu(values)) & tissue
    mask = morphology.opening(mask, morphology.disk(1))  # stain speckle
    small = max(int(MIN_NUCLEUS_UM2 / (mpp * mpp)), 1)
    mask = morphology.remove_small_objects(mask, max_size=small)
    return morphology.remove_small_holes(mask, max_size=small)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 3) uint8 RGB image, received shape {rgb.shape} dtype {rgb.dtype}")
    return rgb


__all__ = ["MIN_NUCLEUS_UM2", "nuclei_pseudo_mask", "stained"]
