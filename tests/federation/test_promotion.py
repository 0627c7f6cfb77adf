"""A received global model becomes a lab's default only if it passes the lab's own check."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from flwr.app import ArrayRecord

from napari_feddp.federation import client_app
from napari_feddp.federation.demo import make_synthetic_lab
from napari_feddp.federation.local import LocalRequest, build_model, model_card
from napari_feddp.federation.promotion import (
    MAX_NUCLEUS_FRACTION,
    MIN_NUCLEUS_FRACTION,
    check_promotion,
    current_default,
)
from napari_feddp.federation.settings import NodeSettings
from napari_feddp.models import CheckpointError, load_checkpoint, read_card, save_checkpoint
from napari_feddp.models.store import bundled_checkpoint, model_store, resolve_checkpoint

from .conftest import context, instruction, tiny_settings

#: Run settings whose global model has the bundled model's architecture and tile size.


def _bundled_run() -> dict:
    """Run settings whose model is the bundled model's architecture (from its card)."""
    if bundled_checkpoint() is None:
        return {}
    params = load_checkpoint(bundled_checkpoint())[1].architecture.params
    return dict(model_depth=params["depth"], model_base_width=params["base_width"], model_groups=params["groups"],
                crop_size=128)


BUNDLED_RUN = _bundled_run()

pytestmark = pytest.mark.skipif(bundled_checkpoint() is None, reason="this build bundles no default model")


def bundled_weights(settings) -> torch.nn.Module:
    """A run model carrying the bundled model's weights (a sound nuclei model)."""
    bundled, _ = load_checkpoint(bundled_checkpoint())
    model = build_model(settings)
    model.load_state_dict(bundled.state_dict())
    return model


def random_model(settings, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(settings)


def all_background(model: torch.nn.Module) -> torch.nn.Module:
    """The same network with a final-layer bias that outvotes every pixel for background."""
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([50.0, -50.0]))
    return model


@pytest.fixture
def held_back(tmp_path):
    """Held-out tiles of a lab: 3 synthetic H&E-like tiles of 64 px with nucleus masks."""
    return make_synthetic_lab(tmp_path / "held-back", n_tiles=3, size=64, seed=7)


@pytest.fixture
def lab(tmp_path, lab_dir):
    """A lab using the default model store ($FEDDP_HOME/models), i.e. what `segment` uses."""
    return NodeSettings(
        lab="lab-a",
        data_dir=str(lab_dir),
        ledger_dir=str(tmp_path / "ledger"),
        history_file=str(tmp_path / "history.jsonl"),
    )


def final_round(settings, node, model: torch.nn.Module):
    """The server's final evaluation message carrying ``model``, run by the lab's ClientApp."""
    arrays = ArrayRecord({k: v.detach().clone() for k, v in model.state_dict().items()})
    msg = instruction(arrays, {"server-round": 2, "final": True, "epsilon": 3.0}, message_type="evaluate")
    return client_app.app(msg, context(settings, node))


def history(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]


def request_for(settings, node, model) -> LocalRequest:
    return LocalRequest(model=model, settings=settings, node=node, server_round=2)


# --------------------------------------------------------------------------- final round


@pytest.mark.parametrize("with_held_back", [False, True], ids=["no-eval-dir", "eval-dir"])
def test_poisoned_1e30_model_is_refused_and_the_default_is_unchanged(
    lab, held_back, tmp_path, with_held_back
):
    settings = tiny_settings()
    node = NodeSettings(**{**lab.__dict__, "eval_dir": str(held_back) if with_held_back else ""})
    previous = save_checkpoint(model_store() / "federation-0", random_model(settings), model_card(settings))
    assert resolve_checkpoint(None) == previous

    poisoned = random_model(settings)
    with torch.no_grad():
        for tensor in poisoned.state_dict().values():
            tensor.fill_(1e30)  # finite in float32, overflows in the forward pass
    out = final_round(settings, node, poisoned)

    assert set(out.content.keys()) == {"metrics"}  # the reply stays scalars only
    assert resolve_checkpoint(None) == previous
    refused = model_store() / "refused" / "federation-1.safetensors"
    assert refused.is_file() and refused.with_suffix(".json").is_file()
    # Kept for inspection, and loading it is refused too.
    assert read_card(refused).provenance.round == 2
    assert float(safetensors.torch.load_file(refused)["head.bias"][0]) == pytest.approx(1e30)
    with pytest.raises(CheckpointError, match=r"beyond ±10000"):
        load_checkpoint(refused)
    record = [r for r in history(tmp_path) if r["event"].startswith("model-")]
    assert len(record) == 1 and record[0]["event"] == "model-refused"
    assert "non-finite" in record[0]["reason"]


def test_all_background_model_is_refused_when_the_current_model_scores_better_on_held_back_tiles(
    lab, held_back, tmp_path
):
    settings = tiny_settings()
    node = NodeSettings(**{**lab.__dict__, "eval_dir": str(held_back)})
    out = final_round(settings, node, all_background(random_model(settings)))

    assert not out.has_error()
    assert resolve_checkpoint(None) == bundled_checkpoint()
    assert not list(model_store().glob("*.safetensors"))
    assert (model_store() / "refused" / "federation-1.safetensors").is_file()
    (record,) = [r for r in history(tmp_path) if r["event"].startswith("model-")]
    assert record["event"] == "model-refused"
    assert record["candidate_dice"] == 0.0
    assert record["current_dice"] > 0.5  # the bundled model finds the synthetic nuclei
    assert "nucleus" in record["reason"]


def test_a_model_as_good_as_the_current_one_is_promoted_and_becomes_the_default(lab, held_back, tmp_path):
    settings = tiny_settings(**BUNDLED_RUN)
    node = NodeSettings(**{**lab.__dict__, "eval_dir": str(held_back)})
    out = final_round(settings, node, bundled_weights(settings))

    assert set(out.content.keys()) == {"metrics"}
    promoted = model_store() / "federation-1.safetensors"
    assert resolve_checkpoint(None) == promoted
    assert not (model_store() / "refused").exists()
    (record,) = [r for r in history(tmp_path) if r["event"].startswith("model-")]
    assert record["event"] == "model-promoted"
    assert record["candidate_dice"] == pytest.approx(record["current_dice"])
    assert record["candidate_dice"] > 0.5


def test_a_later_model_is_compared_with_the_newest_promoted_one(lab, held_back):
    settings = tiny_settings(**BUNDLED_RUN)
    node = NodeSettings(**{**lab.__dict__, "eval_dir": str(held_back)})
    sound = bundled_weights(settings)
    save_checkpoint(model_store() / "federation-0", sound, model_card(settings))
    current = current_default(model_store())
    assert current == model_store() / "federation-0.safetensors"

    worse = random_model(settings)
    decision = check_promotion(worse, current, request_for(settings, node, worse))
    assert not decision.promoted
    assert decision.candidate_score < decision.current_score - 0.02

    # The lab's margin decides how much worse is still acceptable.
    lenient = NodeSettings(**{**node.__dict__, "promotion_margin": 1.0})
    decision = check_promotion(worse, current, request_for(settings, lenient, worse))
    assert decision.promoted and "margin 1.000" in decision.reason


def test_a_check_that_cannot_run_refuses(lab, tmp_path):
    settings = tiny_settings()
    (tmp_path / "empty").mkdir()
    node = NodeSettings(**{**lab.__dict__, "eval_dir": str(tmp_path / "empty")})
    request = request_for(settings, node, random_model(settings))
    stored = client_app.keep_global_model(request, run_id=4, epsilon=None)

    assert stored == model_store() / "refused" / "federation-4.safetensors"
    assert resolve_checkpoint(None) == bundled_checkpoint()
    (record,) = history(tmp_path)
    assert record["event"] == "model-refused" and record["reason"].startswith("promotion check failed")


# --------------------------------------------------------------------------- no held-out tiles


def test_sample_check_refuses_a_constant_model(lab):
    settings = tiny_settings()
    constant = all_background(random_model(settings))
    decision = check_promotion(constant, bundled_checkpoint(), request_for(settings, lab, constant))
    assert not decision.promoted
    assert "constant output" in decision.reason and decision.nucleus_fraction == 0.0
    assert decision.candidate_score is None and decision.current_score is None


def test_sample_check_accepts_a_sound_nuclei_model(lab):
    settings = tiny_settings(**BUNDLED_RUN)
    sound = bundled_weights(settings)
    decision = check_promotion(sound, bundled_checkpoint(), request_for(settings, lab, sound))
    assert decision.promoted, decision.reason
    assert MIN_NUCLEUS_FRACTION * 10 < decision.nucleus_fraction < MAX_NUCLEUS_FRACTION


def test_sample_check_refuses_a_model_that_calls_most_tissue_nucleus(lab):
    settings = tiny_settings(**BUNDLED_RUN)
    inverted = bundled_weights(settings)
    with torch.no_grad():
        inverted.head.weight.neg_()
        inverted.head.bias.neg_()
    decision = check_promotion(inverted, bundled_checkpoint(), request_for(settings, lab, inverted))
    assert not decision.promoted
    assert decision.nucleus_fraction > MAX_NUCLEUS_FRACTION and "outside" in decision.reason
