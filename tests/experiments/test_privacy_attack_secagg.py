"""``benchmarks/privacy_attack.py --secagg-labs N``: the attacker observes the mean of N labs' updates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from experiments.gradient_inversion import client_update
from napari_feddp.federation.settings import RunSettings

from .test_gradient_inversion import NORM, _smooth_images, _tiny_model

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "privacy_attack.py"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def privacy_attack():
    # Loaded by path: benchmarks/ is not a package (and another "benchmarks" may be installed).
    spec = importlib.util.spec_from_file_location("privacy_attack_under_test", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lab_update(model, images, masks, args, settings, *, dp: bool, seed: int) -> dict[str, torch.Tensor]:
    """One lab's update, computed on its own (as that lab would)."""
    dp_kwargs = {"noise_multiplier": settings.noise_multiplier, "max_grad_norm": settings.max_grad_norm} if dp else {}
    return client_update(model, images, masks, normalization=NORM, dp=dp, lr=settings.learning_rate,
                         optimizer=args.optimizer, seed=seed, **dp_kwargs)


def test_output_defaults_and_lab_count(privacy_attack):
    assert privacy_attack.parse_args([]).out.name == "privacy_attack.json"
    secagg = privacy_attack.parse_args(["--secagg-labs", "3"])
    assert secagg.secagg_labs == 3
    assert secagg.out.name == "privacy_attack_secagg.json" and secagg.figure is None
    assert privacy_attack.parse_args(["--secagg-labs", "3", "--batch-sizes", "1"]).iterations == [2000]
    for bad in ("1", "-2"):
        with pytest.raises(SystemExit):
            privacy_attack.parse_args(["--secagg-labs", bad])


def test_secagg_observation_is_the_mean_of_three_lab_updates(privacy_attack):
    args = privacy_attack.parse_args(["--secagg-labs", "3", "--quick"])
    settings = RunSettings()
    model = _tiny_model(16)
    images = _smooth_images(3, size=16)  # B = 1 crop for each of 3 labs, lab 1 first
    masks = (images[:, 0] > 0.5).long()
    observed, lab1 = privacy_attack.observed_updates(model, images, masks, args, settings, NORM)

    for dp in (False, True):
        key = "dp" if dp else "no_dp"
        labs = [_lab_update(model, images[k:k + 1], masks[k:k + 1], args, settings, dp=dp, seed=args.seed + k)
                for k in range(3)]
        assert set(observed[key]) == set(labs[0])
        for name, value in observed[key].items():
            torch.testing.assert_close(value, (labs[0][name] + labs[1][name] + labs[2][name]) / 3)
            torch.testing.assert_close(lab1[key][name], labs[0][name], rtol=0, atol=0)
        # the mean is not lab 1's update: the other labs' updates are in it
        assert any(not torch.allclose(observed[key][name], labs[0][name]) for name in observed[key])

    # Each lab adds its own, independent, full DP-SGD noise (std noise_multiplier * C / B per coordinate),
    # so the mean of 3 carries noise of std noise_multiplier * C / sqrt(3).
    noise = torch.cat([(observed["dp"][n] - observed["no_dp"][n]).flatten() for n in observed["dp"]])
    expected = settings.noise_multiplier * settings.max_grad_norm / 3**0.5
    assert float(noise.std()) == pytest.approx(expected, rel=0.1)


def test_without_secagg_the_observation_is_the_lab_update(privacy_attack):
    args = privacy_attack.parse_args(["--quick"])
    settings = RunSettings()
    model = _tiny_model(16)
    images = _smooth_images(2, size=16)  # one lab, B = 2
    masks = (images[:, 0] > 0.5).long()
    observed, lab1 = privacy_attack.observed_updates(model, images, masks, args, settings, NORM)
    for dp in (False, True):
        key = "dp" if dp else "no_dp"
        alone = _lab_update(model, images, masks, args, settings, dp=dp, seed=args.seed)
        for name, value in alone.items():
            torch.testing.assert_close(observed[key][name], value, rtol=0, atol=0)
            torch.testing.assert_close(lab1[key][name], value, rtol=0, atol=0)
