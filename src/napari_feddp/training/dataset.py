"""Local segmentation datasets: folders of image/mask pairs, cropped at the model's pixel size.

Folder layout (MoNuSeg's ``train`` and ``test`` folders load as they are)::

    DIR/images/NAME.{png,tif,tiff}   RGB uint8 tiles
    DIR/masks/NAME.{png,tif,tiff}    labels: 0/1, 0/255 or class indices
    DIR/instances/NAME.{png,tif,tiff} optional, one integer id per nucleus: the
                                     targets of contour models (background,
                                     nucleus, contour); without it the connected
                                     components of the mask are the nuclei
    DIR/provenance.jsonl             optional, one JSON record per tile (see
                                     :func:`~napari_feddp.training.save_annotated_tile`);
                                     a record's ``mpp`` overrides ``source_mpp``
    DIR/.feddp/                      privacy-ledger markers (never read as data)

Privacy unit: in training mode one dataset item is one *tile* (a random crop of
it), so DP-SGD's per-sample clipping bounds the influence of each tile.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.measure import label
from skimage.segmentation import find_boundaries
from torch.utils.data import Dataset

from ..resampling import resize_image
from ..resampling import resize_labels as resample_instances
from ._io import SUFFIXES, find_instance_map, is_supported, read_image, read_instances, read_mask, read_size
from .augment import Augmentation
from .errors import DatasetError
from .metrics import IGNORE_INDEX

MODES = ("train", "center", "sliding")
PROVENANCE_FILE = "provenance.jsonl"
#: Pixel size of MoNuSeg-like 40x scans, used when nothing else is known.
DEFAULT_SOURCE_MPP = 0.25


@dataclass(frozen=True)
class SamplePair:
    """One image/mask pair of a dataset folder: shared file stem, the two files, their
    ``(height, width)`` in source pixels and the source micrometres per pixel."""

    name: str
    image_path: Path
    mask_path: Path
    size: tuple[int, int]
    mpp: float


def find_pairs(dataset_dir: str | Path, *, source_mpp: float = DEFAULT_SOURCE_MPP) -> list[SamplePair]:
    """List the image/mask pairs of a dataset folder (sorted by name), reading file headers only.

    Parameters
    ----------
    dataset_dir : str or Path
        Folder with ``images/`` and ``masks/`` subfolders.
    source_mpp : float
        Micrometres per pixel of tiles without an ``mpp`` in ``provenance.jsonl``.

    Raises
    ------
    DatasetError
        If the folder or a subfolder is missing or empty, a stem is duplicated, an image has
        no mask (or a mask no image), a header is unreadable, or an image and its mask differ
        in size. The message names the file(s).
    """
    root = Path(dataset_dir)
    _check_positive("source_mpp", source_mpp)
    images, masks = _list_files(root, "images"), _list_files(root, "masks")
    for files, other, kind, missing, folder in ((masks, images, "mask", "an image", "images"),
                                                (images, masks, "image", "a mask", "masks")):
        orphans = sorted(set(files) - set(other))
        if orphans:
            raise DatasetError(
                f"{len(orphans)} {kind}(s) without {missing} in {root / folder} (expected {missing} with the same "
                f"name): {', '.join(str(files[n]) for n in orphans[:5])}"
            )
    mpps = {}  # the latest record of a tile wins
    for record in read_provenance(root):
        mpp = record.get("mpp")
        if isinstance(record.get("name"), str) and isinstance(mpp, (int, float)) and mpp > 0:
            mpps[record["name"]] = float(mpp)
    pairs = []
    for name in sorted(images):
        size = read_size(images[name])
        _check_same_size(size, read_size(masks[name]), images[name], masks[name])
        pairs.append(SamplePair(name, images[name], masks[name], size, mpps.get(name, float(source_mpp))))
    return pairs


def _list_files(root: Path, sub: str) -> dict[str, Path]:
    """Supported files in ``root/sub`` keyed by stem."""
    if not root.exists():
        raise DatasetError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset path {root}: expected a folder, received a file")
    folder = root / sub
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DatasetError(
            f"dataset folder {root}: expected subfolders 'images' and 'masks', "
            f"'{sub}' is missing (found subfolders: {found or 'none'})"
        )
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not is_supported(path):
            continue
        if path.stem in files:
            raise DatasetError(f"two files named {path.stem!r} in {folder}: {files[path.stem].name} and {path.name}")
        files[path.stem] = path
    if not files:
        others = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        detail = f"found only {others[:5]}" if others else "the folder is empty"
        raise DatasetError(f"no {sub} in {folder}: expected files ending in {', '.join(SUFFIXES)}; {detail}")
    return files


def _check_same_size(image_size: tuple[int, ...], mask_size: tuple[int, ...], image_path: Path, mask_path: Path) -> None:
    if tuple(image_size) != tuple(mask_size):
        raise DatasetError(
            f"image and mask sizes differ: {image_path} is {image_size[0]}x{image_size[1]} (HxW), "
            f"{mask_path} is {mask_size[0]}x{mask_size[1]}; expected the same size"
        )


def read_provenance(dataset_dir: str | Path) -> list[dict[str, Any]]:
    """Records of ``DIR/provenance.jsonl`` (empty list when the file does not exist).

    Raises
    ------
    DatasetError
        If a line is not a JSON object; the message gives the line number.
    """
    path = Path(dataset_dir) / PROVENANCE_FILE
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} line {number}: expected a JSON object, received invalid JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise DatasetError(f"{path} line {number}: expected a JSON object, received {type(record).__name__}")
        records.append(record)
    return records


def dataset_fingerprint(dataset_dir: str | Path) -> str:
    """SHA-256 hex digest of the dataset's image and mask file names and sizes.

    Adding, removing, renaming or resizing any image or mask changes it; ``provenance.jsonl``
    and ``.feddp/`` do not count.

    Raises
    ------
    DatasetError
        Like :func:`find_pairs` for a missing or empty folder.
    """
    digest = hashlib.sha256()
    for sub in ("images", "masks"):
        for path in _list_files(Path(dataset_dir), sub).values():
            digest.update(f"{sub}/{path.name}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``(height, width)`` after resampling by ``scale`` (at least 1 pixel)."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def resample_pair(image: np.ndarray, mask: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample an image and its mask by ``scale`` (= source mpp / target mpp).

    The image is resampled as the segmentation engine resamples slide tiles
    (:func:`napari_feddp.resampling.resize_image`). Each class of the mask is
    resampled the same way as a soft indicator and the most covered class
    wins, so thin structures are not lost to nearest-neighbour picking.
    """
    if math.isclose(scale, 1.0, rel_tol=1e-6):
        return image, mask
    out_size = scaled_size(image.shape[:2], scale)
    image_out = resize_image(image, out_size)
    classes = np.unique(mask)
    if classes.size == 1:
        return image_out, np.full(out_size, classes[0], dtype=mask.dtype)
    cover = resize_image(np.stack([mask == c for c in classes], axis=-1).astype(np.float32), out_size)
    return image_out, classes[np.argmax(cover, axis=-1)].astype(mask.dtype)


def _check_rim_fraction(rim_fraction: float) -> None:
    if not 0.0 <= rim_fraction < 1.0:
        raise ValueError(f"rim_fraction: expected a fraction in [0, 1), received {rim_fraction!r}")


def contour_target(instances: np.ndarray, rim_fraction: float = 0.0) -> np.ndarray:
    """Three-class target of an instance map: 0 background, 1 nucleus interior, 2 nucleus contour.

    With ``rim_fraction`` 0 the contour is each nucleus's own one-pixel outline (pixels
    with a 4-neighbour outside the nucleus), so touching nuclei are separated by two
    contour pixels. With ``rim_fraction`` f in (0, 1) it is the nucleus's rim: the outline
    and every pixel whose distance to the outline is under f times the nucleus's largest
    such distance (its inner-distance map, normalised per nucleus, cut at f), so the
    interior is a core shrunk in proportion to the nucleus's size.
    """
    _check_rim_fraction(rim_fraction)
    inside = instances > 0
    outline = find_boundaries(instances, connectivity=1, mode="inner") & inside
    rim = outline
    if rim_fraction > 0 and inside.any():
        from scipy import ndimage as ndi

        distance = ndi.distance_transform_edt(inside & ~outline)
        ids = np.unique(instances[inside])
        largest = np.zeros(int(ids.max()) + 1)
        largest[ids] = ndi.maximum(distance, instances, index=ids)
        rim = outline | (inside & (distance < rim_fraction * largest[instances]))
    return np.where(inside, np.where(rim, 2, 1), 0).astype(np.uint8)


class SegmentationDataset(Dataset):
    """Image/mask tiles of a folder as ``(image, mask)`` tensors at the model's pixel size.

    Parameters
    ----------
    dataset_dir : str or Path
        Folder with ``images/`` and ``masks/`` (see module docstring).
    crop_size : int
        Edge in pixels *at target_mpp* of the square crops returned.
    mode : {"train", "center", "sliding"}
        ``"train"``: one random, augmented crop per tile per access; length = number of tiles
        (one tile = one DP sample). ``"center"``: the central crop of each tile. ``"sliding"``:
        a grid of crops with ``stride`` covering every tile; length = number of crops. The
        last two are deterministic and not augmented.
    source_mpp : float
        Micrometres per pixel of the files (0.25 for 40x scans such as MoNuSeg), unless
        ``provenance.jsonl`` records an ``mpp`` for a tile.
    target_mpp : float or None
        Micrometres per pixel the model expects; tiles are resampled when it differs from
        the source. ``None``: no resampling.
    stride : int or None
        Step of the sliding grid (default ``crop_size``: pooled metrics count every pixel once).
    augment : bool or Augmentation
        Augmentation of ``"train"`` crops (``True``: :class:`Augmentation` defaults).
    n_classes : int
        Number of classes including background; masks are checked against it.
    contours : bool, optional
        Targets for a contour model (background, nucleus interior, nucleus contour;
        :func:`contour_target`) from ``instances/`` or, without it, from the mask's connected
        components. Default: when ``n_classes == 3``.
    rim_fraction : float
        Contour models: the contour class is each nucleus's rim, cut from its normalised
        inner-distance map at this fraction (:func:`contour_target`); 0, the default, is
        the one-pixel outline.
    mask_mode : {"auto", "binary", "classes"}
        How mask values are read (see :func:`~napari_feddp.training._io.read_mask`).
    normalization : (mean, std) or None
        Per-channel RGB statistics for pixels in [0, 1]; ``None`` returns [0, 1] pixels.
    seed : int or None
        Seed of the crop/augmentation generator; ``None`` draws from torch's global RNG
        (so ``torch.manual_seed`` makes training reproducible).
    cache : bool
        Keep decoded, resampled tiles in memory (MoNuSeg's 30 tiles at 0.5 µm/px: about 23 MB).

    Notes
    -----
    Items are ``(image float32 (3, crop, crop), mask int64 (crop, crop))``. Crops reaching
    past a tile's edge are mirrored in the image and :data:`IGNORE_INDEX` in the mask, which
    the loss and metrics skip.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        *,
        crop_size: int = 256,
        mode: str = "train",
        source_mpp: float = DEFAULT_SOURCE_MPP,
        target_mpp: float | None = None,
        stride: int | None = None,
        augment: bool | Augmentation = True,
        n_classes: int = 2,
        contours: bool | None = None,
        rim_fraction: float = 0.0,
        mask_mode: str = "auto",
        normalization: tuple[Sequence[float], Sequence[float]] | None = None,
        seed: int | None = None,
        cache: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, received {mode!r}")
        _check_positive_int("crop_size", crop_size)
        _check_positive_int("n_classes", n_classes)
        if target_mpp is not None:
            _check_positive("target_mpp", target_mpp)
        self.dataset_dir = Path(dataset_dir)
        self.pairs = find_pairs(self.dataset_dir, source_mpp=source_mpp)
        self.crop_size = int(crop_size)
        self.mode = mode
        self.target_mpp = target_mpp
        self.stride = int(stride) if stride is not None else self.crop_size
        _check_positive_int("stride", self.stride)
        self.augmentation = Augmentation() if augment is True else (augment or None)
        self.n_classes = int(n_classes)
        self.contours = self.n_classes == 3 if contours is None else bool(contours)
        if self.contours and self.n_classes != 3:
            raise ValueError(f"contours: a contour model has 3 classes, received n_classes={n_classes}")
        _check_rim_fraction(rim_fraction)
        self.rim_fraction = float(rim_fraction)
        self.mask_mode = mask_mode
        self.normalization = _normalization_arrays(normalization)
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._windows = None
        if mode == "sliding":
            self._windows = []
            for tile, pair in enumerate(self.pairs):
                height, width = scaled_size(pair.size, self._scale(tile))
                for y0 in _grid(height, self.crop_size, self.stride):
                    self._windows.extend((tile, y0, x0) for x0 in _grid(width, self.crop_size, self.stride))

    @classmethod
    def for_model(cls, dataset_dir: str | Path, card: Any, **kwargs: Any) -> SegmentationDataset:
        """Dataset matching a :class:`~napari_feddp.models.ModelCard`: ``target_mpp``, ``crop_size``,
        ``n_classes`` and ``normalization`` from the card; ``kwargs`` override them."""
        spec = card.input
        defaults = {
            "target_mpp": spec.mpp,
            "crop_size": spec.tile_size,
            "n_classes": card.n_classes,
            "normalization": (spec.normalization.mean, spec.normalization.std),
        }
        return cls(dataset_dir, **{**defaults, **kwargs})

    def __len__(self) -> int:
        return len(self._windows) if self._windows is not None else len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        index %= len(self)
        if self._windows is not None:
            tile, y0, x0 = self._windows[index]
            image, mask = self.load_tile(tile)
            return self._to_tensors(*crop_with_padding(image, mask, y0, x0, self.crop_size))
        image, mask = self.load_tile(index)
        if self.mode == "center":
            y0, x0 = (max(s - self.crop_size, 0) // 2 for s in mask.shape)
            return self._to_tensors(*crop_with_padding(image, mask, y0, x0, self.crop_size))
        seed = int(torch.randint(0, 2**62, (1,), generator=self._generator).item())
        worker = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([seed, worker.seed if worker is not None else 0])
        y0 = int(rng.integers(max(mask.shape[0] - self.crop_size, 0) + 1))
        x0 = int(rng.integers(max(mask.shape[1] - self.crop_size, 0) + 1))
        image, mask = crop_with_padding(image, mask, y0, x0, self.crop_size)
        if self.augmentation is not None:
            image, mask = self.augmentation(image, mask, rng)
        return self._to_tensors(image, mask)

    def load_tile(self, tile: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded, validated and resampled ``(image (H, W, 3) uint8, mask (H, W) uint8)`` of a tile.

        Raises
        ------
        DatasetError
            If a file is corrupt, holds unexpected values, or its decoded size differs from its mask's.
        """
        if tile in self._cache:
            return self._cache[tile]
        if self.contours:
            image, instances = self.load_instances(tile)
            result = image, contour_target(instances, self.rim_fraction)
        else:
            pair, scale = self.pairs[tile], self._scale(tile)
            image = read_image(pair.image_path)
            mask = read_mask(pair.mask_path, n_classes=self.n_classes, mask_mode=self.mask_mode)
            _check_same_size(image.shape[:2], mask.shape, pair.image_path, pair.mask_path)
            result = resample_pair(image, mask, scale)
        if self.cache:
            self._cache[tile] = result
        return result

    def load_instances(self, tile: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded, validated and resampled ``(image (H, W, 3) uint8, instances (H, W) int)`` of a
        tile: its ``instances/`` map, else the connected components of its mask (not cached).

        Raises
        ------
        DatasetError
            If a file is corrupt or its decoded size differs from the image's.
        """
        pair, scale = self.pairs[tile], self._scale(tile)
        image = read_image(pair.image_path)
        path = find_instance_map(self.dataset_dir, pair.name)
        if path is not None:
            instances = read_instances(path)
        else:
            path = pair.mask_path
            instances = label(read_mask(path, mask_mode="binary"), connectivity=1)
        _check_same_size(image.shape[:2], instances.shape, pair.image_path, path)
        if not math.isclose(scale, 1.0, rel_tol=1e-6):
            image = resize_image(image, scaled_size(image.shape[:2], scale))
        return image, resample_instances(instances, image.shape[:2])

    def verify(self) -> None:
        """Decode every tile once, raising :class:`DatasetError` on the first bad file."""
        for tile in range(len(self.pairs)):
            self.load_tile(tile)

    def _scale(self, tile: int) -> float:
        """Resampling factor (source mpp / target mpp) of a tile."""
        return 1.0 if self.target_mpp is None else self.pairs[tile].mpp / self.target_mpp

    def _to_tensors(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # New float32 / int64 arrays (one conversion each): torch never shares a read-only buffer.
        pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).div_(255.0)
        if self.normalization is not None:
            mean, std = self.normalization
            pixels = (pixels - mean) / std
        return pixels.contiguous(), torch.from_numpy(np.array(mask, dtype=np.int64))


def crop_with_padding(
    image: np.ndarray, mask: np.ndarray, y0: int, x0: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Square crop ``[y0:y0+size, x0:x0+size]``; outside the tile the image is mirrored
    and the mask is :data:`IGNORE_INDEX` (mask returned as int64)."""
    crop_image = image[y0 : y0 + size, x0 : x0 + size]
    crop_mask = mask[y0 : y0 + size, x0 : x0 + size].astype(np.int64)
    pad_y, pad_x = size - crop_mask.shape[0], size - crop_mask.shape[1]
    if pad_y or pad_x:
        crop_image = np.pad(crop_image, ((0, pad_y), (0, pad_x), (0, 0)), mode="symmetric")
        crop_mask = np.pad(crop_mask, ((0, pad_y), (0, pad_x)), constant_values=IGNORE_INDEX)
    return crop_image, crop_mask


def _grid(length: int, size: int, stride: int) -> list[int]:
    """Window starts covering ``[0, length)``; the last window may extend past the end."""
    return [k * stride for k in range(1 + max(0, math.ceil((length - size) / stride)))]


def _normalization_arrays(
    normalization: tuple[Sequence[float], Sequence[float]] | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if normalization is None:
        return None
    mean, std = (torch.as_tensor(np.asarray(v, dtype=np.float32)).reshape(-1, 1, 1) for v in normalization)
    if mean.numel() != 3 or std.numel() != 3 or bool((std <= 0).any()):
        raise ValueError(
            f"normalization: expected (mean, std) with 3 values each and std > 0, received {normalization!r}"
        )
    return mean, std


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name}: expected a positive number, received {value!r}")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, received {value!r}")
