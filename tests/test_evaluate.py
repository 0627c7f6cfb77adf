"""`napari-feddp evaluate`: pooled scores through the tiled engine, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_feddp.cli import main
from napari_feddp.evaluation import evaluate_folder, predict_image
from napari_feddp.segmentation import load_model
from napari_feddp.training._io import read_image, read_mask

from .conftest import require_data

SUBSET = ["TCGA-2Z-A9J9-01A-01-TS1", "TCGA-44-2665-01B-06-BS6"]


def test_pooled_scores_match_hand_computation(tiny_checkpoint):
    test_dir = require_data("monuseg/test")
    loaded = load_model(str(tiny_checkpoint))
    report = evaluate_folder(test_dir, loaded, mpp=0.25, names=SUBSET)
    tp = fp = fn = correct = total = 0
    for name in SUBSET:
        image = read_image(test_dir / "images" / f"{name}.tif")
        truth = read_mask(test_dir / "masks" / f"{name}.png") > 0  # test masks are 0/255
        pred = predict_image(image, loaded, mpp=0.25) > 0
        assert pred.shape == truth.shape
        tp += np.sum(pred & truth)
        fp += np.sum(pred & ~truth)
        fn += np.sum(~pred & truth)
        correct += np.sum(pred == truth)
        total += truth.size
    assert report.n_images == 2
    assert report.dice == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert report.jaccard == pytest.approx(tp / (tp + fp + fn))
    assert report.accuracy == pytest.approx(correct / total)
    # The pooled confusion matrix is kept (rows truth, columns prediction).
    assert report.matrix.tolist() == [[total - tp - fp - fn, fp], [fn, tp]]


def test_any_predictor_is_scored_the_same_way(tmp_path):
    """``score_folder`` scores a non-model method: a predictor that marks the left half."""
    from PIL import Image

    from napari_feddp.evaluation import score_folder

    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    truth = np.zeros((8, 8), np.uint8)
    truth[:, :2] = 255  # nuclei in the two leftmost columns
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(truth).save(tmp_path / "masks" / "a.png")

    def left_half(image):
        out = np.zeros(image.shape[:2], np.uint8)
        out[:, :4] = 1
        return out

    report = score_folder(tmp_path, left_half)
    assert report.instances is None and "aji" not in report.to_dict()  # no instances/ folder
    # tp = 16, fp = 16, fn = 0, tn = 32
    assert report.matrix.tolist() == [[32, 16], [0, 16]]
    assert report.dice == pytest.approx(2 * 16 / (2 * 16 + 16))
    assert report.jaccard == pytest.approx(0.5) and report.accuracy == pytest.approx(0.75)
    assert report.n_images == 1 and report.per_image[0]["name"] == "a"
    with pytest.raises(ValueError, match="no image/mask pair named"):
        score_folder(tmp_path, left_half, names=["b"])


def test_object_scores_when_the_folder_has_instances(tmp_path):
    """Two annotated nuclei side by side; the predictor finds the left one and merges nothing."""
    import tifffile
    from PIL import Image

    from napari_feddp.evaluation import score_folder

    for sub in ("images", "masks", "instances"):
        (tmp_path / sub).mkdir()
    nuclei = np.zeros((8, 8), np.uint16)
    nuclei[0:2, 0:2], nuclei[0:2, 4:6] = 1, 2
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(((nuclei > 0) * 255).astype(np.uint8)).save(tmp_path / "masks" / "a.png")
    tifffile.imwrite(tmp_path / "instances" / "a.tif", nuclei)

    def finds_the_left_nucleus(image):
        return (nuclei == 1).astype(np.uint8)

    report = score_folder(tmp_path, finds_the_left_nucleus, objects="components")
    # AJI: C = 4, U = 4 + 4 (the missed nucleus) = 8; PQ: TP 1, FN 1 -> DQ 2/3, SQ 1.
    assert report.instances["aji"] == pytest.approx(0.5)
    assert report.instances["pq"] == pytest.approx(2 / 3) and report.instances["fn"] == 1
    assert report.to_dict()["aji"] == pytest.approx(0.5) and report.per_image[0]["pq"] == pytest.approx(2 / 3)


def test_cli_writes_json(tmp_path, tiny_checkpoint, capsys):
    test_dir = require_data("monuseg/test")
    out = tmp_path / "scores.json"
    rc = main(["evaluate", "--data", str(test_dir), "--model", str(tiny_checkpoint), "--mpp", "0.25",
               "--json", str(out), "--only", SUBSET[0]])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data) >= {"dice", "jaccard", "accuracy", "n_images", "per_image"}
    assert data["n_images"] == 1 and data["per_image"][0]["name"] == SUBSET[0]
    assert 0.0 <= data["dice"] <= 1.0
    assert 0.0 <= data["aji"] <= 1.0 and 0.0 <= data["pq"] <= 1.0  # MoNuSeg has instances/
    assert "Dice" in capsys.readouterr().out
    assert data["test_time_augmentation"] is False

    augmented = tmp_path / "augmented.json"
    assert main(["evaluate", "--data", str(test_dir), "--model", str(tiny_checkpoint), "--mpp", "0.25",
                 "--json", str(augmented), "--only", SUBSET[0], "--tta"]) == 0
    tta = json.loads(augmented.read_text())
    assert tta["test_time_augmentation"] is True and tta["dice"] != data["dice"]


def test_cli_bad_inputs(tmp_path, tiny_checkpoint, capsys):
    rc = main(["evaluate", "--data", str(tmp_path / "absent"), "--model", str(tiny_checkpoint),
               "--json", str(tmp_path / "x.json")])
    assert rc == 2 and "absent" in capsys.readouterr().err
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "d" / "images" / "a.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "d" / "masks" / "a.png")
    rc = main(["evaluate", "--data", str(tmp_path / "d"), "--model", str(tiny_checkpoint),
               "--json", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "a.png" in err
    assert not (tmp_path / "x.json").exists()
    rc = main(["evaluate", "--data", str(tmp_path / "d"), "--model", str(tiny_checkpoint), "--mpp", "-1",
               "--json", str(tmp_path / "x.json")])
    assert rc == 2 and "--mpp" in capsys.readouterr().err


def test_contour_model_is_scored_as_nucleus_versus_background_and_by_its_nuclei(tmp_path):
    """A perfect contour prediction of two touching nuclei: Dice 1, AJI 1, PQ 1."""
    import tifffile
    from PIL import Image

    from napari_feddp.evaluation import score_folder
    from napari_feddp.training.dataset import contour_target

    for sub in ("images", "masks", "instances"):
        (tmp_path / sub).mkdir()
    nuclei = np.zeros((24, 24), np.uint16)
    nuclei[4:14, 2:12], nuclei[4:14, 12:22] = 1, 2  # touching
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(((nuclei > 0) * 255).astype(np.uint8)).save(tmp_path / "masks" / "a.png")
    tifffile.imwrite(tmp_path / "instances" / "a.tif", nuclei)
    outlined = contour_target(nuclei.astype(np.int32))

    report = score_folder(tmp_path, lambda image: outlined, n_classes=3, source_mpp=0.5, contour_class=2)
    assert report.dice == pytest.approx(1.0) and report.matrix.shape == (2, 2)
    assert report.instances["aji"] == pytest.approx(1.0) and report.instances["pq"] == pytest.approx(1.0)
    # The same map read as a foreground-only prediction merges the pair into one object.
    merged = score_folder(tmp_path, lambda image: (outlined > 0).astype(np.uint8), objects="components")
    assert merged.instances["pq"] < 0.5
