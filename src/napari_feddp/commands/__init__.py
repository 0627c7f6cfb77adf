"""Sub-commands of the ``napari-feddp`` CLI (see :mod:`napari_feddp.cli`)."""


class CommandError(Exception):
    """Bad input on the command line: printed as one line, exit code 2."""


def add_tta_option(parser) -> None:
    """``--tta``, shared by the commands that run the model."""
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average each tile over its 8 flips/rotations (8x the model time)")
