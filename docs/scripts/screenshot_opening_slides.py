"""Regenerate docs/images/opening-slides.png: napari showing the sample slide.

Run from the repository root (a display or Xvfb is needed):

    xvfb-run -a .venv/bin/python docs/scripts/screenshot_opening_slides.py
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import QApplication
from skimage.io import imsave
from skimage.transform import resize

from napari_feddp.demo import build_viewer

OUT = Path(__file__).resolve().parents[1] / "images" / "opening-slides.png"


def main() -> None:
    viewer = build_viewer(show=True)
    viewer.window.resize(1500, 900)
    viewer.reset_view()
    for _ in range(20):  # let Qt lay out the dock widgets before grabbing
        QApplication.processEvents()
    print("docked:", list(viewer.window.dock_widgets))
    shot = viewer.screenshot(canvas_only=False, flash=False)
    # Two thirds of full size keeps the committed PNG small while staying readable.
    small = resize(shot, (shot.shape[0] * 2 // 3, shot.shape[1] * 2 // 3), preserve_range=True, anti_aliasing=True)
    imsave(OUT, small.astype("uint8"), check_contrast=False)
    viewer.close()
    print(f"wrote {OUT} ({small.shape[1]}x{small.shape[0]})")


if __name__ == "__main__":
    main()
