"""`napari-feddp segment-cohort`: a real two-worker LocalCluster over real slides, resume after a real kill."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tifffile

from napari_feddp import cohort
from napari_feddp._atomic import exclusive
from napari_feddp.cli import main
from napari_feddp.models.store import bundled_checkpoint

from ._slide_factory import write_pyramid

pytestmark = pytest.mark.slow

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "napari_feddp" / "data" / "CMU-1-Small-Region.svs"
SAMPLE_MPP = 0.499
MODEL = bundled_checkpoint()


def _crop(path: Path, top: int, left: int, size: int = 768) -> Path:
    """A pyramidal TIFF of part of the real sample (real tissue, real pixel size)."""
    pixels = tifffile.imread(SAMPLE)[top : top + size, left : left + size]
    return write_pyramid(path, np.ascontiguousarray(pixels), levels=2, compression="jpeg",
                         resolution=(1e4 / SAMPLE_MPP, 1e4 / SAMPLE_MPP))


def _cohort_cli(*args: str, **popen) -> subprocess.Popen:
    # As from a terminal: Ctrl-C at its default. A child inherits an ignored SIGINT (and Python then
    # installs no KeyboardInterrupt handler), so the test must not depend on what ran before it.
    return subprocess.Popen([sys.executable, "-m", "napari_feddp.cli", "segment-cohort", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


def _rows(out_dir: Path) -> dict[str, dict]:
    with open(out_dir / cohort.COHORT_CSV, newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == cohort.COLUMNS
        return {Path(row["slide"]).name: row for row in reader}


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial")) or p.name == cohort.WORK]


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory):
    """Three slides on a two-worker local cluster: the sample, a crop of it as a TIFF, a truncated sample."""
    root = tmp_path_factory.mktemp("cohort")
    slides = root / "slides"
    slides.mkdir()
    shutil.copy(SAMPLE, slides / "sample.svs")
    _crop(slides / "crop.tif", 600, 800)
    (slides / "broken.svs").write_bytes(SAMPLE.read_bytes()[: SAMPLE.stat().st_size // 2])
    out = root / "out"
    run = _cohort_cli(*(str(slides / name) for name in ("sample.svs", "crop.tif", "broken.svs")),
                      "--out-dir", str(out), "--workers", "2", "--model", str(MODEL))
    stdout, stderr = run.communicate(timeout=300)
    return run.returncode, stdout, stderr, slides, out


def test_cohort_writes_every_slide_and_a_table(cohort_run):
    returncode, stdout, stderr, _, out = cohort_run
    assert returncode == 1, stderr  # one slide failed
    assert "Traceback" not in stderr, stderr
    assert "cluster: tcp://" in stdout and "2 workers" in stdout
    assert "dashboard: http" in stdout
    assert "3 slides: 2 done, 0 skipped, 1 failed" in stdout
    assert "1 of 3 slides failed" in stderr

    rows = _rows(out)
    assert list(rows) == ["sample.svs", "crop.tif", "broken.svs"]  # in the order given
    model_sha = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    for name in ("sample", "crop"):
        row, folder = rows[f"{name}.svs" if name == "sample" else f"{name}.tif"], out / name
        assert row["status"] == "done" and row["error"] == ""
        assert row["model"] == "feddp-nuclei" and row["model_sha256"] == model_sha
        assert float(row["seconds"]) > 0
        labels = tifffile.imread(folder / f"{name}.ome.tif")
        count = int(row["nuclei"])
        assert count > 100
        assert len(np.unique(labels)) - 1 == count  # one id per nucleus
        with open(folder / f"{name}.csv", newline="") as handle:
            assert sum(1 for _ in csv.DictReader(handle)) == count
        assert len(json.loads((folder / f"{name}.geojson").read_text())["features"]) == count
        assert float(row["density_per_mm2"]) == pytest.approx(count / float(row["tissue_area_mm2"]), rel=1e-4)
        marker = json.loads((folder / cohort.MARKER).read_text())
        assert marker["model_sha256"] == model_sha
        assert marker["outputs"] == {p.name: p.stat().st_size for p in folder.iterdir() if p.name != cohort.MARKER}
        assert _leftovers(folder) == []
    assert tifffile.imread(out / "sample" / "sample.ome.tif").shape == (2967, 2220)  # aligned with the slide

    broken = rows["broken.svs"]
    assert broken["status"] == "failed" and "truncated or corrupt" in broken["error"]
    assert broken["nuclei"] == "" and broken["model_sha256"] == model_sha
    assert not (out / "broken").exists() or list((out / "broken").iterdir()) == []  # nothing that looks done


def test_cohort_outputs_are_those_of_segment(cohort_run, tmp_path):
    *_, slides, out = cohort_run
    single = tmp_path / "crop.ome.tif"
    assert main(["segment", str(slides / "crop.tif"), "--out", str(single), "--model", str(MODEL),
                 "--geojson", str(tmp_path / "crop.geojson"), "--quiet"]) == 0
    np.testing.assert_array_equal(tifffile.imread(out / "crop" / "crop.ome.tif"), tifffile.imread(single))
    assert (out / "crop" / "crop.csv").read_text() == (tmp_path / "crop.csv").read_text()


def test_rerun_skips_finished_slides_and_retries_failed_ones(cohort_run, capsys):
    *_, slides, out = cohort_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}
    rc = main(["segment-cohort", str(slides / "sample.svs"), str(slides / "crop.tif"), str(slides / "broken.svs"),
               "--out-dir", str(out), "--workers", "1", "--model", str(MODEL), "--quiet"])
    printed = capsys.readouterr()
    assert rc == 1
    assert "3 slides: 0 done, 2 skipped, 1 failed" in printed.out
    rows = _rows(out)
    assert [row["status"] for row in rows.values()] == ["skipped", "skipped", "failed"]
    assert int(rows["sample.svs"]["nuclei"]) > 100  # a skipped slide keeps its numbers
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before  # nothing was recomputed or rewritten


def test_marker_requires_same_model_settings_slide_and_outputs(cohort_run, tiny_checkpoint):
    *_, slides, out = cohort_run
    job = cohort.plan_jobs([(slides / "crop.tif", None)], out)[0]
    model, settings = cohort.model_ref(str(MODEL)), cohort.Settings()
    assert cohort.finished_row(job, model, settings)["status"] == "skipped"
    assert cohort.finished_row(job, cohort.model_ref(str(tiny_checkpoint)), settings) is None
    assert cohort.finished_row(job, model, cohort.Settings(all_tiles=True)) is None
    assert cohort.finished_row(cohort.plan_jobs([(slides / "crop.tif", 0.25)], out)[0], model, settings) is None
    csv_path = out / "crop" / "crop.csv"
    original = csv_path.read_bytes()
    try:
        csv_path.write_bytes(original[:-10])  # an output cut short
        assert cohort.finished_row(job, model, settings) is None
    finally:
        csv_path.write_bytes(original)
        os.utime(csv_path)


def _group(pgid: int) -> list[psutil.Process]:
    alive = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_interrupted_and_killed_runs_continue_where_they_stopped(tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    # Six slides, so that the run cannot finish all of them in the moment between the first
    # marker and the Ctrl-C (one small slide takes well under a second on a fast machine).
    names = ["c1", "c2", "c3", "c4", "c5", "c6"]
    for name, (top, left) in zip(names, [(300, 900), (1200, 900), (2100, 900), (750, 900), (1650, 900), (2100, 1400)]):
        _crop(slides / f"{name}.tif", top, left)
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("slide,mpp\n" + "".join(f"slides/{name}.tif,\n" for name in names))
    out = tmp_path / "out"
    args = ["--manifest", str(manifest), "--out-dir", str(out), "--workers", "1", "--model", str(MODEL), "--quiet"]
    markers = {name: out / name / cohort.MARKER for name in names}

    def finished() -> set[str]:
        return {name for name, marker in markers.items() if marker.exists()}

    # Ctrl-C once a slide is done: the run stops, closes its cluster and exits 130.
    run = _cohort_cli(*args, start_new_session=True)
    try:
        _wait_for(lambda: finished() or run.poll() is not None, 240, "a slide to finish")
        os.killpg(run.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        _, stderr = run.communicate(timeout=60)
        assert run.returncode == 130, stderr
        assert "interrupted" in stderr and "Traceback" not in stderr
        _wait_for(lambda: not _group(run.pid), 30, "the cluster's processes to end")
    finally:
        if _group(run.pid):
            os.killpg(run.pid, signal.SIGKILL)
    done_first = finished()
    assert 1 <= len(done_first) < len(names)
    # The table lists what finished before the interruption (a slide may complete while the cluster closes).
    listed = {Path(row["slide"]).stem for row in _rows(out).values() if row["status"] == "done"}
    assert listed and listed <= done_first

    # Killed outright (no clean-up at all) while the next slide is being segmented.
    for name in set(names) - done_first:
        shutil.rmtree(out / name, ignore_errors=True)
    run = _cohort_cli(*args, start_new_session=True)
    try:
        _wait_for(lambda: any((out / name / cohort.WORK).exists() for name in names) or run.poll() is not None,
                  240, "the next slide to start")
        os.kill(run.pid, signal.SIGKILL)
        run.communicate(timeout=60)
        _wait_for(lambda: not _group(run.pid), 30, "the workers of the killed run to end")
    finally:
        if _group(run.pid):
            os.killpg(run.pid, signal.SIGKILL)
    done_before = finished()
    assert done_first <= done_before and len(done_before) < len(names)
    marker_times = {name: markers[name].stat().st_mtime_ns for name in done_before}

    run = _cohort_cli(*args)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    rows = {Path(name).stem: row for name, row in _rows(out).items()}
    assert {name: row["status"] for name, row in rows.items()} == {
        name: "skipped" if name in done_before else "done" for name in names}
    assert {name: markers[name].stat().st_mtime_ns for name in done_before} == marker_times  # not redone
    for name in names:
        folder = out / name
        assert markers[name].exists() and _leftovers(folder) == []
        count = int(rows[name]["nuclei"])
        assert len(np.unique(tifffile.imread(folder / f"{name}.ome.tif"))) - 1 == count
    assert {p.name for p in out.iterdir()} == {cohort.COHORT_CSV, *names}

    # Everything done: the next run skips all slides without starting a cluster.
    assert main(["segment-cohort", *args]) == 0
    printed = capsys.readouterr().out
    assert f"{len(names)} slides: 0 done, {len(names)} skipped, 0 failed" in printed and "cluster:" not in printed


def test_bad_invocations(tmp_path, capsys):
    slide = tmp_path / "a.svs"
    shutil.copy(SAMPLE, slide)
    other = tmp_path / "x"
    other.mkdir()
    shutil.copy(SAMPLE, other / "a.svs")
    cases = [
        ([], "expected SLIDE arguments or --manifest CSV, received neither"),
        ([str(slide), str(other / "a.svs")], "share the name 'a'"),
        ([str(slide), "--workers", "0"], "--workers: expected a positive number"),
    ]
    for extra, message in cases:
        assert main(["segment-cohort", *extra, "--out-dir", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    with exclusive([tmp_path / "out" / cohort.COHORT_CSV]):  # another run holds the folder
        assert main(["segment-cohort", str(slide), "--out-dir", str(tmp_path / "out"), "--model", str(MODEL)]) == 2
    assert "another segment-cohort run is writing to" in capsys.readouterr().err
    manifest = tmp_path / "m.csv"
    manifest.write_text("file\na.svs\n")
    assert main(["segment-cohort", "--manifest", str(manifest), "--out-dir", str(tmp_path / "out")]) == 2
    assert "expected a header row with a 'slide' column" in capsys.readouterr().err
