"""Sub-commands of the ``napari-feddp`` CLI (see :mod:`napari_feddp.cli`)."""
