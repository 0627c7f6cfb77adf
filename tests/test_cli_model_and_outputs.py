"""`napari-feddp segment` and `evaluate`: the model named, pixel size, output paths checked first."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_feddp.cli import main
from napari_feddp.segmentation import write_together
from napari_feddp.slides import open_slide

from ._slide_factory import write_pyramid
from .conftest import require_data
from .test_cli_segment import _error_line


@pytest.fixture
def boxes_path():
    """A pyramidal TIFF without a physical pixel size."""
    return require_data("slides/boxes.tiff")


def test_mpp_lets_a_slide_without_pixel_size_segment(tmp_path, boxes_path, tiny_checkpoint, capsys):
    out = tmp_path / "boxes.ome.tif"
    rc = main(["segment", str(boxes_path), "--out", str(out), "--model", str(tiny_checkpoint), "--quiet"])
    line = _error_line(capsys)
    assert rc == 2 and "boxes.tiff has no pixel size" in line and "--mpp" in line
    assert "segment_slide" not in line and "mpp=" not in line  # the option, not a Python parameter
    assert not out.exists()

    rc = main(["segment", str(boxes_path), "--out", str(out), "--model", str(tiny_checkpoint), "--quiet",
               "--mpp", "0.5"])
    assert rc == 0, capsys.readouterr().err
    labels = open_slide(out)
    assert labels.kind == "labels" and labels.mpp == pytest.approx((0.5, 0.5))
    assert labels.shape == open_slide(boxes_path).shape  # model at 0.5 µm/px: one label per pixel


def test_mpp_overrides_the_files_pixel_size(tmp_path, cmu1_path, tiny_checkpoint, capsys):
    out = tmp_path / "m.ome.tif"
    # CMU-1 says 0.499 µm/px; told 0.25, the 0.5 µm/px model reads it at half the size.
    assert main(["segment", str(cmu1_path), "--out", str(out), "--model", str(tiny_checkpoint), "--quiet",
                 "--mpp", "0.25", "--region", "1000,1200,512,512", "--all-tiles"]) == 0
    labels = open_slide(out)
    assert labels.mpp == pytest.approx((0.5, 0.5), rel=1e-3)  # 2967 rows do not halve exactly
    assert labels.shape == pytest.approx(np.asarray(open_slide(cmu1_path).shape) / 2, abs=1)
    rc = main(["segment", str(cmu1_path), "--out", str(out), "--mpp", "0"])
    assert rc == 2 and "--mpp: expected a positive number" in _error_line(capsys)


def test_prints_the_model_it_used(tmp_path, boxes_path, received_model, capsys):
    rc = main(["segment", str(boxes_path), "--out", str(tmp_path / "b.ome.tif"), "--mpp", "0.5", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    model_line, path_line = printed.splitlines()[:2]  # before the segmentation's own lines
    assert model_line.startswith("model: federation-run7 (tiny-federated) · received · ")
    assert "ε 3" in model_line and "test dice 0.500" in model_line
    assert path_line.strip() == str(received_model)


def test_out_in_an_unwritable_place_fails_before_any_work(tmp_path, cmu1_path, capsys):
    # The model does not exist either: the output is checked first, so that is not what is reported.
    rc = main(["segment", str(cmu1_path), "--out", "/sys/a.ome.tif", "--model", str(tmp_path / "none")])
    line = _error_line(capsys)
    assert rc == 2 and line.startswith("napari-feddp segment: error: --out: cannot create files in /sys")


def test_out_that_is_an_existing_folder(tmp_path, cmu1_path, tiny_checkpoint, capsys):
    folder = tmp_path / "existing.ome.tif"
    folder.mkdir()
    rc = main(["segment", str(cmu1_path), "--out", str(folder), "--model", str(tiny_checkpoint)])
    line = _error_line(capsys)
    assert rc == 2 and "--out:" in line and "is a folder" in line
    assert folder.is_dir() and not any(folder.iterdir())


def test_geojson_into_a_missing_folder_leaves_no_label_map(tmp_path, cmu1_path, tiny_checkpoint, capsys):
    out = tmp_path / "m.ome.tif"
    rc = main(["segment", str(cmu1_path), "--out", str(out), "--model", str(tiny_checkpoint),
               "--geojson", str(tmp_path / "missing" / "dir" / "c.geojson")])
    line = _error_line(capsys)
    assert rc == 2 and "--geojson: folder" in line and "does not exist" in line
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary


def test_outputs_must_not_replace_each_other_or_the_slide(tmp_path, cmu1_path, tiny_checkpoint, capsys):
    ome = tmp_path / "slide.ome.tif"
    write_pyramid(ome, np.full((512, 512, 3), 200, np.uint8), levels=1, resolution=(2e4, 2e4))
    rc = main(["segment", str(ome), "--out", str(ome), "--model", str(tiny_checkpoint)])
    assert rc == 2 and "is also the input" in _error_line(capsys)
    same = tmp_path / "x.ome.tif"
    rc = main(["segment", str(cmu1_path), "--out", str(same), "--geojson", str(same)])
    assert rc == 2 and "--geojson" in _error_line(capsys)


def test_paired_outputs_are_written_both_or_neither(tmp_path):
    first, second = tmp_path / "a.ome.tif", tmp_path / "b.geojson"

    def fails(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_together([(first, lambda path: path.write_bytes(b"labels")), (second, fails)])
    assert list(tmp_path.iterdir()) == []  # neither output, no temporary left

    assert write_together([(first, lambda path: path.write_bytes(b"labels")),
                           (second, lambda path: path.write_text("{}"))]) == [6, 2]
    assert first.read_bytes() == b"labels" and second.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ome.tif", "b.geojson"]


def test_model_errors_name_the_real_cause(tmp_path, cmu1_path, capsys):
    out = str(tmp_path / "m.ome.tif")
    rc = main(["segment", str(cmu1_path), "--out", out, "--model", str(tmp_path / "missing.safetensors")])
    line = _error_line(capsys)
    assert rc == 2 and "model file not found" in line and "missing.safetensors" in line
    assert "card" not in line  # neither half exists: the path is wrong, not the card
    rc = main(["segment", str(cmu1_path), "--out", out, "--model", str(tmp_path)])
    assert rc == 2 and "is a folder, not a model checkpoint" in _error_line(capsys)
    rc = main(["segment", str(tmp_path), "--out", out])
    line = _error_line(capsys)
    assert rc == 2 and "is a folder, not a slide file" in line and "No such" not in line


def test_no_tissue_names_the_option(tmp_path, tiny_checkpoint, capsys):
    blank = write_pyramid(tmp_path / "blank.tif", np.full((1024, 1024, 3), 245, np.uint8), levels=2,
                          resolution=(1e4 / 0.5, 1e4 / 0.5))
    rc = main(["segment", str(blank), "--out", str(tmp_path / "m.ome.tif"), "--model", str(tiny_checkpoint)])
    line = _error_line(capsys)
    assert rc == 2 and "--all-tiles" in line and "tissue=False" not in line


def test_evaluate_json_in_an_unwritable_place_fails_before_scoring(tmp_path, capsys):
    # No data folder and no model: had it scored first, one of those would be the error.
    rc = main(["evaluate", "--data", str(tmp_path / "no-data"), "--model", str(tmp_path / "none"),
               "--json", "/proc/x.json"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("napari-feddp evaluate: error: --json: cannot create files in /proc")


def test_evaluate_json_that_is_a_folder(tmp_path, capsys):
    rc = main(["evaluate", "--data", str(tmp_path), "--json", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--json:" in err and "is a folder" in err
    assert tmp_path.is_dir()


def test_label_map_round_trip_unchanged_by_the_checks(tmp_path, cmu1_path, tiny_checkpoint):
    out, geo = tmp_path / "m.ome.tif", tmp_path / "o.geojson"
    assert main(["segment", str(cmu1_path), "--out", str(out), "--geojson", str(geo), "--model",
                 str(tiny_checkpoint), "--region", "1000,1200,256,256", "--quiet"]) == 0
    # The measurement table goes next to --out by default; no temporaries are left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "m.ome.tif", "o.geojson"]
    assert tifffile.imread(out).shape == open_slide(cmu1_path).shape
    assert json.loads(geo.read_text())["type"] == "FeatureCollection"


def _segment_args(slide, out, model) -> list[str]:
    return ["segment", str(slide), "--out", str(out), "--model", str(model), "--quiet",
            "--region", "1000,1200,256,256", "--all-tiles"]


def test_existing_output_is_kept_unless_overwrite(tmp_path, cmu1_path, tiny_checkpoint, capsys):
    out = tmp_path / "m.ome.tif"
    out.write_bytes(b"a previous result")
    rc = main(_segment_args(cmu1_path, out, tiny_checkpoint))
    line = _error_line(capsys)
    assert rc == 2 and "already exists" in line and "--overwrite" in line
    assert out.read_bytes() == b"a previous result"
    assert main([*_segment_args(cmu1_path, out, tiny_checkpoint), "--overwrite"]) == 0
    assert open_slide(out).kind == "labels"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "m.ome.tif"]  # no lock or temporary left


def test_a_second_run_on_the_same_output_is_refused_while_the_first_writes(tmp_path, cmu1_path, tiny_checkpoint,
                                                                             capsys):
    out = tmp_path / "m.ome.tif"
    # Another process holds the output, as a running `segment` does from its first tile to its last file.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom napari_feddp._atomic import exclusive\n"
         "with exclusive([sys.argv[1]]):\n    print('held', flush=True)\n    time.sleep(120)\n", str(out)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = main(_segment_args(cmu1_path, out, tiny_checkpoint))
        line = _error_line(capsys)
        assert rc == 2 and "another run is writing this file now" in line and not out.exists()
    finally:
        holder.kill()  # killed, not finished: the kernel releases its lock
        holder.wait()
    assert main(_segment_args(cmu1_path, out, tiny_checkpoint)) == 0
    assert open_slide(out).kind == "labels"


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_no_output(tmp_path, cmu1_path, tiny_checkpoint):
    out = tmp_path / "m.ome.tif"
    # The file-size limit makes every write past 4 KiB fail with EFBIG, as a full disk fails with ENOSPC.
    limit = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
             "from napari_feddp.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", limit, *_segment_args(cmu1_path, out, tiny_checkpoint)],
                          capture_output=True, text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("napari-feddp segment: error: cannot write the outputs, none was kept")
    assert "File too large" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("gigabytes", [1.0, 1.2])
def test_running_out_of_memory_is_one_line_and_leaves_no_output(tmp_path, cmu1_path, gigabytes):
    out = tmp_path / "m.ome.tif"
    # An address-space limit, as a small VM or a cluster job's memory limit imposes.
    limit = (f"import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, ({int(gigabytes * 2**30)},) * 2)\n"
             "from napari_feddp.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", limit, "segment", str(cmu1_path), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 3 and "Traceback" not in err, err
    assert err.splitlines()[-1] == ("napari-feddp segment: error: out of memory; close other programs, "
                                    "or segment a --region or with a smaller --batch-size")
    assert list(tmp_path.iterdir()) == []
