"""Regenerate the user guide's screenshots of the viewer in ``docs/images/``.

Runs the pathologist's loop in a real napari viewer on the bundled CMU-1 sample
with the bundled default model, and grabs the window at each step:

``viewer-segment.png``
    The **Segment** dock after a run, the result over the slide.
``viewer-correct.png``
    A false detection (an object in pink stroma) erased with the Labels eraser,
    circled, with the same spot before the correction as an inset.
``viewer-training-set.png``
    The **Add to training set** dock after adding the corrected view.
``viewer-federation.png``
    The **Federation** dock with the lab's dataset and its privacy policy line.

The lab data folder (model store, ledgers), the saved label map and the
dataset are created in a temporary folder that is deleted at the end, so the
bundled model is the default whatever the user's own model store holds, and
nothing outside ``docs/images/`` is kept. Each PNG is reduced (fewer colours,
then a smaller size) until it is under :data:`MAX_BYTES`.

Run from the repository root (a display or Xvfb is needed)::

    xvfb-run -a .venv/bin/python scripts/user_guide_screenshots.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from io import BytesIO
from pathlib import Path

import numpy as np

PLUGIN = "napari-feddp"
OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
#: Largest PNG written (bytes).
MAX_BYTES = 300_000
#: Window size (fits ``xvfb-run``'s default 1280 x 1024 screen).
WINDOW = (1280, 800)
#: Level-0 (y, x) pixel of the sample the views are centred on: tissue with nuclei.
CENTRE = (1300, 1050)


def settle(rounds: int = 20) -> None:
    """Let Qt lay out and paint (docks, canvas) before a grab."""
    from qtpy.QtWidgets import QApplication

    for _ in range(rounds):
        QApplication.processEvents()


def save_png(shot: np.ndarray, path: Path, max_bytes: int = MAX_BYTES) -> Path:
    """Write an RGB(A) screenshot as a PNG of at most ``max_bytes``.

    The image is first reduced to a 256-colour palette; if that is still too
    large it is also scaled down, in steps, until it fits.

    Parameters
    ----------
    shot : ndarray
        ``(H, W, 3 or 4)`` uint8 pixels, as ``viewer.screenshot`` returns them.
    path : Path
        PNG to write.
    max_bytes : int
        Size limit of the file.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    RuntimeError
        If even the smallest size tried does not fit.
    """
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(shot[..., :3]))
    for scale in (1.0, 0.9, 0.8, 0.7, 0.6):
        size = (round(image.width * scale), round(image.height * scale))
        resized = image if scale == 1.0 else image.resize(size, Image.Resampling.LANCZOS)
        palette = resized.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buffer = BytesIO()
        palette.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= max_bytes:
            path.write_bytes(buffer.getvalue())
            print(f"wrote {path} ({size[0]} x {size[1]}, {buffer.tell() // 1000} kB)")
            return path
    raise RuntimeError(f"{path.name}: still above {max_bytes} bytes at 60 % of full size")


def grab(viewer, name: str, out: Path) -> Path:
    """Grab the whole window (canvas and docks) into ``out/name``."""
    settle()
    return save_png(viewer.screenshot(canvas_only=False, flash=False), out / name)


def canvas_rect(viewer) -> tuple[int, int, int, int]:
    """``(left, top, width, height)`` of the canvas in a whole-window screenshot."""
    from qtpy.QtCore import QPoint

    native = viewer.window._qt_viewer.canvas.native
    corner = native.mapTo(viewer.window._qt_window, QPoint(0, 0))
    return corner.x(), corner.y(), native.width(), native.height()


def with_before_inset(window: np.ndarray, before: np.ndarray, rect: tuple[int, int, int, int],
                      radius: float) -> np.ndarray:
    """The window after a correction, with the canvas centre circled and a "before" inset.

    Parameters
    ----------
    window : ndarray
        Whole-window screenshot after the correction.
    before : ndarray
        Canvas-only screenshot before it, same camera.
    rect : (left, top, width, height)
        The canvas in ``window`` (:func:`canvas_rect`).
    radius : float
        Screen pixels around the canvas centre that the correction touched.

    Returns
    -------
    ndarray
        RGB pixels: the canvas centre circled in yellow in the window, and the
        same spot before the correction pasted in the canvas's top-left corner.
    """
    from PIL import Image, ImageDraw, ImageFont

    left, top, width, height = rect
    image = Image.fromarray(np.ascontiguousarray(window[..., :3]))
    canvas = Image.fromarray(np.ascontiguousarray(before[..., :3]))
    scale_x, scale_y = canvas.width / width, canvas.height / height  # device pixels per widget pixel
    r = radius + 8
    half = int(r + 40)
    cx, cy = canvas.width / 2, canvas.height / 2
    inset = canvas.crop((int(cx - half * scale_x), int(cy - half * scale_y),
                         int(cx + half * scale_x), int(cy + half * scale_y))).resize((2 * half, 2 * half))
    draw = ImageDraw.Draw(inset)
    draw.ellipse((half - r, half - r, half + r, half + r), outline=(255, 215, 0), width=3)
    draw.rectangle((0, 0, 2 * half - 1, 2 * half - 1), outline=(255, 215, 0), width=3)
    draw.rectangle((3, 3, 72, 26), fill=(38, 41, 48))
    draw.text((9, 5), "before", fill=(255, 255, 255), font=ImageFont.load_default(size=16))
    draw = ImageDraw.Draw(image)
    ax, ay = left + width / 2, top + height / 2
    draw.ellipse((ax - r, ay - r, ax + r, ay + r), outline=(255, 215, 0), width=3)
    image.paste(inset, (left + 12, top + 12))
    return np.asarray(image)


def wait_for_run(segment, timeout: float = 600.0) -> None:
    """Process Qt events until the Segment widget's run has finished (its Run button is enabled again)."""
    import time

    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + timeout
    while not segment.run_button.enabled:
        if time.monotonic() > deadline:
            raise TimeoutError(f"segmentation still running after {timeout:.0f} s")
        QApplication.processEvents()
        time.sleep(0.02)


def false_detection(image_layer, labels: np.ndarray, box: tuple[int, int, int, int],
                    min_area: int = 80) -> np.ndarray:
    """The detected object in ``box`` with the least haematoxylin: a pathologist would erase it.

    Nuclei are haematoxylin-rich; an object the model found in pink (eosin)
    stroma, typically at a tissue edge, is a false detection.

    Parameters
    ----------
    image_layer : napari.layers.Image
        The slide (level 0 is read for ``box`` only).
    labels : ndarray
        The result's label map, in the slide's level-0 pixels.
    box : (y0, x0, y1, x1)
        Level-0 region to look in.
    min_area : int
        Smaller objects are left alone (too small to see in a screenshot).

    Returns
    -------
    ndarray
        ``(N, 2)`` level-0 ``(y, x)`` pixels of the object.

    Raises
    ------
    RuntimeError
        If the region has no object of at least ``min_area`` pixels.
    """
    from scipy import ndimage
    from skimage.color import rgb2hed

    y0, x0, y1, x1 = box
    level0 = image_layer.data[0] if image_layer.multiscale else image_layer.data
    haematoxylin = rgb2hed(np.asarray(level0[y0:y1, x0:x1, :3]))[..., 0]
    objects, count = ndimage.label(labels[y0:y1, x0:x1] > 0)
    index = np.arange(1, count + 1)
    area = ndimage.sum_labels(np.ones_like(objects), objects, index)
    mean = ndimage.mean(haematoxylin, objects, index)
    big = area >= min_area
    if not big.any():
        raise RuntimeError(f"no detected object of {min_area} pixels or more in {box}")
    chosen = index[big][np.argmin(mean[big])]
    ys, xs = np.nonzero(objects == chosen)
    return np.stack([ys + y0, xs + x0], axis=1)


def main(argv: list[str] | None = None) -> int:
    """Run the loop and write the screenshots; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs (default: docs/images)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="feddp-guide-"))
    os.environ["FEDDP_HOME"] = str(work / "home")  # an empty model store: the bundled model is the default

    import napari

    from napari_feddp.models.store import bundled_checkpoint

    if bundled_checkpoint() is None:
        print("This version ships no bundled model: nothing to show.")
        return 1
    viewer = napari.Viewer(title="napari", show=True)
    try:
        viewer.window._qt_window.resize(*WINDOW)
        viewer.canvas.overlays.scale_bar.visible = True  # the slide is in µm
        (image,) = viewer.open_sample(PLUGIN, "cmu1_small_region")
        mpp = image.scale[-1]

        # Segment: the default model on the tissue, then a close-up where nuclei show.
        segment_dock, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
        print(f"model: {segment.model_source.current_choice}")
        worker = segment.run()
        if worker is None:
            raise RuntimeError(segment.status.value)
        wait_for_run(segment)
        if segment.last_result is None or not segment.last_result.complete:
            raise RuntimeError(segment.status.value)
        result = viewer.layers[-1]
        if result.multiscale or tuple(result.data.shape) != tuple(image.data[0].shape[:2]):
            raise RuntimeError("expected the sample's whole label map at the slide's resolution")
        viewer.reset_view()
        viewer.scene.camera.center = (0, CENTRE[0] * mpp, CENTRE[1] * mpp)
        viewer.scene.camera.zoom *= 6
        settle()
        grab(viewer, "viewer-segment.png", args.out)

        # Correct: erase a false detection (an object in pink stroma) with the Labels eraser.
        from napari_feddp.widgets.segment import _view_region

        viewer.layers.selection.active = result
        pixels = false_detection(image, np.asarray(result.data), _view_region(viewer, image))
        centre = pixels.mean(axis=0)
        viewer.scene.camera.center = (0, centre[0] * mpp, centre[1] * mpp)
        viewer.scene.camera.zoom *= 2
        settle()
        before = viewer.screenshot(canvas_only=True, flash=False)
        result.mode = "erase"
        result.brush_size = 5
        for y, x in pixels[::6]:  # brush strokes over the object until none of it is left
            if result.data[y, x]:
                result.paint((y, x), 0)
        for y, x in pixels:
            if result.data[y, x]:
                result.paint((y, x), 0)
        if result.data[pixels[:, 0], pixels[:, 1]].any():
            raise RuntimeError("the eraser left part of the false detection")
        print(f"erased a false detection of {len(pixels)} px around (y, x) = "
              f"({round(centre[0])}, {round(centre[1])})")
        settle()
        reach = np.sqrt(((pixels - centre) ** 2).sum(axis=1)).max() + result.brush_size / 2
        after = viewer.screenshot(canvas_only=False, flash=False)
        save_png(with_before_inset(after, before, canvas_rect(viewer), reach * mpp * viewer.scene.camera.zoom),
                 args.out / "viewer-correct.png")

        # Save it with the plugin's writer, as File › Save Selected Layers… does.
        viewer.layers.selection = {result}
        viewer.layers.save(str(work / "CMU-1-nuclei.ome.tif"), selected=True, plugin=PLUGIN)

        # Add to training set: the corrected view becomes a tile of the lab's dataset.
        dataset = work / "train"
        viewer.window.remove_dock_widget(segment_dock)
        training_dock, training = viewer.window.add_plugin_dock_widget(PLUGIN, "Add to training set")
        training.image.value = image
        training.labels_layer.value = result
        training.dataset.value = dataset
        training.annotator.value = "pathologist"
        if training.add_current_view() is None:
            raise RuntimeError(training.status.value)
        grab(viewer, "viewer-training-set.png", args.out)

        # Federation: the lab's dock, with the dataset and the policy it joins with.
        viewer.window.remove_dock_widget(training_dock)
        _, federation = viewer.window.add_plugin_dock_widget(PLUGIN, "Federation")
        federation.superlink.value = "coordinator.example.org:9092"
        federation.dataset.value = dataset
        grab(viewer, "viewer-federation.png", args.out)
    finally:
        viewer.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
