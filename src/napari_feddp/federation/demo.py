"""Synthetic lab datasets and the text table of a federated run (for the demo).

The synthetic tiles look vaguely like H&E (pink stroma, purple round nuclei)
and their masks mark the nuclei, so a U-Net can learn something in a few
steps. They are generated from a seed; no real data is involved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_synthetic_lab(directory: str | Path, *, n_tiles: int = 4, size: int = 64, seed: int = 0,
                       nuclei: tuple[int, int] = (4, 9)) -> Path:
    """Write ``n_tiles`` image/mask PNG pairs of ``size`` pixels, with ``nuclei`` (a range) nuclei each, to
    ``directory/images`` and ``/masks``; return ``directory``. Use a different ``seed`` per lab."""
    from PIL import Image

    root = Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for index in range(n_tiles):
        stroma = np.array([236, 170, 200], dtype=np.float64) + rng.normal(0, 8, 3)
        image = np.ones((size, size, 3)) * stroma + rng.normal(0, 10, (size, size, 3))
        mask = np.zeros((size, size), dtype=np.uint8)
        for _ in range(int(rng.integers(*nuclei))):
            cy, cx = rng.uniform(4, size - 4, 2)
            radius = rng.uniform(size / 20, size / 9)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            mask[blob] = 1
            image[blob] = np.array([110, 60, 150]) + rng.normal(0, 12, 3)
        image = np.clip(image, 0, 255).astype(np.uint8)
        Image.fromarray(image, mode="RGB").save(root / "images" / f"tile{index:03d}.png")
        Image.fromarray(mask * 255, mode="L").save(root / "masks" / f"tile{index:03d}.png")
    return root


_COLUMNS = (
    ("round", 5), ("accepted", 8), ("rejected", 8), ("declined", 8), ("failed", 6),
    ("examples", 8), ("loss", 7), ("dice", 6), ("epsilon", 7), ("seconds", 7),
)  # fmt: skip


def table_header() -> str:
    """Header line of the per-round table."""
    return "  ".join(name.rjust(width) for name, width in _COLUMNS)


def table_row(report: dict) -> str:
    """One line of the per-round table from a ``rounds.jsonl`` record."""
    values = [report.get("round"), *(len(report.get(kind) or ()) for kind in ("accepted", "rejected", "declined", "failed")),
              report.get("num_examples"), report.get("train_loss"), report.get("train_dice"), report.get("epsilon_max"),
              report.get("seconds")]  # fmt: skip
    cells = ["-" if value is None else f"{value:.{1 if name == 'seconds' else 3}f}" if isinstance(value, float)
             else str(value) for value, (name, _) in zip(values, _COLUMNS)]  # fmt: skip
    line = "  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, _COLUMNS))
    return line if report.get("aggregated", False) else line + "  (global model unchanged)"


def round_details(report: dict) -> list[str]:
    """Indented lines explaining rejected, declined and failed nodes."""
    return [f"        node {node} {kind}: {reason}" for kind in ("rejected", "declined", "failed")
            for node, reason in (report.get(kind) or {}).items()]  # fmt: skip


def evaluation_line(evaluation: dict | None) -> str:
    """Summary of the final federated evaluation."""
    if not evaluation or not evaluation.get("metrics"):
        return "final evaluation: no results"
    parts = ", ".join(f"{k}={v:.3f}" for k, v in sorted(evaluation["metrics"].items()))
    return f"final evaluation on {evaluation.get('nodes', 0)} node(s), {evaluation.get('num_examples', 0)} crops: {parts}"


def prepare_demo_labs(directory: str | Path, n_labs: int, *, data: str | Path | None = None, tiles: int = 4,
                      tile_size: int = 96, epsilon_budget: float = 0.0):
    """The demo's labs (:class:`~.pilot.LabSpec`, each with ``epsilon_budget``) and ``"synthetic"`` or the data folder.

    ``data`` is a dataset folder (``images/``, ``masks/``) split across the
    labs by TCGA site, or a folder with ``train/`` and ``test/`` such folders
    (as MoNuSeg): ``train/`` is split for training and ``test/`` gives each lab
    its held-out tiles. Without it every lab gets ``tiles`` synthetic tiles of
    ``tile_size`` pixels. The lab folders are made in ``directory``.
    """
    from .pilot import LabSpec
    from .sites import split_folder

    directory, root = Path(directory), Path(data) if data is not None else None
    eval_dirs: list[Path | None] = [None] * n_labs
    if root is None:
        folders = [make_synthetic_lab(directory / f"lab-{i + 1}", n_tiles=tiles, size=tile_size, seed=i)
                   for i in range(n_labs)]
    elif (root / "train" / "images").is_dir():
        folders = split_folder(root / "train", directory / "train", n_labs)
        if (root / "test" / "images").is_dir():
            eval_dirs = list(split_folder(root / "test", directory / "eval", n_labs))
    elif (root / "images").is_dir():
        folders = split_folder(root, directory / "train", n_labs)
    else:
        raise FileNotFoundError(f"data folder {root}: expected images/ and masks/, or train/ and test/ "
                                "folders that have them")
    labs = [LabSpec(name=f"lab-{i + 1}", data_dir=folder, max_epsilon=epsilon_budget, eval_dir=eval_dir)
            for i, (folder, eval_dir) in enumerate(zip(folders, eval_dirs))]
    return labs, "synthetic" if root is None else str(root)
