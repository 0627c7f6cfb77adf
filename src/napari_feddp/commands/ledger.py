"""``napari-feddp ledger show|reset``: what a dataset's tiles have spent, and a deliberate fresh start.

* ``show``  - epsilon spent (worst case over the tiles), the rounds that count, each tile's epsilon.
* ``reset`` - log a reset in the ledger directory so that the dataset's current tiles start
  again from epsilon 0; needs ``--reason`` and ``--yes``. Nothing is deleted.

Both read only the lab's own disk; nothing is sent anywhere.
"""

from __future__ import annotations

import getpass
import json
from dataclasses import asdict
from pathlib import Path

from . import CommandError


def add_parser(subparsers) -> None:
    """Add ``ledger`` and its sub-commands to the top-level parser."""
    parser = subparsers.add_parser(
        "ledger",
        help="show the privacy budget a dataset has spent, or deliberately reset it (show, reset)",
        description="Privacy ledger of a lab: epsilon is tracked per tile (by content), whatever the lab's name.",
    )
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    sub = parser.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND")

    show = sub.add_parser("show", help="print epsilon spent, the rounds that count and each tile's epsilon")
    _add_common(show)
    show.add_argument("--delta", type=float, help="delta of the epsilons (default: the ledger's)")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(func=run_show)

    reset = sub.add_parser(
        "reset", help="start the dataset's privacy budget again from 0 (logged; needs --reason and --yes)")
    _add_common(reset)
    reset.add_argument("--reason", required=True, help="why the budget starts again (stored in the log)")
    reset.add_argument("--operator", default=None, help="who decides it (default: the current user name)")
    reset.add_argument("--yes", action="store_true", help="confirm; without it nothing is changed")
    reset.set_defaults(func=run_reset)


def _add_common(parser) -> None:
    parser.add_argument("--ledger-dir", default="", help="privacy ledger folder (default: $FEDDP_HOME/ledger, "
                        "$FEDDP_HOME being the per-user data folder unless set)")
    parser.add_argument("--dataset", required=True, help="dataset folder with images/ and masks/")


def _ledger_dir(args) -> Path:
    if args.ledger_dir:
        return Path(args.ledger_dir).expanduser()
    from ..models.store import feddp_home

    return feddp_home() / "ledger"


def _report(args, delta=None):
    from ..training import DatasetError, LedgerError, privacy_report

    try:
        return privacy_report(_ledger_dir(args), Path(args.dataset).expanduser(), delta=delta)
    except (DatasetError, LedgerError, ValueError) as exc:
        raise CommandError(str(exc)) from None


def run_show(args) -> int:
    """Print what the dataset's tiles have spent."""
    report = _report(args, args.delta)
    if args.json:
        print(json.dumps(asdict(report), indent=2, default=str))
        return 0
    trained = [t for t in report.tiles if t.n_rounds]
    print(f"ledger dir: {report.ledger_dir}")
    print(f"dataset:    {report.dataset_dir} ({len(report.tiles)} tiles)")
    print(f"epsilon:    {report.epsilon:.4f} at delta={report.delta:g} ({report.accountant}), "
          f"worst case over the tiles")
    print(f"rounds:     {len(report.rounds)}")
    for r in report.rounds:
        print(f"  {r.timestamp}  lab {r.lab_id or '?'}  round {r.round_id}  {r.steps} steps  "
              f"noise {r.noise_multiplier:g}  sample rate {r.sample_rate:g}  epsilon of round {r.epsilon_round:.4f}")
    print(f"tiles:      {len(trained)} trained, {len(report.tiles) - len(trained)} never trained")
    for t in report.tiles:
        print(f"  {t.name}  {t.hash[:12]}  {t.n_rounds} round(s)  epsilon {t.epsilon:.4f}")
    if report.resets:
        print(f"resets:     {len(report.resets)}")
        for reset in report.resets:
            print(f"  {reset.timestamp}  by {reset.operator or '?'}: {reset.reason} "
                  f"({len(reset.tiles)} tiles released at epsilon {reset.epsilon:.4f})")
    return 0


def run_reset(args) -> int:
    """Log a reset of the dataset's tiles, after ``--yes``."""
    from ..training import DatasetError, LedgerError, reset_ledger

    if not args.reason.strip():
        raise CommandError("--reason: expected a non-empty explanation of why the privacy budget starts again")
    report = _report(args)
    trained = [t for t in report.tiles if t.n_rounds]
    if not trained:
        raise CommandError(f"dataset {report.dataset_dir} has spent no privacy budget in {report.ledger_dir}: "
                           f"nothing to reset")
    if not args.yes:
        raise CommandError(f"not resetting without --yes: {len(trained)} tile(s) of {report.dataset_dir} would "
                           f"start again from epsilon 0 (spent: {report.epsilon:.4f} at delta={report.delta:g}, "
                           f"{len(report.rounds)} round(s))")
    operator = args.operator if args.operator is not None else _user()
    try:
        reset = reset_ledger(report.ledger_dir, report.dataset_dir, reason=args.reason, operator=operator)
    except (DatasetError, LedgerError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    print(f"released {len(reset.tiles)} tile(s) of {report.dataset_dir} from {len(reset.rounds)} round(s); "
          f"they had spent epsilon {reset.epsilon:.4f} at delta={reset.delta:g}")
    for t in trained:
        print(f"  {t.name}  {t.hash[:12]}  epsilon {t.epsilon:.4f} -> 0")
    print(f"logged in {report.ledger_dir / 'resets.jsonl'} (reset {reset.index}, by {reset.operator or '?'}: "
          f"{reset.reason})")
    return 0


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in the environment or the password database
        return ""
