"""``make demo``: open the bundled H&E slide in napari, segment its nuclei with the
default model, and show them as a Labels layer (one colour per nucleus, the
measurements under the cursor), with the FedDP widgets docked.

Without a display it says so and runs the headless equivalent: the same viewer
on a private virtual X server (Xvfb); the nucleus label map (pyramidal
OME-TIFF), the measurement table (CSV), the nuclei as QuPath GeoJSON and
overlay PNGs of the canvas go to ``demo-output/``, and the first rows of the
table and the slide's summary are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

#: Dock widgets contributed by this plugin, in the order they are docked.
WIDGETS = ("Segment", "Federation", "Add to training set", "Slide info")


def build_viewer(show: bool = True):
    """The sample slide in a napari viewer, with the FedDP widgets docked."""
    import napari

    from ._sample_data import sample_slide_path

    viewer = napari.Viewer(title="napari-feddp demo", show=show)
    viewer.open(str(sample_slide_path()), plugin="napari-feddp")
    for name in WIDGETS:
        viewer.window.add_plugin_dock_widget("napari-feddp", name)
    viewer.canvas.overlays.scale_bar.visible = True  # the layer is in micrometres: the bar says so
    viewer.reset_view()
    return viewer


def segment_sample(out_dir: Path):
    """Segment the sample slide's nuclei with the default model; write OME-TIFF, CSV and GeoJSON.

    Returns the :class:`~napari_feddp.nuclei.Nuclei` and the loaded model, or ``(None, None)``
    when no model is available.
    """
    import pandas as pd

    from ._sample_data import sample_slide_path
    from .inference import run_to_completion
    from .models.store import NoModelError
    from .nuclei import describe_summary, segment_nuclei, write_nuclei
    from .segmentation import load_model
    from .slides import open_slide

    try:
        loaded = load_model()
    except NoModelError as exc:
        print(f"Skipping segmentation: {exc}")
        return None, None
    slide = open_slide(sample_slide_path())
    print(f"Segmenting {slide.path.name} with {loaded.card.name} ({loaded.path.name})…")
    nuclei = run_to_completion(segment_nuclei(slide, loaded), allow_partial=True)  # nothing cancels it
    outputs = {kind: out_dir / f"nuclei.{kind}" for kind in ("ome.tif", "csv", "geojson")}
    count = write_nuclei(nuclei, loaded, slide.path.name, labels=outputs["ome.tif"], csv=outputs["csv"],
                         geojson=outputs["geojson"])["geojson"]
    result = nuclei.segmentation
    print(f"Wrote {', '.join(map(str, outputs.values()))} ({count} nuclei, {result.tiles_done} tiles, "
          f"{result.elapsed_seconds:.1f} s + {nuclei.elapsed_seconds:.1f} s for labelling and measuring)")
    with pd.option_context("display.width", 160, "display.max_columns", None, "display.precision", 3):
        print(pd.DataFrame(nuclei.table).head(5).to_string(index=False))
    print(f"Summary: {describe_summary(nuclei.summary)}")
    return nuclei, loaded


def run_headless(out_dir: Path) -> Path:
    """Segment, then render the viewer off-screen and write overlay PNGs."""
    from qtpy.QtWidgets import QApplication
    from skimage.io import imsave

    out_dir.mkdir(parents=True, exist_ok=True)
    nuclei, loaded = segment_sample(out_dir)
    viewer = build_viewer()  # shown on the virtual display only
    viewer.window.resize(1600, 1000)

    def screenshot(path: Path) -> None:
        for _ in range(20):  # let Qt lay out the docked widgets and draw first
            QApplication.processEvents()
        imsave(path, viewer.screenshot(canvas_only=True, flash=False), check_contrast=False)

    try:
        layer = viewer.layers[0]
        print(f"Opened {layer.name}: {layer.data[0].shape[1]} x {layer.data[0].shape[0]} px, "
              f"{len(layer.data)} levels, {layer.scale[-1]:.3f} µm/px")
        target = out_dir / ("overlay.png" if nuclei is not None else "slide-canvas.png")
        if nuclei is not None:  # one colour per nucleus, the measurements as the layer's features
            kwargs = {**nuclei.layer_kwargs(), "name": f"nuclei ({loaded.card.name})"}
            if nuclei.segmentation.mpp is not None:
                kwargs["units"] = ("micrometer", "micrometer")
            viewer.add_labels(nuclei.pyramid, multiscale=len(nuclei.pyramid) > 1, **kwargs)
        screenshot(target)
        if nuclei is not None:  # a close-up where individual nuclei are visible
            viewer.scene.camera.center = (0, 1400 * layer.scale[0], 1100 * layer.scale[1])
            viewer.scene.camera.zoom *= 6
            screenshot(out_dir / "overlay-zoom.png")
    finally:
        viewer.close()
    print(f"Wrote {target}")
    return target


@contextmanager
def virtual_display(width: int = 1680, height: int = 1050):
    """Start a private Xvfb server for the duration of the block."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise RuntimeError(
            "No display and no Xvfb: install it (Debian/Ubuntu: apt-get install xvfb) "
            "or run on a machine with a screen."
        )
    # -displayfd: Xvfb picks a free display and writes its number once it accepts clients.
    read, write = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(write), "-screen", "0", f"{width}x{height}x24",
                             "-nolisten", "tcp"], pass_fds=(write,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(write)
    old = os.environ.get("DISPLAY")
    try:
        with os.fdopen(read) as numbers:
            display = numbers.readline().strip()
        if not display:
            raise RuntimeError(f"Xvfb did not start (exit status {proc.wait(timeout=10)})")
        os.environ["DISPLAY"] = f":{display}"
        yield
    finally:
        if old is None:
            os.environ.pop("DISPLAY", None)
        else:
            os.environ["DISPLAY"] = old
        proc.terminate()
        proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--headless", action="store_true", help="render off-screen even if a display exists")
    parser.add_argument("--out", default="demo-output", help="folder for headless outputs")
    parser.add_argument("--render-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render_only:  # child process on the virtual display
        run_headless(Path(args.out))
        return 0
    has_display = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or sys.platform in (
        "darwin", "win32")
    if has_display and not args.headless:
        import napari

        viewer = build_viewer()
        _, segment = viewer.window.add_plugin_dock_widget("napari-feddp", "Segment")  # the docked one
        segment.run()  # the default model, in a worker thread: the viewer stays live
        napari.run()
        return 0
    if not has_display:
        print("No display found: running the headless demo (napari on a virtual X server).")
    # The Qt application must end before its X server does: render in a child.
    with virtual_display():
        cmd = [sys.executable, "-m", "napari_feddp.demo", "--render-only", "--out", args.out]
        return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
