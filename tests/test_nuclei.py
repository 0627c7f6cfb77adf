"""One label per nucleus over a whole run, with measurements and a summary, on the real CMU-1 sample."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_feddp.inference import run_to_completion
from napari_feddp.measure import COLUMNS
from napari_feddp.nuclei import (
    LABELLING,
    MEASURING,
    describe_summary,
    nuclei_of,
    segment_nuclei,
    tissue_area_um2,
)
from napari_feddp.regions import PolygonRegion
from napari_feddp.segmentation import load_model, run_segmentation
from napari_feddp.slides import open_slide

#: Level-0 (y0, x0, y1, x1) of CMU-1 over dense tissue.
REGION = (1000, 800, 1700, 1500)


@pytest.fixture(scope="module")
def bundled():
    return load_model()


@pytest.fixture(scope="module")
def cmu1():
    """CMU-1, opened once for the module and closed after it (its tile-decoding threads with it)."""
    from .conftest import require_data

    slide = open_slide(require_data("slides/CMU-1-Small-Region.svs"))
    yield slide
    slide.close()


@pytest.fixture(scope="module")
def run(bundled, cmu1, tmp_path_factory):
    """The bundled model over a CMU-1 region, class map on disk."""
    slide = cmu1
    out = tmp_path_factory.mktemp("run") / "classes.zarr"
    result = run_to_completion(run_segmentation(slide, bundled, region=REGION, tissue=False, out=out))
    return slide, result


def _drain(generator):
    reports = []
    while True:
        try:
            reports.append(next(generator))
        except StopIteration as stop:
            return stop.value, reports


def test_every_nucleus_gets_one_id_measured_and_summarised(run, bundled):
    slide, result = run
    nuclei, reports = _drain(nuclei_of(result, bundled.card.class_names, image=slide, window=256))
    assert nuclei.complete
    labels = np.asarray(nuclei.labels[:])
    assert labels.dtype == np.uint32 and labels.shape == result.labels.shape
    # Next to the class map's store, on disk.
    assert nuclei.path == result.path.with_name("classes-nuclei.zarr") and nuclei.path.is_dir()
    # Nuclei only where the model saw nucleus.
    assert not np.any((labels > 0) & (np.asarray(result.labels[:]) == 0))
    ids = np.unique(labels[labels > 0])
    assert np.array_equal(ids, np.arange(1, len(ids) + 1))  # unique and consecutive over the run
    assert len(ids) > 100  # dense tissue
    # One row per nucleus, in physical units, staining read from the slide.
    table = nuclei.table
    assert list(table) == list(COLUMNS) and table["label"].tolist() == ids.tolist()
    mpp = result.mpp[0]
    np.testing.assert_allclose(table["area_um2"], np.bincount(labels.ravel())[1:] * mpp * mpp, rtol=1e-3)
    assert np.isfinite(table["mean_haematoxylin_od"]).all() and (table["mean_haematoxylin_od"] > 0).all()
    ys, xs = table["centroid_y_um"] / mpp, table["centroid_x_um"] / mpp
    assert ys.min() >= REGION[0] - 1 and ys.max() <= REGION[2] and xs.min() >= REGION[1] - 1 and xs.max() <= REGION[3]
    # Summary over the region (every tile predicted: the region is the tissue area).
    area_mm2 = (REGION[2] - REGION[0]) * (REGION[3] - REGION[1]) * mpp * mpp / 1e6
    summary = nuclei.summary
    assert summary["nuclei"] == len(ids) and summary["tissue_area_mm2"] == pytest.approx(area_mm2, rel=0.01)
    assert summary["density_per_mm2"] == pytest.approx(len(ids) / area_mm2, rel=0.01)
    assert 10 < summary["area_um2_median"] < 80  # nuclei, not specks or clumps
    line = describe_summary(summary)
    assert f"{len(ids):,} nuclei in" in line and "per mm²" in line and "median area" in line
    # Progress: the two steps, counted in windows, each finishing.
    for stage in (LABELLING, MEASURING):
        steps = [p for p in reports if p.stage == stage]
        assert steps and steps[-1].done == steps[-1].total == 9 and steps[-1].unit == "windows"
    # napari's features table maps rows to labels through its "index" column.
    features = nuclei.features()
    assert features["index"].tolist() == ids.tolist() and "label" not in features


def test_window_seams_never_split_or_duplicate_a_nucleus(run, bundled):
    from napari_feddp.training.instance_metrics import panoptic_quality

    _, result = run
    small, _ = _drain(nuclei_of(result, bundled.card.class_names, window=96))
    whole, _ = _drain(nuclei_of(result, bundled.card.class_names, window=4096))
    small_labels, whole_labels = np.asarray(small.labels[:]), np.asarray(whole.labels[:])
    assert small.count == whole.count == len(np.unique(small_labels)) - 1
    pq = panoptic_quality(whole_labels, small_labels)
    assert pq["fp"] == 0 and pq["fn"] == 0 and pq["sq"] > 0.99
    # Watershed lines between touching nuclei may move by a pixel with the window's context, no more.
    assert small.table["area_um2"].sum() == pytest.approx(whole.table["area_um2"].sum(), rel=1e-3)
    assert np.isnan(small.table["mean_haematoxylin_od"]).all()  # no image given: no staining column


def test_cancel_stops_between_windows(run, bundled):
    _, result = run
    reads = []

    def cancel():
        reads.append(1)
        return len(reads) > 3  # a few windows in

    nuclei, reports = _drain(nuclei_of(result, bundled.card.class_names, window=128, cancel=cancel))
    assert not nuclei.complete and nuclei.labels is None and nuclei.table is None
    assert reports[-1].stage == "cancelled" and reports[-1].done < reports[-1].total


def test_segment_nuclei_runs_model_then_nuclei_and_is_cancellable(bundled, cmu1):
    slide = cmu1
    nuclei, reports = _drain(segment_nuclei(slide, bundled, region=(1200, 1000, 1500, 1300), tissue=False))
    stages = [p.stage for p in reports]
    assert stages.index("predicting") < stages.index(LABELLING) < stages.index(MEASURING)
    assert nuclei.complete and nuclei.count > 10 and nuclei.segmentation.complete

    cancel = threading.Event()
    cancel.set()
    stopped, _ = _drain(segment_nuclei(slide, bundled, region=(1200, 1000, 1500, 1300), cancel=cancel))
    assert not stopped.complete and not stopped.segmentation.complete and stopped.labels is None


def test_resampled_runs_read_the_staining_on_the_label_grid(bundled, cmu1):
    # Told the slide is 0.25 µm/px, the 0.5 µm/px model reads it at half size: labels are half the slide.
    slide = cmu1
    nuclei, _ = _drain(segment_nuclei(slide, bundled, mpp=0.25, region=(1000, 800, 1600, 1400), tissue=False))
    result = nuclei.segmentation
    assert result.downsample == pytest.approx((2.0, 2.0), rel=0.01)
    assert nuclei.count > 10 and np.isfinite(nuclei.table["mean_haematoxylin_od"]).all()


def test_tissue_area_counts_tissue_inside_the_region_and_its_polygons(run):
    _, result = run
    mpp = result.mpp[0]
    y0, x0, y1, x1 = REGION
    assert tissue_area_um2(result) == pytest.approx((y1 - y0) * (x1 - x0) * mpp * mpp, rel=1e-3)
    # A triangle inside the region: half the rectangle.
    triangle = PolygonRegion.from_yx([[(y0, x0), (y0, x1), (y1, x0)]])
    assert tissue_area_um2(result, triangle) == pytest.approx((y1 - y0) * (x1 - x0) / 2 * mpp * mpp, rel=0.01)


def test_whole_slide_density_uses_the_detected_tissue(bundled, cmu1):
    slide = cmu1
    result = run_to_completion(run_segmentation(slide, bundled))
    tissue = result.tissue
    expected = tissue.mask.sum() * tissue.downsample[0] * tissue.downsample[1] * slide.mpp[0] * slide.mpp[1]
    assert tissue_area_um2(result) == pytest.approx(expected, rel=0.02)
    assert tissue_area_um2(result) < 0.9 * slide.shape[0] * slide.shape[1] * slide.mpp[0] * slide.mpp[1]


def test_bad_input_is_refused(run, bundled):
    _, result = run
    with pytest.raises(ValueError, match="window: expected a positive integer"):
        next(nuclei_of(result, bundled.card.class_names, window=0))


def test_contour_models_separate_touching_nuclei_by_their_contours():
    """A three-class run (background, nucleus, contour) gives back each nucleus of real ground truth."""
    import tifffile
    from PIL import Image
    from skimage.segmentation import find_boundaries

    from napari_feddp.inference import InferenceSpec, segment_slide
    from napari_feddp.models import build_model, default_card
    from napari_feddp.training.instance_metrics import panoptic_quality

    from .conftest import require_data

    name = "TCGA-2Z-A9J9-01A-01-TS1"
    image = np.asarray(Image.open(require_data(f"monuseg/test/images/{name}.tif")).convert("RGB"))[:400, :400]
    truth = tifffile.imread(require_data(f"monuseg/test/instances/{name}.tif"))[:400, :400].astype(np.int64)
    card = default_card(contours=True, tile_size=128, depth=2, base_width=4, groups=2)
    assert list(card.class_names) == ["background", "nucleus", "contour"]
    # A real run gives the result's geometry (MoNuSeg is 0.25 µm/px, told 0.5 so a label pixel is an
    # image pixel); its class map is then replaced by the ground truth drawn as a contour model draws it.
    result = run_to_completion(segment_slide(image, build_model(card), InferenceSpec.from_card(card),
                                             mpp=0.5, tissue=False))
    boundaries = find_boundaries(truth, mode="inner") & (truth > 0)
    result.labels[:] = np.where(boundaries, 2, (truth > 0).astype(np.uint8))
    touching = (np.asarray(result.labels[:]) > 0)
    from skimage.measure import label

    assert label(touching).max() < len(np.unique(truth)) - 1  # some nuclei touch through their contours
    nuclei, _ = _drain(nuclei_of(result, card.class_names, window=160))
    big = np.bincount(truth.ravel())[1:] * 0.25 >= 3.0  # nuclei above the smallest area kept
    expected = np.where(np.isin(truth, np.flatnonzero(big) + 1), truth, 0)
    pq = panoptic_quality(expected, np.asarray(nuclei.labels[:]).astype(np.int64))
    assert pq["dq"] > 0.95 and pq["sq"] > 0.9, pq
