"""ModelCard: JSON round trip, validation messages, building models from cards."""

import copy
import json
from pathlib import Path

import pytest

from napari_feddp.models import (
    ClassInfo,
    ModelCard,
    ModelCardError,
    UNet,
    build_model,
    default_card,
)


def test_default_card_describes_a_two_class_nuclei_unet():
    card = default_card()
    assert card.class_names == ["background", "nucleus"]
    assert card.architecture.name == "unet"
    assert card.architecture.params["n_classes"] == 2
    assert card.input.mpp == 0.5
    assert card.input.tile_size == 256
    assert len(card.input.normalization.mean) == len(card.input.normalization.std) == 3
    assert card.provenance.privacy.dp_mode == "none"
    assert card.weights_sha256 is None


def test_json_round_trip_preserves_every_field():
    card = default_card(depth=3, base_width=8)
    card.metrics["dice"] = 0.8
    card.provenance.federated_rounds = 5
    card.provenance.round = 5
    card.provenance.privacy.dp_mode = "sample"
    card.provenance.privacy.epsilon = 8.0
    card.provenance.privacy.delta = 1e-5

    text = card.to_json()
    assert list(json.loads(text))[0] == "format_version"
    assert ModelCard.from_json(text) == card
    assert ModelCard.from_dict(card.to_dict()) == card


def test_constructor_accepts_plain_dicts_and_normalises_colours():
    data = default_card().to_dict()
    data["classes"][1]["color"] = "#00FF7F"
    card = ModelCard(**{k: v for k, v in data.items()})
    assert card.classes[1] == ClassInfo("nucleus", "#00ff7f")


def _broken(edit):
    """Return the default card's dict after ``edit`` mutated it in place."""
    data = copy.deepcopy(default_card().to_dict())
    edit(data)
    return data


@pytest.mark.parametrize(
    ("edit", "expected_words"),
    [
        (
            lambda d: d["classes"].append({"name": "mitosis", "color": "#ff0000"}),
            ["architecture.params.n_classes", "expected 3", "received 2"],
        ),
        (lambda d: d["input"].pop("mpp"), ["input.mpp", "missing"]),
        (lambda d: d["input"].update(mpp=-1), ["input.mpp", "greater than 0", "-1"]),
        (
            lambda d: d["classes"][1].update(color="red"),
            ["classes[1].color", "#rrggbb", "'red'"],
        ),
        (lambda d: d["classes"][1].update(name="background"), ["classes[1].name", "'background'"]),
        (lambda d: d["classes"].pop(), ["classes", "at least 2"]),
        (lambda d: d["input"].update(tile_size="256"), ["input.tile_size", "integer", "'256'"]),
        (
            lambda d: d["input"]["normalization"]["std"].__setitem__(1, 0),
            ["input.normalization.std[1]", "greater than 0"],
        ),
        (lambda d: d["input"]["normalization"].update(mean=[0.5, 0.5]), ["normalization.mean", "3"]),
        (lambda d: d["provenance"]["privacy"].update(dp_mode="maybe"), ["dp_mode", "'maybe'"]),
        (
            lambda d: d["provenance"]["privacy"].update(epsilon=3.0),
            ["provenance.privacy.epsilon", "dp_mode is 'none'"],
        ),
        (lambda d: d["provenance"].update(round=4), ["provenance.round", "federated_rounds=0"]),
        (lambda d: d.update(metrics={"dice": float("nan")}), ["metrics.dice", "finite"]),
        (lambda d: d.update(format_version=2), ["format_version", "at most 1"]),
        (lambda d: d.update(created="yesterday"), ["created", "ISO 8601"]),
        (lambda d: d.update(weights_sha256="abc"), ["weights_sha256", "64 hexadecimal"]),
        (lambda d: d.update(clases=[]), ["unknown key", "clases"]),
        (lambda d: d.pop("architecture"), ["'architecture'", "missing"]),
        (lambda d: d["architecture"]["params"].update(in_channels=4), ["in_channels", "expected 3"]),
    ],
)
def test_invalid_card_names_field_expectation_and_value(edit, expected_words):
    with pytest.raises(ModelCardError) as caught:
        ModelCard.from_dict(_broken(edit))
    for word in expected_words:
        assert word in str(caught.value)


def test_model_card_error_is_a_value_error():
    assert issubclass(ModelCardError, ValueError)


def test_invalid_json_text_raises_model_card_error():
    with pytest.raises(ModelCardError, match="not valid JSON"):
        ModelCard.from_json("{not json")


def test_to_json_revalidates_in_place_edits():
    card = default_card()
    card.metrics["loss"] = float("inf")
    with pytest.raises(ModelCardError, match="metrics.loss"):
        card.to_json()


def test_build_model_uses_architecture_params():
    card = default_card(depth=3, base_width=8, groups=4, upsampling="transposed")
    model = build_model(card)
    assert isinstance(model, UNet)
    assert model.config == card.architecture.params


def test_build_model_rejects_unknown_architecture():
    data = default_card().to_dict()
    data["architecture"]["name"] = "resnet"
    with pytest.raises(ModelCardError, match=r"architecture.name.*\['unet'\].*'resnet'"):
        build_model(ModelCard.from_dict(data))


def test_build_model_rejects_tile_size_the_network_cannot_take():
    with pytest.raises(ModelCardError, match="input.tile_size.*multiple of 8.*100"):
        build_model(default_card(tile_size=100))


def test_build_model_rejects_params_the_factory_refuses():
    data = default_card().to_dict()
    data["architecture"]["params"]["groups"] = 5
    with pytest.raises(ModelCardError, match="architecture.params"):
        build_model(ModelCard.from_dict(data))


def test_default_card_rejects_unknown_unet_argument_and_inconsistent_classes():
    with pytest.raises(ModelCardError, match="widht"):
        default_card(widht=8)
    with pytest.raises(ModelCardError, match="n_classes"):
        default_card(n_classes=4)
    with pytest.raises(ModelCardError, match="n_classes"):
        default_card(contours=True, n_classes=2)


def test_default_card_with_contours_has_three_classes_and_builds():
    card = default_card(contours=True, depth=2, base_width=8, groups=4, tile_size=32)
    assert card.class_names == ["background", "nucleus", "contour"]
    assert card.n_classes == 3 and card.architecture.params["n_classes"] == 3
    assert default_card(n_classes=3).class_names == card.class_names
    import torch

    assert build_model(card)(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_to_dict_equals_what_the_json_file_holds():
    card = default_card()
    assert card.to_dict() == json.loads(card.to_json())


def test_privacy_budget_round_trips_and_delta_must_be_below_one():
    data = default_card().to_dict()
    data["provenance"] = {
        "training_data": "3 hospitals", "federated_rounds": 20, "round": 20,
        "privacy": {"epsilon": 4.0, "delta": 1e-5, "dp_mode": "update"}, "license_note": "CC-BY",
    }
    assert ModelCard.from_dict(data).provenance.privacy.epsilon == 4.0
    data["provenance"]["privacy"]["delta"] = 1.0
    with pytest.raises(ModelCardError, match=r"provenance.privacy.delta.*less than 1"):
        ModelCard.from_dict(data)


def test_shipped_cards_load_and_round_trip_unchanged():
    from importlib.resources import files

    shipped = sorted(Path(str(files("napari_feddp") / "data" / "models")).glob("*.json"))
    assert shipped
    for path in shipped:
        data = json.loads(path.read_text(encoding="utf-8"))
        card = ModelCard.from_json(path.read_bytes())
        assert card.to_dict() == data and list(card.to_dict()) == list(data)
        assert card.to_json() == json.dumps(data, indent=2) + "\n"


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["input"].update(tile_size=True), "input.tile_size"),
        (lambda d: d["input"].update(mpp="0.5"), "input.mpp"),
        (lambda d: d.update(metrics={"dice": True}), "metrics.dice"),
        (lambda d: d["provenance"].update(round="0"), "provenance.round"),
        (lambda d: d.update(name="   "), "name"),
        (lambda d: d.pop("format_version"), "format_version"),
    ],
)
def test_values_are_never_coerced(edit, field):
    with pytest.raises(ModelCardError, match=f"'{field}'"):
        ModelCard.from_dict(_broken(edit))


def test_default_card_records_federated_provenance():
    card = default_card(federated_rounds=4, round=2, privacy={"dp_mode": "sample", "epsilon": 3.5, "delta": 1e-5},
                        metrics={"dice": 0.7})
    assert card.provenance.round == 2 and card.provenance.privacy.epsilon == 3.5 and card.metrics == {"dice": 0.7}
    with pytest.raises(ModelCardError, match="provenance.round"):
        default_card(federated_rounds=1, round=2)
