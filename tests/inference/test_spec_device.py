"""InferenceSpec validation, the model-card adapter, device choice."""

from __future__ import annotations

import pytest
import torch

from napari_feddp.inference import InferenceError, InferenceSpec, autocast, select_device


def test_spec_defaults_and_validation():
    spec = InferenceSpec(tile_size=256, mpp=0.5, mean=(0.5, 0.5, 0.5), std=[0.2, 0.2, 0.2], n_classes=2)
    assert spec.std == (0.2, 0.2, 0.2)
    for kwargs, message in [
        ({"tile_size": 0}, "tile_size: expected a positive integer, received 0"),
        ({"tile_size": 100, "size_multiple": 8}, "expected a multiple of size_multiple=8, received 100"),
        ({"mpp": -0.5}, "mpp: expected a positive number or None"),
        ({"mean": (0.1, 0.2)}, "mean: expected 3 finite numbers"),
        ({"std": (1.0, 0.0, 1.0)}, "std: expected 3 positive numbers"),
        ({"n_classes": 0}, "n_classes"),
        ({"n_classes": 3, "class_names": ("a", "b")}, "expected 3 names"),
    ]:
        with pytest.raises(InferenceError, match=message):
            InferenceSpec(**kwargs)


def test_spec_from_card_layout():
    card = {
        "classes": [{"name": "background", "color": "#000000"}, {"name": "nucleus", "color": "#ff0000"}],
        "input": {"mpp": 0.5, "tile_size": 256, "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
    }
    spec = InferenceSpec.from_card(card)
    assert spec == InferenceSpec(
        tile_size=256, mpp=0.5, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        n_classes=2, class_names=("background", "nucleus"),
    )


def test_spec_from_model_card():
    models = pytest.importorskip("napari_feddp.models")
    if not hasattr(models, "default_card"):
        pytest.skip("napari_feddp.models has no model card yet")
    card = models.default_card(mpp=0.5, tile_size=256)
    spec = InferenceSpec.from_card(card)
    assert spec.tile_size == 256 and spec.mpp == 0.5
    assert spec.n_classes == card.n_classes and spec.class_names == tuple(card.class_names)
    assert spec.mean == pytest.approx(tuple(card.input.normalization.mean))


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert select_device("auto").type == expected
    with pytest.raises(InferenceError, match="device: expected"):
        select_device("gpu0")
    with pytest.raises(InferenceError, match="device: expected"):
        select_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(InferenceError, match="no CUDA GPU is available"):
            select_device("cuda:0")


def test_autocast_only_on_cuda():
    with autocast(torch.device("cpu")):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


class _ConstantLogits(torch.nn.Module):
    """Every pixel: background 0.36, nucleus 0.34, contour 0.30 (softmax probabilities)."""

    def forward(self, x):
        probabilities = torch.tensor([0.36, 0.34, 0.30]).log().view(1, 3, 1, 1)
        return probabilities.expand(x.shape[0], 3, *x.shape[2:]).clone()


def test_contour_models_weight_the_contour_class_in_the_decision():
    import numpy as np

    from napari_feddp.inference import run_to_completion, segment_slide
    from napari_feddp.inference.spec import CONTOUR_WEIGHT
    from napari_feddp.models import default_card

    card = default_card(contours=True, tile_size=32, depth=2, base_width=8, groups=4)
    spec = InferenceSpec.from_card(card)
    assert spec.class_weights == (1.0, 1.0, CONTOUR_WEIGHT)
    assert InferenceSpec.from_card(default_card(tile_size=32)).class_weights is None
    image = np.full((64, 64, 3), 120, np.uint8)

    def classes(spec):
        result = run_to_completion(segment_slide(image, _ConstantLogits(), spec, tissue=False, device="cpu", mpp=0.5))
        return set(np.unique(result.labels[:]).tolist())

    assert classes(spec) == {2}  # 0.30 x 2.5 beats 0.36
    import dataclasses

    assert classes(dataclasses.replace(spec, class_weights=None)) == {0}  # plain arg max
    with pytest.raises(InferenceError, match="class_weights"):
        InferenceSpec(n_classes=3, class_weights=(1.0, 0.0, 2.0))
    with pytest.raises(InferenceError, match="class_weights"):
        InferenceSpec(n_classes=2, class_weights=(1.0, 1.0, 2.0))
