"""``napari-feddp`` command line: a thin layer over the core packages.

Each sub-command lives in :mod:`napari_feddp.commands` as a module with
``add_parser(subparsers)`` (which sets ``func`` on its parser) so that commands
stay small and independent.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .commands import CommandError

#: Modules under napari_feddp.commands, in the order shown by --help.
COMMAND_MODULES = ("info", "segment", "cohort", "evaluate", "federation", "ledger")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-feddp",
        description="Whole-slide segmentation and federated, differentially private training.",
    )
    parser.add_argument("--version", action="version", version=f"napari-feddp {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"napari_feddp.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("napari-feddp: interrupted", file=sys.stderr)
        return 130
    except (CommandError, FileNotFoundError, ValueError) as exc:
        print(f"napari-feddp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permission, a file removed under the run
        print(f"napari-feddp {args.command}: error: {exc}", file=sys.stderr)
        return 3
    except (MemoryError, RuntimeError) as exc:
        from .segmentation import CLI_CONTROLS, is_out_of_memory, user_message

        if not is_out_of_memory(exc):
            raise
        # Reads that zarr's I/O loop had in flight when memory ran out are abandoned; asyncio
        # would log each one at exit ("Task was destroyed but it is pending") after our message.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        print(f"napari-feddp {args.command}: error: {user_message(exc, CLI_CONTROLS)}", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
