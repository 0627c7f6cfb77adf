"""``napari-feddp experiment run|report|bundle``: centralized vs local vs FedAvg vs FedDP on MoNuSeg."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "experiment", help="compare centralized, local-only, FedAvg and FedDP training (MoNuSeg)")
    sub = parser.add_subparsers(dest="experiment_command", metavar="ACTION")
    run_p = sub.add_parser("run", help="train and score the settings, write JSON, table and plots")
    run_p.add_argument("--out", required=True, help="output folder (JSON per setting/seed, table.md, PNGs)")
    run_p.add_argument("--quick", action="store_true",
                       help="smoke run in a few minutes (tiny crops, 1 round, 2 hospitals, 2 test images)")
    run_p.add_argument("--settings", nargs="+", metavar="NAME",
                       help="subset of: centralized local fedavg feddp-eps1 feddp-eps3 feddp-eps8 feddp-update "
                            "(default: all of them); on request only: the privacy-cost sweep feddp-eps16 feddp-eps32 "
                            "and the clipping-only diagnostic feddp-clip (DP-SGD path without noise, no privacy)")
    run_p.add_argument("--seeds", type=int, default=1, help="seeds per setting (mean ± std)")
    run_p.add_argument("--data", help="MoNuSeg folder with train/ and test/ (default: $FEDDP_SHARED_DATA/monuseg)")
    run_p.add_argument("--scratch", help="where hospital patches are written (default: OUT/hospitals)")
    run_p.add_argument("--rounds", type=int, help="override the federated rounds")
    run_p.add_argument("--local-steps", type=int, help="override the local steps per round")
    run_p.add_argument("--batch-size", type=int, help="override the shared batch size")
    run_p.add_argument("--base-width", type=int, help="override the U-Net base width (channels of the first level)")
    run_p.add_argument("--mpp", type=float, help="override the model's pixel size in µm (default 0.5)")
    run_p.add_argument("--foreground-only", action="store_true",
                       help="two-class models (background, nucleus; nuclei split by a distance watershed) "
                            "instead of contour models (background, nucleus, contour)")
    run_p.add_argument("--holdout", metavar="HOSPITAL",
                       help="model selection on training data: leave this hospital out of training and score "
                            "on its MoNuSeg training tiles instead of the test split")
    run_p.add_argument("--dp-batch-size", type=int,
                       help="batch size of the sample-level DP runs (default: the shared batch size)")
    run_p.add_argument("--dp-local-steps", type=int,
                       help="local steps per round of the sample-level DP runs (default: the shared value)")
    run_p.add_argument("--dp-lr", type=float,
                       help="Adam learning rate of the sample-level DP runs (default: the shared one)")
    run_p.add_argument("--pretrain-steps", type=int,
                       help="steps of public pretraining (CC0 sample slide, pseudo-labels) giving every setting "
                            "its initial model; 0 starts from a random init (default: the budget's)")
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
    bun_p.add_argument("--data", help="MoNuSeg folder with test/ (default: $FEDDP_SHARED_DATA/monuseg)")
    bun_p.set_defaults(func=bundle)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run(args) -> int:
    from dataclasses import replace
    from pathlib import Path

    from ..experiments.runner import SETTINGS, Budget, quick_budget, run_grid
    from . import CommandError

    unknown = [s for s in args.settings or [] if s not in SETTINGS]
    if unknown:
        raise CommandError(f"unknown setting(s) {unknown}; expected some of {list(SETTINGS)}")
    if args.seeds < 1:
        raise CommandError("--seeds: expected a positive integer")
    budget = quick_budget() if args.quick else Budget()
    if args.rounds:
        budget = replace(budget, rounds=args.rounds)
    if args.local_steps:
        budget = replace(budget, local_steps=args.local_steps)
    for name, value in (("batch_size", args.batch_size), ("base_width", args.base_width)):
        if value is not None:
            if value < 1:
                raise CommandError(f"--{name.replace('_', '-')}: expected a positive integer")
            budget = replace(budget, **{name: value})
    if args.holdout:
        if args.holdout not in budget.hospitals:
            raise CommandError(f"--holdout: expected one of {list(budget.hospitals)}, got {args.holdout!r}")
        budget = replace(budget, holdout=args.holdout)
    if args.mpp is not None:
        if not args.mpp > 0:
            raise CommandError(f"--mpp: expected a positive number of µm per pixel, received {args.mpp}")
        budget = replace(budget, mpp=args.mpp)
    if args.foreground_only:
        budget = replace(budget, contours=False)
    if args.dp_batch_size:
        budget = replace(budget, dp_batch_size=args.dp_batch_size)
    if args.dp_local_steps:
        budget = replace(budget, dp_local_steps=args.dp_local_steps)
    if args.dp_lr:
        if args.dp_lr <= 0:
            raise CommandError("--dp-lr: expected a positive learning rate")
        budget = replace(budget, dp_learning_rate=args.dp_lr)
    if args.pretrain_steps is not None:
        if args.pretrain_steps < 0:
            raise CommandError("--pretrain-steps: expected 0 (random init) or a positive number of steps")
        budget = replace(budget, pretrain_steps=args.pretrain_steps)
    if args.round_eval:
        from ..experiments.runner import _find_data, first_test_names

        root = Path(args.data) if args.data else _find_data()
        budget = replace(budget, round_eval_names=first_test_names(root / "test", args.round_eval))
    try:
        records = run_grid(args.out, settings=args.settings, seeds=args.seeds, quick=args.quick, budget=budget,
                           data=args.data, scratch=args.scratch, rerun=args.rerun)
    except ValueError as exc:  # a finished run in --out made with another budget
        raise CommandError(str(exc)) from exc
    print(f"{len(records)} run(s); table: {Path(args.out) / 'table.md'}")
    print((Path(args.out) / "table.md").read_text())
    return 0


def bundle(args) -> int:
    from pathlib import Path

    from ..experiments.bundle import bundle_from_record, rescore_default_model
    from ..models import read_card
    from ..models.store import BUNDLED_STEM
    from . import CommandError

    dest = Path(args.dest) if args.dest else Path(__file__).resolve().parents[1] / "data" / "models" / BUNDLED_STEM
    try:
        if args.rescore:
            path = rescore_default_model(dest, data=args.data)
        else:
            path = bundle_from_record(args.record, dest, data=args.data)
    except (OSError, ValueError, KeyError) as exc:
        raise CommandError(f"cannot bundle {args.record or dest}: {exc}") from exc
    card = read_card(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(", ".join(f"{k} {v:.4f}" for k, v in card.metrics.items()))
    return 0


def report(args) -> int:
    from pathlib import Path

    from ..experiments.report import write_report

    result = write_report(args.out)
    print((Path(args.out) / "table.md").read_text())
    for plot in result["plots"]:
        print(plot)
    return 0
