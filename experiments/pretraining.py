"""Public pretraining: the initial model of every setting, trained on public data only.

Two public sources, chosen with the budget's ``pretrain_data``:

* ``"cmu1"`` (the default): the CC0 sample slide bundled with the package, labelled
  without annotation (below);
* ``"tnbc"``: the TNBC nuclei set (Naylor et al. 2019; 50 annotated 512-px tiles at
  40x, one site, no overlap with MoNuSeg), from ``tnbc/`` in the shared data folder.
  Its licence is not stated in the copies reachable here: use it for experiments;
  shipping weights trained on it needs the Zenodo record's terms first.

DP-SGD pays for every bit it learns from private data, so the DP literature
starts private training from a model pretrained on public data (e.g. De et al.
2022, "Unlocking high-accuracy differentially private image classification
through scale"). No public *annotated* nuclei data ships here, but one public
H&E scan does: the CC0 CMU-1 sample slide bundled with the package. Its
labels come from colour deconvolution
(:func:`napari_feddp.training.pseudo_labels.nuclei_pseudo_mask`: haematoxylin
optical density, Otsu threshold, no tuned parameters), and a U-Net is trained
on them without DP (the data are public: no privacy cost, no lab involved).

Every setting of the grid (centralized, local-only, FedAvg and FedDP) then
starts from this same model, so the comparison stays like for like; its
pretraining steps are not counted in any setting's budget. No MoNuSeg pixel
and no MoNuSeg label is used here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

#: Patches cut from the public slide: side, stride (overlap is fine, the data are public) and the
#: smallest tissue fraction a patch must have.
PATCH, STRIDE, MIN_TISSUE = 256, 128, 0.3


def public_tissue(rgb: np.ndarray) -> np.ndarray:
    """Tissue of a full-resolution public H&E region: stained pixels, speckle removed, small gaps filled."""
    from skimage import morphology

    from napari_feddp.training.pseudo_labels import stained

    tissue = morphology.opening(stained(rgb), morphology.disk(2))
    return morphology.remove_small_holes(tissue, max_size=500)


def prepare_public_patches(out_dir: str | os.PathLike, *, slide: str | os.PathLike | None = None,
                           mpp: float = 0.5) -> Path:
    """Write pseudo-labelled patches of a public slide to ``out_dir/{images,masks}`` (PNG).

    Parameters
    ----------
    out_dir : path
        Folder to (re)write; reused as it is when already prepared from the same slide.
    slide : path, optional
        A public H&E slide (default: the bundled CC0 CMU-1 sample). Its full-resolution level
        must be within 10 % of ``mpp``.
    mpp : float
        The model's micrometres per pixel.

    Returns
    -------
    Path
        ``out_dir``, a dataset folder :class:`~napari_feddp.training.SegmentationDataset` reads.
    """
    from PIL import Image

    from napari_feddp.slides import open_slide
    from napari_feddp.training.pseudo_labels import nuclei_pseudo_mask

    if slide is None:
        from importlib.resources import files

        slide = Path(str(files("napari_feddp") / "data" / "CMU-1-Small-Region.svs"))
    out = Path(out_dir)
    params = {"slide": str(Path(slide).resolve()), "size": os.path.getsize(slide), "mpp": mpp,
              "patch": PATCH, "stride": STRIDE, "min_tissue": MIN_TISSUE}
    stamp = out / "prepared.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("params") == params:
        return out
    opened = open_slide(slide)
    try:
        slide_mpp = opened.level_mpp(0)
        if slide_mpp is None or abs(slide_mpp[0] / mpp - 1) > 0.1:
            raise ValueError(f"public slide {slide}: level 0 is at {slide_mpp} µm/px; pretraining needs "
                             f"{mpp} µm/px (within 10 %)")
        rgb = np.asarray(opened.levels[0])
    finally:
        opened.close()
    tissue = public_tissue(rgb)
    mask = nuclei_pseudo_mask(rgb, tissue, mpp=slide_mpp[0])
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / sub).iterdir():
            old.unlink()
    names = []
    for y in range(0, rgb.shape[0] - PATCH + 1, STRIDE):
        for x in range(0, rgb.shape[1] - PATCH + 1, STRIDE):
            window = (slice(y, y + PATCH), slice(x, x + PATCH))
            if tissue[window].mean() < MIN_TISSUE:
                continue
            name = f"public_y{y:05d}_x{x:05d}"
            Image.fromarray(np.ascontiguousarray(rgb[window])).save(out / "images" / f"{name}.png")
            Image.fromarray(mask[window].astype(np.uint8) * 255).save(out / "masks" / f"{name}.png")
            names.append(name)
    if not names:
        raise ValueError(f"public slide {slide}: no {PATCH}x{PATCH} patch has {MIN_TISSUE:.0%} tissue")
    stamp.write_text(json.dumps({"params": params, "patches": len(names),
                                 "pseudo_foreground": float(mask[tissue].mean())}, indent=2) + "\n")
    return out


#: TNBC's pixel size: the files carry none; the dataset paper gives 40x (about 0.25 µm/px).
TNBC_MPP = 0.25
#: Public pretraining sources (``Budget.pretrain_data``).
PUBLIC_SOURCES = ("cmu1", "tnbc")


def find_tnbc() -> Path:
    """The TNBC set (``images/``, ``masks/``) in the shared data folder (:func:`~experiments.runner.shared_data`)."""
    from .runner import shared_data

    found = shared_data() / "tnbc"
    if not (found / "images").is_dir() or not (found / "masks").is_dir():
        raise FileNotFoundError(f"TNBC not found in {found}: set FEDDP_SHARED_DATA to the folder holding tnbc/")
    return found


def prepare_tnbc_patches(out_dir: str | os.PathLike, *, source: str | os.PathLike | None = None,
                         mpp: float = 0.5) -> Path:
    """Write the TNBC tiles, resampled from 0.25 µm/px to ``mpp``, to ``out_dir/{images,masks}`` (PNG).

    Each 512-px tile becomes one patch (256 px at 0.5 µm/px), resampled as the hospitals'
    tiles are (:func:`napari_feddp.training.dataset.resample_pair`). Reused as it is when already
    prepared from the same folder and pixel size.
    """
    from PIL import Image

    from napari_feddp.training._io import read_image, read_mask
    from napari_feddp.training.dataset import find_pairs, resample_pair

    source = Path(source) if source is not None else find_tnbc()
    out = Path(out_dir)
    params = {"source": str(source.resolve()), "source_mpp": TNBC_MPP, "mpp": mpp}
    stamp = out / "prepared.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("params") == params:
        return out
    pairs = find_pairs(source, source_mpp=TNBC_MPP)
    if not pairs:
        raise ValueError(f"TNBC folder {source}: no image with a mask of the same name")
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / sub).iterdir():
            old.unlink()
    foreground = []
    for pair in pairs:
        image, mask = resample_pair(read_image(pair.image_path), read_mask(pair.mask_path, n_classes=2),
                                    TNBC_MPP / mpp)
        Image.fromarray(np.ascontiguousarray(image)).save(out / "images" / f"{pair.name}.png")
        Image.fromarray((mask > 0).astype(np.uint8) * 255).save(out / "masks" / f"{pair.name}.png")
        foreground.append(float((mask > 0).mean()))
    stamp.write_text(json.dumps({"params": params, "patches": len(pairs),
                                 "foreground": float(np.mean(foreground))}, indent=2) + "\n")
    return out


def pretrain_public(out_dir: str | os.PathLike, budget, *, seed: int = 0) -> Path:
    """The public-pretrained initial model for ``budget`` (``budget.pretrain_steps`` steps, no DP).

    Trained once per ``out_dir`` and budget (data, architecture, crop, batch, lr, steps) and
    reused; returns the checkpoint path.
    """
    from .runner import train_direct

    out = Path(out_dir)
    if budget.pretrain_steps <= 0:
        raise ValueError("pretrain_public: budget.pretrain_steps is 0 (random initialisation)")
    data = budget.pretrain_data or "cmu1"
    if data not in PUBLIC_SOURCES:
        raise ValueError(f"pretrain_public: unknown public data {data!r}; expected one of {list(PUBLIC_SOURCES)}")
    if data == "tnbc" and budget.settings.n_classes != 2:
        raise ValueError("pretraining on TNBC needs a foreground-only model: its masks are binary, without "
                         "the per-nucleus outlines a contour model learns")
    keys = ("pretrain_steps", "batch_size", "crop_size", "learning_rate", "base_width", "depth", "groups", "mpp")
    params = {k: v for k, v in budget.as_record().items() if k in keys} | {"seed": seed, "data": data}
    checkpoint = out / "public-pretrained.safetensors"
    stamp = out / "pretrained.json"
    if checkpoint.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("params") == params:
        return checkpoint
    if data == "tnbc":
        folder = prepare_tnbc_patches(out / "tnbc-patches", mpp=budget.settings.mpp)
    else:
        folder = prepare_public_patches(out / "public-patches", mpp=budget.settings.mpp)
    checkpoint = train_direct(folder, budget.pretrain_steps, budget.settings, seed, out, "public-pretrained")
    stamp.write_text(json.dumps({"params": params, "checkpoint": checkpoint.name}, indent=2) + "\n")
    return checkpoint


__all__ = ["PUBLIC_SOURCES", "TNBC_MPP", "find_tnbc", "prepare_public_patches", "prepare_tnbc_patches",
           "pretrain_public", "public_tissue"]
