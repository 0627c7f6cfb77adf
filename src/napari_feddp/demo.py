"""``make demo``: open the bundled H&E slide in napari with the FedDP widgets docked.

Without a display it says so and runs the headless equivalent: the same viewer
on a private virtual X server (Xvfb), with the rendered canvas saved to
``demo-output/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

#: Dock widgets contributed by this plugin, in the order they are docked.
WIDGETS = ("Segment", "Slide info")


def build_viewer(show: bool):
    import napari

    from ._sample_data import sample_slide_path

    viewer = napari.Viewer(title="napari-feddp demo", show=show)
    viewer.open(str(sample_slide_path()), plugin="napari-feddp")
    for name in WIDGETS:
        viewer.window.add_plugin_dock_widget("napari-feddp", name)
    viewer.scale_bar.visible = True  # the layer is in micrometres: the bar says so
    viewer.reset_view()
    return viewer


def run_headless(out_dir: Path) -> Path:
    """Render the demo viewer off-screen and write a PNG of its canvas."""
    from skimage.io import imsave

    out_dir.mkdir(parents=True, exist_ok=True)
    from qtpy.QtWidgets import QApplication

    viewer = build_viewer(show=True)  # shown on the virtual display only
    try:
        for _ in range(20):  # let Qt lay out the docked widgets first
            QApplication.processEvents()
        shot = viewer.screenshot(canvas_only=True, flash=False)
        target = out_dir / "slide-canvas.png"
        imsave(target, shot, check_contrast=False)
        layer = viewer.layers[0]
        print(f"Opened {layer.name}: {layer.data[0].shape[1]} x {layer.data[0].shape[0]} px, "
              f"{len(layer.data)} levels, {layer.scale[-1]:.3f} µm/px")
    finally:
        viewer.close()
    print(f"Wrote {target}")
    return target


@contextmanager
def virtual_display(width: int = 1280, height: int = 900):
    """Start a private Xvfb server for the duration of the block."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise RuntimeError(
            "No display and no Xvfb: install it (Debian/Ubuntu: apt-get install xvfb) "
            "or run on a machine with a screen."
        )
    display = next(n for n in range(99, 400) if not Path(f"/tmp/.X11-unix/X{n}").exists()
                   and not Path(f"/tmp/.X{n}-lock").exists())
    proc = subprocess.Popen([xvfb, f":{display}", "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if Path(f"/tmp/.X11-unix/X{display}").exists():
                break
            time.sleep(0.05)
        old = os.environ.get("DISPLAY")
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

        build_viewer(show=True)
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
