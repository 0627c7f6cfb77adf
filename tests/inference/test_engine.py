"""The engine end to end: equality with whole-image prediction, skipping, cancel, output, errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import zarr
from inference_helpers import (
    PixelNet,
    RecordingNet,
    StainNet,
    direct_prediction,
    paste_tissue,
    white_image,
)

from napari_feddp.inference import (
    InferenceCancelled,
    InferenceError,
    InferenceSpec,
    Progress,
    SegmentationResult,
    TissueMask,
    _output,
    grid_starts,
    run_to_completion,
    segment_slide,
)

SPEC = InferenceSpec(tile_size=128)


def _run(image, model, spec=SPEC, **kwargs) -> SegmentationResult:
    kwargs.setdefault("device", "cpu")
    return run_to_completion(segment_slide(image, model, spec, **kwargs))


# ----------------------------------------------------------------- equality with direct prediction


@pytest.mark.parametrize("num_workers", [None, 0, 3])
def test_pointwise_model_equals_direct_prediction_exactly(cmu_crop, num_workers):
    model = PixelNet()
    result = _run(cmu_crop, model, tissue=False, overlap=0.25, num_workers=num_workers)
    direct = direct_prediction(model, cmu_crop).argmax(0)
    assert result.complete and result.labels.shape == cmu_crop.shape[:2]
    assert np.bincount(direct.ravel(), minlength=3).min() > 0  # all three classes occur
    np.testing.assert_array_equal(result.labels[:], direct)


@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_conv_model_equals_direct_prediction_within_blending_tolerance(cmu_crop, overlap):
    """A 3x3 net sees zero padding at tile borders; blending must hide it."""
    model = StainNet()
    result = _run(cmu_crop, model, tissue=False, overlap=overlap, batch_size=5)
    probabilities = direct_prediction(model, cmu_crop)
    direct = probabilities.argmax(0)
    assert 0.2 < direct.mean() < 0.8
    differ = result.labels[:] != direct
    # Only near-ties may flip: tile-border pixels carry weight <= 0.1 % of their neighbour's.
    assert differ.mean() < 1e-4
    if differ.any():
        assert np.abs(probabilities[1][differ] - 0.5).max() < 0.01


def test_test_time_augmentation_maps_every_view_back(cmu_crop):
    """A pointwise model sees the same pixel in every flip/rotation: averaging changes nothing."""
    model = PixelNet()
    plain = _run(cmu_crop, model, tissue=False)
    augmented = _run(cmu_crop, model, tissue=False, augment=True)
    np.testing.assert_array_equal(augmented.labels[:], plain.labels[:])


class _EightViews(torch.nn.Module):
    """Log of the mean class probabilities over the 8 rotations and flips of each tile."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = 0
        for flipped in (False, True):
            view = x.flip(-1) if flipped else x
            for k in range(4):
                p = torch.softmax(self.model(view.rot90(k, (-2, -1))), 1).rot90(-k, (-2, -1))
                total = total + (p.flip(-1) if flipped else p)
        return torch.log(total / 8)


def test_test_time_augmentation_averages_the_eight_views(cmu_crop):
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 2, 5, padding=2).eval()  # random weights: not rotation-equivariant
    plain = _run(cmu_crop, model, tissue=False).labels[:]
    augmented = _run(cmu_crop, model, tissue=False, augment=True).labels[:]
    expected = _run(cmu_crop, _EightViews(model), tissue=False).labels[:]
    assert (augmented != plain).mean() > 1e-3  # thousands of pixels change
    assert (augmented != expected).mean() < 1e-4  # float rounding at near-ties only


def test_without_overlap_tile_borders_show(cmu_crop):
    """Control for the test above: with overlap=0 the same net leaves tile-border errors."""
    model = StainNet()
    image = cmu_crop[:512, :768]  # a whole number of tiles: without overlap they just abut
    result = _run(image, model, tissue=False, overlap=0.0)
    assert (result.labels[:] != direct_prediction(model, image).argmax(0)).sum() > 50


def test_real_slide_with_resampling_matches_resized_direct_prediction(cmu_slide):
    """mpp 1.5 on a 0.499 um/px slide: level-0 tiles shrunk 3x, labels on a 3x coarser grid."""
    model = StainNet()
    spec = InferenceSpec(tile_size=128, mpp=1.5)
    region = (1200, 900, 2400, 1800)  # level-0 y0, x0, y1, x1: mostly tissue
    result = _run(cmu_slide, model, spec, batch_size=8, region=region)
    # This file stores only level 0 (its coarser levels are computed on the fly), so
    # level 0 is read and every tile resized once.
    assert result.level == 0
    assert result.downsample == pytest.approx((3.006, 3.006), rel=0.01)
    assert result.mpp == pytest.approx((1.5, 1.5), rel=0.01)
    assert result.labels.shape == (987, 739)  # level 0 (2967 x 2220 at 0.499 um/px) / 3.006
    window = (slice(400, 800), slice(300, 600))  # the region on the 3x grid
    level0 = np.asarray(cmu_slide.levels[0][1200 - 6 : 2400 + 6, 900 - 6 : 1800 + 6])
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(level0).permute(2, 0, 1)[None].float(), scale_factor=1 / 3.006,
        mode="bilinear", antialias=True, align_corners=False,
    )[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    direct = direct_prediction(model, resized).argmax(0)[2 : 2 + 400, 2 : 2 + 300]
    labels = np.asarray(result.labels[window])
    tissue = _upsampled_mask(result.tissue, result.downsample, result.labels.shape)[window]
    assert tissue.mean() > 0.5 and labels.mean() > 0.2
    # Tile-wise resizing differs from whole-image resizing by sub-pixel shifts only.
    assert (labels[tissue] == direct[tissue]).mean() > 0.97


def _upsampled_mask(mask: TissueMask, downsample, shape):
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * downsample[0] / mask.downsample[0]).astype(int), mask.mask.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * downsample[1] / mask.downsample[1]).astype(int), mask.mask.shape[1] - 1)
    return mask.mask[np.ix_(rows, cols)]


def test_stored_pyramid_level_is_read_when_it_matches():
    from inference_helpers import shared_data

    from napari_feddp.slides import open_slide

    slide = open_slide(shared_data("slides/boxes.tiff"))  # 4 stored levels, 300 x 250 -> 37 x 31
    try:
        assert slide.pyramid_in_file
        level = 2
        target = 0.5 * slide.downsamples[level][0]
        result = _run(slide, StainNet(), InferenceSpec(tile_size=16, mpp=target), mpp=0.5, tissue=False)
        assert result.level == level
        assert result.labels.shape == tuple(slide.levels[level].shape[:2])
        direct = direct_prediction(StainNet(), np.asarray(slide.levels[level])).argmax(0)
        assert (result.labels[:] == direct).mean() > 0.99
    finally:
        slide.close()


# ----------------------------------------------------------------- tissue-only, region


@pytest.fixture(scope="module")
def half_tissue(cmu_crop) -> np.ndarray:
    """Glass with real tissue (mostly tissue, some glass) in the top-left quarter only."""
    image = white_image(1024, 1024, noise=3)
    return paste_tissue(image, cmu_crop[100:500, 350:750], 40, 40)


def _seen_origins(model: RecordingNet, image: np.ndarray, tile: int, stride: int) -> list[tuple[int, int]]:
    """Where, on the image, each tile the model received was cut (matched by content)."""
    starts_y = grid_starts(image.shape[0], tile, stride)
    starts_x = grid_starts(image.shape[1], tile, stride)
    origins = []
    for pixels in (model.tiles * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        matches = [
            (int(y), int(x))
            for y in starts_y
            for x in starts_x
            if np.array_equal(image[y : y + tile, x : x + tile], pixels)
        ]
        assert len(matches) == 1
        origins.append(matches[0])
    return origins


def test_background_tiles_never_reach_the_model(half_tissue):
    """Tissue lies in [40, 440) x [40, 440); tiles on glass beyond the mask margin are skipped."""
    model = RecordingNet()
    result = _run(half_tissue, model, overlap=0.25, batch_size=4)
    origins = _seen_origins(model, half_tissue, 128, 96)
    assert len(origins) == len(set(origins)) == result.tiles_done == result.tiles_total
    assert result.tiles_skipped > 2 * result.tiles_total  # most of the slide is glass
    # The mask is coarse (16 px) and grown by 16 um (32 px): a tile may start at most
    # 48 px past the tissue and still be predicted, never further.
    assert all(y < 440 + 48 and x < 440 + 48 for y, x in origins)
    labels = result.labels[:]
    assert labels[600:, :].max() == 0 and labels[:, 600:].max() == 0
    assert labels[100:400, 100:400].mean() > 0.2
    # Background chunks are never written: the store holds only tissue chunks.
    assert result.labels.nchunks_initialized < result.labels.nchunks


def test_region_limits_prediction_and_output(half_tissue):
    model = RecordingNet()
    region = (100, 120, 300, 260)  # y0, x0, y1, x1 in level-0 pixels
    result = _run(half_tissue, model, region=region)
    assert result.region == region
    origins = _seen_origins(model, half_tissue, 128, 96)
    assert all(y < 300 and y + 128 > 100 and x < 260 and x + 128 > 120 for y, x in origins)
    starts = grid_starts(1024, 128, 96)
    rows = ((starts < 300) & (starts + 128 > 100)).sum()
    cols = ((starts < 260) & (starts + 128 > 120)).sum()
    assert result.tiles_total == len(origins) == rows * cols  # all tissue there
    labels = result.labels[:]
    outside = np.ones(labels.shape, bool)
    outside[100:300, 120:260] = False
    assert labels[outside].max() == 0
    assert labels[100:300, 120:260].any()


def test_region_is_clipped_to_the_slide(half_tissue):
    result = _run(half_tissue, StainNet(), region=(-50.5, -20, 200, 150.2))
    assert result.region == (0, 0, 200, 151)


def test_user_mask_replaces_detection(half_tissue):
    mask = np.zeros((32, 32), bool)
    mask[1, 1] = True  # level-0 [32, 64) squared: inside the first tile only
    model = RecordingNet()
    result = _run(half_tissue, model, tissue=mask)
    assert result.tiles_total == len(model.tiles) == 1
    assert result.tissue.downsample == (32.0, 32.0)


# ----------------------------------------------------------------- progress, cancel


def test_progress_reports(half_tissue):
    reports: list[Progress] = []
    result = run_to_completion(segment_slide(half_tissue, StainNet(), SPEC, batch_size=2), callback=reports.append)
    assert reports[0].stage == "planning"
    predicting = [p for p in reports if p.stage == "predicting"]
    assert predicting[0].done == 0 and predicting[0].total == result.tiles_total
    done = [p.done for p in predicting]
    assert done == sorted(done) and done[-1] == result.tiles_total
    assert all(p.eta_seconds is None or p.eta_seconds >= 0 for p in reports)
    assert reports[-1].stage == "finished" and reports[-1].fraction == 1.0
    assert result.labels.attrs["complete"] is True


@pytest.mark.parametrize("as_callable", [False, True])
def test_cancel_stops_cleanly_and_is_never_complete(half_tissue, as_callable, tmp_path):
    model = RecordingNet()
    event = threading.Event()
    cancel = event.is_set if as_callable else event
    gen = segment_slide(half_tissue, model, SPEC, batch_size=1, cancel=cancel, out=tmp_path / "labels.zarr")
    reports = []
    with pytest.raises(InferenceCancelled, match="cancelled after") as caught:
        def on_progress(progress):
            reports.append(progress)
            if progress.done >= 2:
                event.set()

        run_to_completion(gen, callback=on_progress)
    result = caught.value.result
    assert not result.complete and reports[-1].stage == "cancelled"
    assert result.tiles_done < result.tiles_total
    assert len(model.batches) <= result.tiles_done + 1  # at most the batch already in flight
    assert zarr.open_array(tmp_path / "labels.zarr").attrs["complete"] is False
    assert "incomplete" in result.layer_kwargs()["name"]
    assert not [t for t in threading.enumerate() if t.name.startswith("feddp-tiles")]


def test_cancel_before_the_first_batch(half_tissue):
    event = threading.Event()
    event.set()
    model = RecordingNet()
    result = run_to_completion(segment_slide(half_tissue, model, SPEC, cancel=event), allow_partial=True)
    assert not result.complete and result.tiles_done == 0 and not model.batches
    assert result.labels[:].max() == 0


def test_closing_the_generator_releases_threads_and_model_mode(half_tissue):
    model = StainNet()
    model.train()
    gen = segment_slide(half_tissue, model, SPEC, batch_size=1)
    for progress in gen:
        if progress.done >= 1:
            break
    gen.close()
    assert model.training
    assert not [t for t in threading.enumerate() if t.name.startswith("feddp-tiles")]


# ----------------------------------------------------------------- output store


def test_small_output_is_in_memory_and_large_goes_to_a_temporary_directory(half_tissue, monkeypatch):
    small = _run(half_tissue, StainNet())
    assert small.path is None
    monkeypatch.setattr(_output, "IN_MEMORY_MAX_BYTES", 1000)
    large = _run(half_tissue, StainNet())
    assert large.path is not None and large.path.exists()
    np.testing.assert_array_equal(small.labels[:], large.labels[:])
    path = large.path
    del large
    import gc

    gc.collect()
    assert not path.exists()  # removed with the result


def test_output_on_disk_with_pyramid_and_placement(half_tissue, tmp_path):
    out = tmp_path / "seg.zarr"
    result = _run(half_tissue, StainNet(), InferenceSpec(tile_size=128, mpp=1.0, class_names=("glass", "tissue")), mpp=0.5, out=out)
    stored = zarr.open_array(out)
    assert stored.shape == (512, 512) and stored.dtype == np.uint8
    assert stored.attrs["complete"] is True and stored.attrs["class_names"] == ["glass", "tissue"]
    np.testing.assert_array_equal(stored[:], result.labels[:])
    assert [level.shape for level in result.pyramid] == [(512, 512)]
    kwargs = result.layer_kwargs()
    assert kwargs["scale"] == pytest.approx((1.0, 1.0)) and kwargs["translate"] == pytest.approx((0.25, 0.25))
    assert result.layer_kwargs("pixel")["scale"] == pytest.approx((2.0, 2.0))
    with pytest.raises(InferenceError, match="existing"):
        _run(half_tissue, StainNet(), out=out)
    _run(half_tissue, StainNet(), out=out, overwrite=True)


def test_single_channel_model_is_a_sigmoid(half_tissue):
    class Binary(torch.nn.Module):
        def forward(self, x):
            return StainNet()(x)[:, 1:] - StainNet()(x)[:, :1]

    binary = _run(half_tissue, Binary())
    two_class = _run(half_tissue, StainNet())
    assert (binary.labels[:] == two_class.labels[:]).mean() > 0.999


def test_unet_from_models_runs(half_tissue):
    models = pytest.importorskip("napari_feddp.models.unet")
    torch.manual_seed(0)
    unet = models.UNet(in_channels=3, n_classes=3, depth=3, base_width=8, groups=4)
    result = _run(half_tissue, unet, InferenceSpec(tile_size=128, n_classes=3), batch_size=4)
    assert result.complete and result.labels.shape == (1024, 1024)
    with pytest.raises(InferenceError, match="multiple of 4"):
        segment_slide(half_tissue, unet, InferenceSpec(tile_size=130))


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((64, 64), np.uint8), r"expected shape \(Y, X, 3\)"),
        (np.zeros((64, 64, 5), np.uint8), r"expected shape \(Y, X, 3\)"),
        (np.zeros((1, 64, 64, 3), np.uint8), r"expected shape \(Y, X, 3\)"),
        (np.zeros((64, 64, 3), np.float32), "expected dtype uint8"),
        ([[1, 2, 3]], "expected a Slide or an RGB array"),
    ],
)
def test_bad_images(image, message):
    with pytest.raises(InferenceError, match=message):
        segment_slide(image, StainNet(), SPEC)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, r"batch_size: expected an integer >= 1, received 0"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"overlap": 1.0}, r"overlap: expected a fraction of the tile in \[0, 0.9\], received 1.0"),
        ({"overlap": -0.1}, "overlap"),
        ({"region": (0, 0, 10)}, "region: expected 4 finite numbers"),
        ({"region": (50, 50, 10, 10)}, "expected y0 < y1 and x0 < x1"),
        ({"region": (5000, 5000, 6000, 6000)}, "lies outside it"),
        ({"device": "tpu"}, "device: expected"),
        ({"cancel": 3}, "cancel: expected"),
        ({"window": "box"}, "window: expected"),
        ({"tissue": "yes"}, "tissue: expected"),
        ({"tissue": np.zeros((8, 8), bool)}, "mask is empty"),
        ({"mpp": -1.0}, "mpp: expected a positive number"),
        ({"num_workers": -1}, "num_workers"),
        ({"augment": "yes"}, "augment: expected True or False"),
    ],
)
def test_bad_arguments(half_tissue, kwargs, message):
    with pytest.raises(InferenceError, match=message):
        segment_slide(half_tissue, StainNet(), SPEC, **kwargs)


def test_cuda_requested_without_gpu(half_tissue):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(InferenceError, match="no CUDA GPU"):
        segment_slide(half_tissue, StainNet(), SPEC, device="cuda")


def test_bad_model_and_spec(half_tissue):
    with pytest.raises(InferenceError, match="model: expected a torch.nn.Module"):
        segment_slide(half_tissue, lambda x: x, SPEC)
    with pytest.raises(InferenceError, match="spec: expected an InferenceSpec"):
        segment_slide(half_tissue, StainNet(), {"tile_size": 128})
    with pytest.raises(InferenceError, match="has no pixel size; pass mpp="):
        segment_slide(half_tissue, StainNet(), InferenceSpec(tile_size=128, mpp=0.5))


def test_no_tissue_is_a_clear_error():
    with pytest.raises(InferenceError, match="no tissue found"):
        _run(white_image(600, 600, noise=5), StainNet())


def test_region_without_tissue_is_a_clear_error(half_tissue):
    with pytest.raises(InferenceError, match="no tile to predict"):
        _run(half_tissue, StainNet(), region=(800, 800, 1000, 1000))


class _WrongOutput(torch.nn.Module):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def forward(self, x):
        return self.make(x)


@pytest.mark.parametrize(
    ("make", "spec", "message"),
    [
        (lambda x: torch.zeros(x.shape[0], 2, 64, 64), SPEC, r"expected logits of shape \(4, C, 128, 128\), received \(4, 2, 64, 64\)"),
        (lambda x: torch.zeros(x.shape[0], 3, 128, 128), InferenceSpec(tile_size=128, n_classes=2),
         r"\(4, 2, 128, 128\), received \(4, 3, 128, 128\)"),
        (lambda x: torch.zeros(2, 128, 128), SPEC, r"received \(2, 128, 128\)"),
        (lambda x: (torch.zeros(x.shape[0], 2, 128, 128),), SPEC, "received tuple"),
    ],
)
def test_model_output_mismatch(half_tissue, make, spec, message):
    with pytest.raises(InferenceError, match=message):
        _run(half_tissue, _WrongOutput(make), spec, batch_size=4, tissue=False)
