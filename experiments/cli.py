"""``python -m experiments run|report|bundle``: centralized vs local vs FedAvg vs FedDP on MoNuSeg.

Run from the repository root; the package under test is the installed ``napari_feddp``.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_DATA = "(default: monuseg/ in $FEDDP_SHARED_DATA, else in shared/data beside the checkout)"


class UsageError(Exception):
    """An option the harness refuses: printed as one line, exit status 2."""


#: ``run`` options that override a shared setting of the budget (option -> ``RunSettings`` field).
SETTING_OPTIONS = {"rounds": "num_rounds", "local_steps": "max_steps", "batch_size": "batch_size",
                   "base_width": "model_base_width", "mpp": "mpp", "rim_fraction": "rim_fraction"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="compare centralized, local-only, FedAvg and FedDP training (MoNuSeg)")
    sub = parser.add_subparsers(dest="command", metavar="ACTION")
    run_p = sub.add_parser("run", help="train and score the settings, write JSON, table and plots")
    run_p.add_argument("--out", required=True, help="output folder (JSON per setting/seed, table.md, PNGs)")
    run_p.add_argument("--quick", action="store_true",
                       help="smoke run in a few minutes (tiny crops, 1 round, 2 hospitals, 2 test images)")
    run_p.add_argument("--settings", nargs="+", metavar="NAME",
                       help="subset of: centralized local fedavg feddp-eps1 feddp-eps3 feddp-eps8 feddp-update "
                            "(default: all of them); on request only: the privacy-cost sweep feddp-eps16 feddp-eps32 "
                            "and the clipping-only diagnostic feddp-clip (DP-SGD path without noise, no privacy)")
    run_p.add_argument("--seeds", type=int, default=1, help="seeds per setting (mean ± std)")
    run_p.add_argument("--data", help=f"MoNuSeg folder with train/ and test/ {DEFAULT_DATA}")
    run_p.add_argument("--scratch", help="where hospital patches are written (default: OUT/hospitals)")
    run_p.add_argument("--rounds", type=int, help="override the federated rounds")
    run_p.add_argument("--local-steps", type=int, help="override the local steps per round")
    run_p.add_argument("--batch-size", type=int, help="override the shared batch size")
    run_p.add_argument("--base-width", type=int, help="override the U-Net base width (channels of the first level)")
    run_p.add_argument("--mpp", type=float, help="override the model's pixel size in µm (default 0.5)")
    run_p.add_argument("--foreground-only", action="store_true",
                       help="two-class models (background, nucleus; nuclei split by a distance watershed) "
                            "instead of contour models (background, nucleus, contour)")
    run_p.add_argument("--rim-fraction", type=float, metavar="F",
                       help="contour models: the contour class is each nucleus's rim, cut from its normalised "
                            "inner-distance map at F (0 < F < 1; default 0: the one-pixel outline)")
    run_p.add_argument("--holdout", metavar="HOSPITAL",
                       help="model selection on training data: leave this hospital out of training and score "
                            "on its MoNuSeg training tiles instead of the test split")
    run_p.add_argument("--dp-batch-size", type=int,
                       help="batch size of the sample-level DP runs (default: the shared batch size)")
    run_p.add_argument("--dp-local-steps", type=int,
                       help="local steps per round of the sample-level DP runs (default: the shared value)")
    run_p.add_argument("--dp-lr", type=float,
                       help="Adam learning rate of the sample-level DP runs (default: the shared one)")
    run_p.add_argument("--dp-augmentations", type=int, metavar="K",
                       help="augmentation multiplicity of the sample-level DP runs: each tile's gradient is the "
                            "mean over K augmented crops before clipping (default 1)")
    run_p.add_argument("--pretrain-steps", type=int,
                       help="steps of public pretraining (CC0 sample slide, pseudo-labels) giving every setting "
                            "its initial model; 0 starts from a random init (default: the budget's)")
    run_p.add_argument("--pretrain-data", choices=("cmu1", "tnbc"),
                       help="public pretraining data: cmu1, the CC0 sample slide with pseudo-labels (default), "
                            "or tnbc, the annotated TNBC set (foreground-only models)")
    run_p.add_argument("--rerun", action="store_true",
                       help="run again (setting, seed) pairs whose JSON is already in --out (default: keep them)")
    run_p.add_argument("--round-eval", type=int, default=None,
                       help="score each round's global model on the first N test images (Dice-vs-round plot)")
    run_p.set_defaults(func=run)
    rep_p = sub.add_parser("report", help="rebuild table.md, summary.json and plots from an output folder")
    rep_p.add_argument("--out", required=True)
    rep_p.set_defaults(func=report)
    bun_p = sub.add_parser("bundle", help="ship a FedDP run's model as the package's default model (with its card)")
    which = bun_p.add_mutually_exclusive_group(required=True)
    which.add_argument("--record", help="the run's JSON, e.g. runs/monuseg/feddp-eps8-s0.json")
    which.add_argument("--rescore", action="store_true",
                       help="keep the shipped weights; score them again and rewrite the card's test metrics")
    bun_p.add_argument("--dest", default=None,
                       help="checkpoint stem to write (default: src/napari_feddp/data/models/feddp-nuclei "
                            "of this source tree)")
    bun_p.add_argument("--data", help=f"MoNuSeg folder with test/ {DEFAULT_DATA}")
    bun_p.set_defaults(func=bundle)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UsageError, OSError, ValueError, KeyError) as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    from pathlib import Path

    from .runner import SETTINGS, run_grid

    unknown = [s for s in args.settings or [] if s not in SETTINGS]
    if unknown:
        raise UsageError(f"unknown setting(s) {unknown}; expected some of {list(SETTINGS)}")
    if args.seeds < 1:
        raise UsageError("--seeds: expected a positive integer")
    records = run_grid(args.out, settings=args.settings, seeds=args.seeds, quick=args.quick, budget=budget_of(args),
                       data=args.data, scratch=args.scratch, rerun=args.rerun)
    print(f"{len(records)} run(s); table: {Path(args.out) / 'table.md'}")
    print((Path(args.out) / "table.md").read_text())
    return 0


def budget_of(args):
    """The :class:`~experiments.runner.Budget` the ``run`` options ask for (``--quick``: the smoke run's)."""
    from dataclasses import replace
    from pathlib import Path

    from napari_feddp.federation.settings import SettingsError

    from .runner import Budget, quick_budget

    budget = quick_budget() if args.quick else Budget()
    changes = {name: getattr(args, option) for option, name in SETTING_OPTIONS.items()
               if getattr(args, option) is not None}
    try:
        budget = replace(budget, settings=budget.settings.replace(**changes))
    except SettingsError as exc:
        flags = {name.replace("_", "-"): "--" + option.replace("_", "-") for option, name in SETTING_OPTIONS.items()}
        raise UsageError("; ".join(f"{flags.get(key, key)}: {problem}" if key else problem
                                   for key, problem in exc.problems)) from None
    if args.holdout:
        if args.holdout not in budget.hospitals:
            raise UsageError(f"--holdout: expected one of {list(budget.hospitals)}, got {args.holdout!r}")
        budget = replace(budget, holdout=args.holdout)
    if args.foreground_only:
        if args.rim_fraction:
            raise UsageError("--rim-fraction: contour models only; drop --foreground-only")
        budget = replace(budget, contours=False)
    if args.dp_batch_size:
        budget = replace(budget, dp_batch_size=args.dp_batch_size)
    if args.dp_local_steps:
        budget = replace(budget, dp_local_steps=args.dp_local_steps)
    if args.dp_lr:
        if args.dp_lr <= 0:
            raise UsageError("--dp-lr: expected a positive learning rate")
        budget = replace(budget, dp_learning_rate=args.dp_lr)
    if args.dp_augmentations is not None:
        if not 1 <= args.dp_augmentations <= 32:
            raise UsageError("--dp-augmentations: expected 1 to 32 augmented crops per tile")
        budget = replace(budget, dp_augmentations=args.dp_augmentations if args.dp_augmentations > 1 else None)
    if args.pretrain_steps is not None:
        if args.pretrain_steps < 0:
            raise UsageError("--pretrain-steps: expected 0 (random init) or a positive number of steps")
        budget = replace(budget, pretrain_steps=args.pretrain_steps)
    if args.pretrain_data:
        if not budget.pretrain_steps:
            raise UsageError("--pretrain-data: give --pretrain-steps N (N > 0) too")
        if args.pretrain_data == "tnbc" and budget.contours:
            raise UsageError("--pretrain-data tnbc: TNBC's masks are binary; add --foreground-only")
        budget = replace(budget, pretrain_data=None if args.pretrain_data == "cmu1" else args.pretrain_data)
    if args.round_eval:
        from .runner import find_monuseg, first_test_names

        root = Path(args.data) if args.data else find_monuseg()
        budget = replace(budget, round_eval_names=first_test_names(root / "test", args.round_eval))
    return budget


def bundle(args) -> int:
    from pathlib import Path

    from napari_feddp.models import read_card
    from napari_feddp.models.store import BUNDLED_STEM

    from .bundle import bundle_from_record, rescore_default_model

    models = Path(__file__).resolve().parents[1] / "src" / "napari_feddp" / "data" / "models"
    dest = Path(args.dest) if args.dest else models / BUNDLED_STEM
    try:
        if args.rescore:
            path = rescore_default_model(dest, data=args.data)
        else:
            path = bundle_from_record(args.record, dest, data=args.data)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot bundle {args.record or dest}: {exc}") from exc
    card = read_card(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(", ".join(f"{k} {v:.4f}" for k, v in card.metrics.items()))
    return 0


def report(args) -> int:
    from pathlib import Path

    from .report import write_report

    result = write_report(args.out)
    print((Path(args.out) / "table.md").read_text())
    for plot in result["plots"]:
        print(plot)
    return 0
