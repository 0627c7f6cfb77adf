"""Non-IID "hospitals" from the MoNuSeg 2018 training split, grouped by organ / TCGA site.

MoNuSeg (Kumar et al., 2017/2020; CC BY-NC-SA 4.0) tiles come from TCGA whole
slides; the second field of a TCGA barcode is the tissue-source site (TSS,
the hospital that contributed the slide). Each simulated hospital receives the
tiles of whole TSS codes, grouped by organ as in the MoNuSeg training list, so
hospitals differ in organ, staining and scanner (non-IID):

============  =====================  =================================================
hospital      organ (MoNuSeg list)   TCGA tissue-source sites (tiles)
============  =====================  =================================================
h1-breast     breast                 A7 (2), AR (2), E2 (2)
h2-kidney     kidney                 B0 (3), HE (3)
h3-liver      liver [1]_             18 (1), 21 (2), 38 (1), 49 (1), 50 (1)
h4-prostate   prostate               G9 (5), CH (1)
h5-mixed      bladder, colon,        DK (1), G2 (1) bladder; AY (1), NH (1) colon;
              stomach                KB (1), RD (1) stomach
============  =====================  =================================================

.. [1] MoNuSeg lists these six tiles as liver; the TSS codes belong to TCGA lung
   cohorts. The grouping is by site either way.

Privacy unit. The data are prepared once: every 1000x1000 tile (0.25 µm/px) is
resampled to the model's pixel size and cut into ``grid x grid`` non-overlapping
patches; each patch is one DP-SGD sample (the unit of "sample-level" DP).
A whole MoNuSeg tile (one patient slide region) is covered by ``grid**2``
patches, so its guarantee follows from group privacy and is weaker.
The patches are written under a scratch folder (never inside the package:
the data licence forbids redistribution).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from napari_feddp.federation.sites import split_by_site

#: Hospital -> TCGA tissue-source-site codes (second barcode field).
HOSPITALS: dict[str, tuple[str, ...]] = {
    "h1-breast": ("A7", "AR", "E2"),
    "h2-kidney": ("B0", "HE"),
    "h3-liver": ("18", "21", "38", "49", "50"),
    "h4-prostate": ("G9", "CH"),
    "h5-mixed": ("DK", "G2", "AY", "NH", "KB", "RD"),
}


def prepare_hospitals(
    train_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    hospitals: list[str] | None = None,
    source_mpp: float = 0.25,
    target_mpp: float = 0.5,
    grid: int = 4,
    max_tiles: int | None = None,
) -> dict[str, Path]:
    """Write each hospital's patches to ``out_dir/<hospital>/{images,masks}`` (PNG).

    Parameters
    ----------
    train_dir : path
        MoNuSeg ``train`` folder (``images/``, ``masks/``).
    out_dir : path
        Scratch folder (reused if already prepared with the same parameters).
    hospitals : list of str, optional
        Subset of :data:`HOSPITALS` (default: all five).
    source_mpp, target_mpp : float
        Pixel size of the tiles and of the model.
    grid : int
        Patches per side of a tile (``grid**2`` DP samples per tile).
    max_tiles : int, optional
        Keep only the first tiles of each hospital (quick runs).

    Returns
    -------
    dict
        Hospital -> folder, plus ``"pooled"`` -> folder with every patch (for
        centralized training).
    """
    from PIL import Image

    from napari_feddp.training._io import find_instance_map, read_image, read_instances, read_mask
    from napari_feddp.training.dataset import find_pairs, resample_instances, resample_pair

    train_dir, out_dir = Path(train_dir), Path(out_dir)
    chosen = list(hospitals or HOSPITALS)
    params = {"train_dir": str(train_dir.resolve()), "hospitals": chosen, "source_mpp": source_mpp,
              "target_mpp": target_mpp, "grid": grid, "max_tiles": max_tiles, "instances": True}
    stamp = out_dir / "prepared.json"
    folders = {h: out_dir / h for h in chosen}
    folders["pooled"] = out_dir / "pooled"
    if stamp.is_file() and json.loads(stamp.read_text()).get("params") == params:
        return folders
    pairs = {p.name: p for p in find_pairs(train_dir, source_mpp=source_mpp)}
    groups = split_by_site(pairs, HOSPITALS)
    manifest: dict[str, list[str]] = {}
    for folder in folders.values():
        for sub in ("images", "masks", "instances"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            for old in (folder / sub).iterdir():
                old.unlink()
    for hospital in chosen:
        names = groups[hospital][: max_tiles or None]
        manifest[hospital] = names
        for name in names:
            pair = pairs[name]
            image = read_image(pair.image_path)
            mask = read_mask(pair.mask_path, n_classes=2)
            image, mask = resample_pair(image, mask, source_mpp / target_mpp)
            instance_path = find_instance_map(train_dir, name)
            instances = (resample_instances(read_instances(instance_path), mask.shape)
                         if instance_path is not None else None)
            ys = np.linspace(0, mask.shape[0], grid + 1).astype(int)
            xs = np.linspace(0, mask.shape[1], grid + 1).astype(int)
            for i in range(grid):
                for j in range(grid):
                    stem = f"{name}_p{i}{j}"
                    crop = (slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1]))
                    for folder in (folders[hospital], folders["pooled"]):
                        Image.fromarray(np.ascontiguousarray(image[crop])).save(folder / "images" / f"{stem}.png")
                        Image.fromarray((mask[crop] > 0).astype(np.uint8) * 255).save(
                            folder / "masks" / f"{stem}.png")
                        if instances is not None:  # per-nucleus targets of contour models
                            Image.fromarray(instances[crop].astype(np.uint16)).save(
                                folder / "instances" / f"{stem}.png")
    stamp.write_text(json.dumps({"params": params, "tiles": manifest}, indent=2) + "\n")
    return folders


__all__ = ["HOSPITALS", "prepare_hospitals"]
