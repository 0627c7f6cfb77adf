"""Sub-commands of the ``napari-feddp`` CLI (see :mod:`napari_feddp.cli`)."""


class CommandError(Exception):
    """Bad input on the command line: printed as one line, exit code 2."""
