"""napari dock widgets of napari-feddp (Qt lives here, never in the core)."""

#: Text colour of error and warning messages in every widget (readable on napari's dark and light themes).
ERROR_COLOR = "#ff6b6b"
