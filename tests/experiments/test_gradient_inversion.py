"""Gradient-inversion audit: scoring, the client update, and a tiny end-to-end attack."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from experiments.gradient_inversion import (
    AttackConfig,
    client_update,
    cosine_distance,
    invert_gradients,
    noise_images,
    normalize,
    score_reconstructions,
    total_variation,
)
from napari_feddp.models import build_model, default_card
from napari_feddp.training import DiceCELoss

from ..conftest import require_data

NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def _tiny_model(size: int = 32) -> torch.nn.Module:
    """The shipped U-Net's width and GroupNorm (16 channels, 8 groups), but only 2 levels: fast."""
    torch.manual_seed(0)
    return build_model(default_card(tile_size=size, depth=2, base_width=16, groups=8))


# --------------------------------------------------------------------------- scoring


def test_identical_images_score_perfectly():
    images = _smooth_images(2)
    score = score_reconstructions(images, images.clone())
    assert score.psnr == [math.inf, math.inf]
    assert score.ssim == pytest.approx([1.0, 1.0])
    assert score.assignment == [0, 1]


def test_psnr_of_a_known_error_and_layout_independence():
    truth = torch.full((1, 3, 16, 16), 0.5)
    score = score_reconstructions(truth, truth + 0.1)  # MSE 0.01, data range 1 -> 20 dB
    assert score.psnr[0] == pytest.approx(20.0, abs=1e-4)
    hwc = score_reconstructions(truth.permute(0, 2, 3, 1).numpy(), (truth + 0.1).permute(0, 2, 3, 1).numpy())
    assert hwc.psnr[0] == pytest.approx(20.0, abs=1e-4)


def test_permutation_is_resolved_by_best_matching():
    truth = _smooth_images(4)
    order = [2, 0, 3, 1]
    noisy = (truth[order] + 0.02 * torch.randn(truth[order].shape, generator=torch.Generator().manual_seed(1)))
    score = score_reconstructions(truth, noisy.clamp(0, 1))
    # true crop i is found at position order.index(i) of the reconstructions
    assert score.assignment == [order.index(i) for i in range(4)]
    assert min(score.psnr) > 30 and min(score.ssim) > 0.8
    direct = score_reconstructions(truth, truth)
    assert direct.assignment == [0, 1, 2, 3]


def test_score_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="shapes differ"):
        score_reconstructions(_smooth_images(2), _smooth_images(3))


def test_cosine_distance_and_total_variation():
    a = [torch.randn(3, 4), torch.randn(5)]
    assert float(cosine_distance(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_distance(a, [-t for t in a])) == pytest.approx(2.0, abs=1e-6)
    assert float(cosine_distance(a, [3 * t for t in a])) == pytest.approx(0.0, abs=1e-6)
    assert float(total_variation(torch.ones(1, 3, 8, 8))) == 0.0
    assert float(total_variation(torch.randn(1, 3, 8, 8))) > 0.5


def test_noise_images_are_boxed_and_reproducible():
    a = noise_images((2, 3, 8, 8), NORM, seed=3)
    assert torch.equal(a, noise_images((2, 3, 8, 8), NORM, seed=3))
    assert float(a.min()) >= -1e-6 and float(a.max()) <= 1 + 1e-6


def test_groupnorm_unet_gradient_is_blind_to_input_contrast():
    """Bias-free first conv + GroupNorm: scaling the normalised input leaves every gradient unchanged,
    so an update cannot reveal the contrast of a crop (docs/privacy.md, "what the attack cannot see")."""
    model = _tiny_model()
    x = normalize(_smooth_images(1), NORM)
    masks = (x[:, 0] > 0).long()

    def grads(images):
        return torch.autograd.grad(DiceCELoss()(model(images), masks), list(model.parameters()))

    reference = grads(x)
    for scale in (0.5, 3.0):
        assert float(cosine_distance(reference, grads(scale * x))) < 1e-5
    assert float(cosine_distance(reference, grads(x + 0.5))) > 1e-3  # a shift is visible


# --------------------------------------------------------------------------- the client update


def test_plain_update_is_the_mean_batch_gradient():
    model = _tiny_model()
    images = _smooth_images(3)
    masks = (images[:, 0] > 0.5).long()
    update = client_update(model, images, masks, normalization=NORM, dp=False, lr=0.01)
    loss = DiceCELoss()(model(normalize(images, NORM)), masks)
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    assert set(update) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(update[name], grad, rtol=1e-3, atol=3e-5)


def test_dp_update_goes_through_opacus_clipping_and_noise():
    model = _tiny_model()
    images = _smooth_images(2)
    masks = (images[:, 0] > 0.5).long()
    plain = client_update(model, images, masks, normalization=NORM, dp=False)
    # Huge clipping norm, negligible noise: DP-SGD degenerates to the plain mean gradient.
    loose = client_update(model, images, masks, normalization=NORM, dp=True, max_grad_norm=1e6,
                          noise_multiplier=1e-12)
    for name in plain:
        torch.testing.assert_close(loose[name], plain[name], rtol=1e-3, atol=3e-5)
    # Tight clipping, negligible noise: the update is the mean of per-sample gradients of norm C.
    clipped = client_update(model, images, masks, normalization=NORM, dp=True, max_grad_norm=1e-3,
                            noise_multiplier=1e-12)
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in clipped.values()))
    assert norm <= 1e-3 * (1 + 1e-4)
    # Default noise: the update is dominated by noise of std noise_multiplier * C / B per coordinate.
    noisy = client_update(model, images, masks, normalization=NORM, dp=True, seed=5)
    values = torch.cat([v.flatten() for v in noisy.values()])
    assert float(values.std()) == pytest.approx(1.0 / 2, rel=0.1)
    again = client_update(model, images, masks, normalization=NORM, dp=True, seed=5)
    assert all(torch.equal(noisy[k], again[k]) for k in noisy)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), _tiny_model().state_dict().values()))


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def monuseg_crop():
    from napari_feddp.training import SegmentationDataset
    from napari_feddp.training.dataset import crop_with_padding

    root = require_data("monuseg/train")
    dataset = SegmentationDataset(root, crop_size=32, target_mpp=0.5, augment=False)
    image, mask = dataset.load_tile(0)
    crop_image, crop_mask = crop_with_padding(image, mask, 210, 200, 32)
    assert 0.1 < crop_mask.mean() < 0.7
    image01 = torch.from_numpy(np.ascontiguousarray(crop_image)).permute(2, 0, 1).float()[None] / 255.0
    return image01, torch.from_numpy(crop_mask)[None]


#: Mean RGB of the public MoNuSeg *test* split in [0, 1] (``benchmarks/privacy_attack.py``'s
#: ``public_colours``): the attacker's data-independent guess and the audit's starting image.
PUBLIC_MEAN_RGB = (0.5945, 0.4267, 0.6214)


@pytest.mark.slow
@pytest.mark.parametrize("start", ["mean-colour", "noise"])
def test_tiny_attack_recovers_without_dp_and_not_with_dp(monuseg_crop, start):
    images, masks = monuseg_crop
    model = _tiny_model()
    config = AttackConfig(iterations=200, tv_weight=0.03, seed=0)
    start01 = None
    if start == "mean-colour":
        start01 = torch.tensor(PUBLIC_MEAN_RGB).reshape(1, 3, 1, 1).expand(images.shape).clone()
    updates = {
        "no_dp": client_update(model, images, masks, normalization=NORM, dp=False),
        "dp": client_update(model, images, masks, normalization=NORM, dp=True, seed=0),
    }
    generator = torch.Generator().manual_seed(1)
    updates["control"] = {k: torch.randn(v.shape, generator=generator) for k, v in updates["dp"].items()}
    scores, results = {}, {}
    for name, update in updates.items():
        results[name] = invert_gradients(model, update, masks, normalization=NORM, config=config, start01=start01)
        scores[name] = score_reconstructions(images, results[name].images01)
    baseline = score_reconstructions(images, results["no_dp"].init01)

    assert torch.equal(results["no_dp"].init01, results["dp"].init01)
    assert results["no_dp"].cosine > 0.9
    # (a) without DP the crop is recovered: far better than the start and than the no-information control
    assert scores["no_dp"].mean_psnr > baseline.mean_psnr + 3.0
    assert scores["no_dp"].mean_psnr > scores["control"].mean_psnr + 2.0
    assert scores["no_dp"].mean_ssim > scores["control"].mean_ssim + 0.1
    # (b) with DP the attack learns nothing: it scores like the no-information control ...
    assert scores["dp"].mean_psnr < scores["control"].mean_psnr + 1.0
    assert scores["dp"].mean_ssim < scores["control"].mean_ssim + 0.05
    if start == "mean-colour":
        # ... and, from the attacker's best data-independent guess, no better than that guess.
        assert scores["dp"].mean_psnr <= baseline.mean_psnr
        assert scores["dp"].mean_ssim <= baseline.mean_ssim


def test_start_images_must_match_the_batch(monuseg_crop):
    images, masks = monuseg_crop
    with pytest.raises(ValueError, match="start01: expected shape"):
        invert_gradients(_tiny_model(), client_update(_tiny_model(), images, masks, normalization=NORM, dp=False),
                         masks, normalization=NORM, config=AttackConfig(iterations=1),
                         start01=torch.zeros(2, 3, 8, 8))
