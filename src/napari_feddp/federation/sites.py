"""Split tiles into non-IID "hospitals" by TCGA tissue-source site.

The second field of a TCGA barcode (``TCGA-A7-A13E-...``) is the tissue-source
site: the hospital that contributed the slide. Labs that receive whole sites
differ in organ, staining and scanner, as real labs do.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path


def tcga_site(name: str) -> str | None:
    """Tissue-source site of a TCGA barcode (``TCGA-A7-...`` -> ``A7``); None for other names."""
    parts = name.split("-")
    return parts[1] if len(parts) > 2 and parts[0].upper() == "TCGA" else None


def split_by_site(names: Iterable[str], labs: int | Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Group tile names (sorted) by lab; every lab is a key, possibly with no tiles.

    Parameters
    ----------
    names : iterable of str
        Tile names (file stems).
    labs : int or mapping
        A mapping lab -> its TCGA sites (a tile whose site is not mapped is a KeyError),
        or a number N of labs ``lab-1`` ... ``lab-N`` that the sites are dealt to in
        sorted order (a name without a TCGA barcode is its own site; with fewer sites
        than labs, the tiles are dealt instead).
    """
    names = sorted(names)
    if isinstance(labs, int):
        if labs < 1:
            raise ValueError(f"expected at least 1 lab, got {labs}")
        keys = sorted({tcga_site(n) or n for n in names})
        by_tile = len(keys) < labs
        owner = {key: f"lab-{i % labs + 1}" for i, key in enumerate(names if by_tile else keys)}
        groups: dict[str, list[str]] = {f"lab-{i + 1}": [] for i in range(labs)}
        for name in names:
            groups[owner[name if by_tile else tcga_site(name) or name]].append(name)
        return groups
    owner = {site: lab for lab, sites in labs.items() for site in sites}
    groups = {lab: [] for lab in labs}
    for name in names:
        if (site := tcga_site(name)) not in owner:
            raise KeyError(f"{name}: TCGA site {site} is not mapped to any of {list(labs)}")
        groups[owner[site]].append(name)
    return groups


def split_folder(source: str | Path, target: str | Path, n_labs: int) -> list[Path]:
    """Split a dataset folder (``images/``, ``masks/``) into ``target/lab-1`` ... by TCGA site.

    Files are symlinked (copied where links are not possible); images without a mask
    are left out. Returns the lab folders.
    """
    source, target = Path(source), Path(target)
    images = {p.stem: p for p in (source / "images").iterdir() if p.is_file() and not p.name.startswith(".")}
    masks = {p.stem: p for p in (source / "masks").iterdir() if p.is_file()}
    groups = split_by_site([stem for stem in images if stem in masks], n_labs)
    for lab, stems in groups.items():
        for sub, files in (("images", images), ("masks", masks)):
            (target / lab / sub).mkdir(parents=True, exist_ok=True)
            for stem in stems:
                dst = target / lab / sub / files[stem].name
                if dst.exists():
                    continue
                try:
                    dst.symlink_to(files[stem].resolve())
                except OSError:
                    shutil.copy2(files[stem], dst)
    return [target / lab for lab in groups]


__all__ = ["split_by_site", "split_folder", "tcga_site"]
