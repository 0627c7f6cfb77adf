"""Checkpoints: round trip, path forms, and a clear CheckpointError for every failure."""

import hashlib
import json
import pickle

import pytest
import safetensors.torch
import torch

from napari_feddp.models import (
    CheckpointError,
    build_model,
    checkpoint_paths,
    default_card,
    load_checkpoint,
    read_card,
    save_checkpoint,
)


@pytest.fixture
def saved(tmp_path, tiny_model, tiny_card):
    """A checkpoint of ``tiny_model`` at ``tmp_path/tiny``; returns (weights, card) paths."""
    save_checkpoint(tmp_path / "tiny", tiny_model, tiny_card)
    return checkpoint_paths(tmp_path / "tiny")


def _rehash(weights_path, card_path=None):
    """Make the card's hash match the weights file: a hostile partner sends a consistent pair."""
    card_path = card_path or weights_path.with_suffix(".json")
    data = json.loads(card_path.read_text())
    data["weights_sha256"] = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    card_path.write_text(json.dumps(data))


def _assert_checkpoint_error(path, *expected_words):
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    for word in expected_words:
        assert word in str(caught.value), f"{word!r} not in: {caught.value}"
    return caught.value


# --- round trip --------------------------------------------------------------


def test_round_trip_gives_identical_outputs(saved, tiny_model):
    weights_path, _ = saved
    loaded, card = load_checkpoint(weights_path)
    assert not loaded.training
    images = torch.rand(2, 3, 32, 32)
    tiny_model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), tiny_model(images))
    assert card.name == "tiny-test-unet"


def test_saved_card_records_hash_and_tensor_shapes(saved, tiny_model, tiny_card):
    weights_path, card_path = saved
    card = read_card(card_path)
    assert card.weights_sha256 == hashlib.sha256(weights_path.read_bytes()).hexdigest()
    assert card.tensors == {name: list(t.shape) for name, t in tiny_model.state_dict().items()}
    assert tiny_card.weights_sha256 is None, "save_checkpoint must not modify the caller's card"


@pytest.mark.parametrize("given", ["model", "model.json", "model.safetensors"])
def test_any_suffix_names_the_same_checkpoint(tmp_path, tiny_model, tiny_card, given):
    returned = save_checkpoint(tmp_path / given, tiny_model, tiny_card)
    assert returned == tmp_path / "model.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    for form in ("model", "model.json", "model.safetensors"):
        load_checkpoint(tmp_path / form)


def test_other_suffixes_stay_part_of_the_stem(tmp_path):
    weights_path, card_path = checkpoint_paths(tmp_path / "nuclei.v2")
    assert (weights_path.name, card_path.name) == ("nuclei.v2.safetensors", "nuclei.v2.json")


def test_overwriting_leaves_no_temporary_files(tmp_path, tiny_model, tiny_card):
    save_checkpoint(tmp_path / "sub" / "model", tiny_model, tiny_card)
    with torch.no_grad():
        next(tiny_model.parameters()).add_(1.0)
    save_checkpoint(tmp_path / "sub" / "model", tiny_model, tiny_card)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["model.json", "model.safetensors"]
    loaded, _ = load_checkpoint(tmp_path / "sub" / "model")
    assert torch.equal(next(loaded.parameters()), next(tiny_model.parameters()))


def test_saving_an_opacus_wrapped_model_stores_plain_names(tmp_path, tiny_model, tiny_card):
    from opacus import GradSampleModule

    save_checkpoint(tmp_path / "dp", GradSampleModule(tiny_model), tiny_card)
    assert not any(name.startswith("_module") for name in read_card(tmp_path / "dp").tensors)
    load_checkpoint(tmp_path / "dp")


def test_saving_a_model_that_does_not_match_the_card_fails(tmp_path, tiny_card):
    wider = build_model(default_card(tile_size=32, depth=2, base_width=16, groups=4))
    with pytest.raises(CheckpointError, match="does not match the card's architecture.*shape mismatch"):
        save_checkpoint(tmp_path / "bad", wider, tiny_card)
    assert not list(tmp_path.iterdir())


# --- every failure is a CheckpointError naming file and problem ---------------


def test_missing_card_file(saved):
    weights_path, card_path = saved
    card_path.unlink()
    _assert_checkpoint_error(weights_path, str(card_path), "model card file is missing")


def test_missing_weights_file(saved):
    weights_path, card_path = saved
    weights_path.unlink()
    _assert_checkpoint_error(card_path, str(weights_path), "weights file is missing")


def test_truncated_weights_file(saved):
    weights_path, _ = saved
    data = weights_path.read_bytes()
    weights_path.write_bytes(data[: len(data) // 2])
    _assert_checkpoint_error(weights_path, str(weights_path), "card does not match weights")  # hash first
    _rehash(weights_path)
    _assert_checkpoint_error(weights_path, str(weights_path), "truncated or corrupt")


def test_flipped_byte_is_a_hash_mismatch(saved):
    weights_path, _ = saved
    data = bytearray(weights_path.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor's data, so the file still parses
    weights_path.write_bytes(bytes(data))
    _assert_checkpoint_error(weights_path, str(weights_path), "card does not match weights")


def test_renamed_tensor_is_reported_as_missing_and_unexpected(saved):
    weights_path, _ = saved
    state = safetensors.torch.load_file(weights_path)
    state["head.weights_typo"] = state.pop("head.weight")
    safetensors.torch.save_file(state, weights_path)
    _rehash(weights_path)
    _assert_checkpoint_error(
        weights_path, str(weights_path), "missing 1 tensor(s) ['head.weight']",
        "unexpected 1 tensor(s) ['head.weights_typo']",
    )


def test_wrong_tensor_shape_names_tensor_and_both_shapes(saved):
    weights_path, _ = saved
    state = safetensors.torch.load_file(weights_path)
    state["head.weight"] = torch.zeros(3, 8, 1, 1)
    safetensors.torch.save_file(state, weights_path)
    _rehash(weights_path)
    _assert_checkpoint_error(
        weights_path, "shape mismatch for 'head.weight'", "expected [2, 8, 1, 1]", "found [3, 8, 1, 1]"
    )


def _edit_card(card_path, edit):
    data = json.loads(card_path.read_text())
    edit(data)
    card_path.write_text(json.dumps(data))


def test_card_with_more_classes_than_the_architecture(saved):
    weights_path, card_path = saved
    _edit_card(card_path, lambda d: d["classes"].append({"name": "mitosis", "color": "#ff0000"}))
    _assert_checkpoint_error(weights_path, str(card_path), "invalid model card", "n_classes", "expected 3")


def test_card_that_is_not_json(saved):
    weights_path, card_path = saved
    card_path.write_text("{ this is not json")
    _assert_checkpoint_error(weights_path, str(card_path), "not valid JSON")


def test_card_without_hash_cannot_be_verified(saved):
    weights_path, card_path = saved
    _edit_card(card_path, lambda d: d.update(weights_sha256=None))
    _assert_checkpoint_error(weights_path, str(card_path), "no weights_sha256")


def test_card_naming_an_unknown_architecture(saved):
    weights_path, card_path = saved
    _edit_card(card_path, lambda d: d["architecture"].update(name="vit"))
    _assert_checkpoint_error(weights_path, str(card_path), "cannot build the model", "'vit'")


def test_read_card_of_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="model card file is missing"):
        read_card(tmp_path / "nothing")


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


# --- no pickle, ever -----------------------------------------------------------


def test_loading_never_unpickles(saved, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("checkpoint loading must not use torch.load or pickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    model, _ = load_checkpoint(saved[0])
    assert model is not None


class _CreatesFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_disguised_as_safetensors_is_rejected_without_running(saved, tmp_path):
    weights_path, _ = saved
    marker = tmp_path / "code-was-executed"
    torch.save({"payload": _CreatesFileWhenUnpickled(marker)}, weights_path)
    _rehash(weights_path)
    _assert_checkpoint_error(weights_path, "truncated or corrupt")
    assert not marker.exists()

    # The same bytes do run code when unpickled, so the check above means something.
    disguised_pickle = tmp_path / "payload.pt"
    disguised_pickle.write_bytes(weights_path.read_bytes())
    torch.load(disguised_pickle, weights_only=False)
    assert marker.exists()


# --- hostile checkpoints: refused before anything is built, with the file named ---------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64, torch.bool])
def test_weights_of_another_dtype_are_refused(saved, dtype):
    weights_path, _ = saved
    state = safetensors.torch.load_file(weights_path)
    state["head.weight"] = state["head.weight"].to(dtype)
    safetensors.torch.save_file(state, weights_path)
    _rehash(weights_path)
    _assert_checkpoint_error(weights_path, str(weights_path), "another dtype", "'head.weight'", "torch.float32")


@pytest.mark.parametrize(("value", "words"), [(float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"),
                                              (3e38, "beyond ±10000")])
def test_non_finite_or_absurd_weights_are_refused(saved, value, words):
    weights_path, _ = saved
    state = safetensors.torch.load_file(weights_path)
    state["head.bias"][0] = value  # 3e38 is finite, but overflows every activation after it
    safetensors.torch.save_file(state, weights_path)
    _rehash(weights_path)
    _assert_checkpoint_error(weights_path, str(weights_path), words, "'head.bias'")


def test_a_huge_architecture_is_refused_before_any_memory_is_allocated(saved):
    import time

    import psutil

    weights_path, card_path = saved
    _edit_card(card_path, lambda d: d["architecture"]["params"].update(base_width=4096, depth=6))
    rss = psutil.Process().memory_info().rss
    started = time.perf_counter()
    error = _assert_checkpoint_error(weights_path, str(card_path), "parameters, more than the 50,000,000")
    assert time.perf_counter() - started < 2.0
    assert psutil.Process().memory_info().rss - rss < 200e6  # the network would need tens of GB
    assert "base_width" in str(error)


def test_deeply_nested_card_json_is_a_checkpoint_error(saved):
    weights_path, card_path = saved
    card_path.write_text("[" * 100_000 + "]" * 100_000)
    _assert_checkpoint_error(weights_path, str(card_path), "nested too deeply")


def test_an_oversized_card_is_refused_unread(saved):
    weights_path, card_path = saved
    card_path.write_bytes(b" " * (2 << 20))
    _assert_checkpoint_error(weights_path, str(card_path), "is not a model card")
