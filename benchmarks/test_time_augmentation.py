"""Test-time augmentation side by side: each model scored with and without it, in one run.

Run from the repository root after the experiment runs exist::

    .venv/bin/python benchmarks/test_time_augmentation.py \
        --set held_out=runs/val-h5/fg-dist/holdout-h5-mixed \
        --model held_out:feddp_dist=runs/val-h5/fg-dist/feddp-dist-eps8-s0.json ...

Writes ``benchmarks/results/test_time_augmentation.json`` (``--out`` to change)::

    {"sets": {NAME: FOLDER}, "rows": {"SET:ROW": {"plain": {...}, "tta": {...}, "gain": {...},
     "checkpoints": [...], "seeds": n}}}

``plain`` and ``tta`` hold ``aji``, ``pq``, ``dice``, ``jaccard``, ``accuracy`` and ``seconds``,
means over the row's checkpoints (one per seed; ``--model SET:ROW=RUN.json`` may repeat a row to
add seeds), each scored by :func:`napari_feddp.evaluation.evaluate_folder` exactly as
``napari-feddp evaluate [--tta]`` does; ``gain`` is ``tta - plain`` with the standard error over
seeds. A run record (the runner's ``SETTING-sN.json``) names its checkpoint; a ``.safetensors``
path is taken as it is. Images are at 0.25 µm/px (MoNuSeg; ``--mpp`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

KEYS = ("aji", "pq", "dice", "jaccard", "accuracy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", required=True, metavar="NAME=FOLDER",
                        help="an image set: folder with images/, masks/ and instances/")
    parser.add_argument("--model", action="append", required=True, metavar="SET:ROW=RUN",
                        help="a run record (.json) or checkpoint (.safetensors) scored on SET as ROW")
    parser.add_argument("--mpp", type=float, default=0.25, help="µm per pixel of the images")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "test_time_augmentation.json")
    args = parser.parse_args(argv)
    args.sets = dict(item.split("=", 1) for item in args.set)
    args.models = []
    for item in args.model:
        key, run = item.split("=", 1)
        name, row = key.split(":", 1)
        if name not in args.sets:
            parser.error(f"--model {item}: no --set named {name!r}")
        args.models.append((name, row, Path(run)))
    return args


def checkpoint_of(run: Path) -> Path:
    """The checkpoint a run record names, or ``run`` itself when it is a checkpoint."""
    if run.suffix == ".json":
        path = Path(json.loads(run.read_text())["checkpoint"])
        return path if path.is_absolute() else REPO / path
    return run


def score(folder: str, loaded, mpp: float, augment: bool) -> dict:
    from napari_feddp.evaluation import evaluate_folder

    started = time.perf_counter()
    report = evaluate_folder(folder, loaded, mpp=mpp, device="cpu", augment=augment).to_dict()
    return {**{k: report[k] for k in KEYS}, "seconds": time.perf_counter() - started}


def summarise(scored: list[dict]) -> dict:
    def mean(which: str, key: str) -> float:
        return statistics.fmean(s[which][key] for s in scored)

    out = {which: {k: mean(which, k) for k in (*KEYS, "seconds")} for which in ("plain", "tta")}
    gains = {k: [s["tta"][k] - s["plain"][k] for s in scored] for k in KEYS}
    out["gain"] = {k: statistics.fmean(v) for k, v in gains.items()}
    if len(scored) > 1:
        out["gain_stderr"] = {k: statistics.stdev(v) / len(v) ** 0.5 for k, v in gains.items()}
    out["raised_every_seed"] = {k: all(g > 0 for g in v) for k, v in gains.items()}
    out["seeds"] = len(scored)
    out["checkpoints"] = [s["checkpoint"] for s in scored]
    return out


def main(argv: list[str] | None = None) -> dict:
    import torch

    from napari_feddp.segmentation import load_model

    args = parse_args(argv)
    started = time.perf_counter()
    rows: dict[str, list[dict]] = {}
    for name, row, run in args.models:
        checkpoint = checkpoint_of(run)
        loaded = load_model(checkpoint)  # once: both variants score the same weights
        entry = {"checkpoint": str(checkpoint.relative_to(REPO) if checkpoint.is_relative_to(REPO) else checkpoint)}
        for augment, which in ((False, "plain"), (True, "tta")):
            entry[which] = score(args.sets[name], loaded, args.mpp, augment)
        rows.setdefault(f"{name}:{row}", []).append(entry)
        print(f"{name}:{row} {entry['checkpoint']}: " + ", ".join(
            f"{k} {entry['plain'][k]:.4f} -> {entry['tta'][k]:.4f}" for k in ("dice", "aji", "pq")), flush=True)
    result = {
        "benchmark": "test_time_augmentation",
        "method": "mean class probabilities over the 8 flips and 90-degree rotations of every tile "
                  "(segment_slide(augment=True)), each mapped back; nuclei by the same watershed",
        "sets": args.sets, "mpp": args.mpp,
        "rows": {key: summarise(scored) for key, scored in rows.items()},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - started, 1),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
