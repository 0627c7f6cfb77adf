"""Privacy ledger: persistence across instances, budget, tamper and deletion detection."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
from opacus.accountants import RDPAccountant

from napari_feddp.training import BudgetExceededError, LedgerError, PrivacyLedger, dataset_fingerprint

from .conftest import write_dataset

ROUND = {"noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 8}


@pytest.fixture
def setup(tmp_path):
    dataset_dir = write_dataset(tmp_path / "lab-data", n=2, size=(8, 8))
    ledger_dir = tmp_path / "ledgers"

    def open_ledger(**kwargs):
        return PrivacyLedger(ledger_dir, "lab-a", dataset_fingerprint(dataset_dir), dataset_dir=dataset_dir, **kwargs)

    return dataset_dir, ledger_dir, open_ledger


def _opacus_epsilon(rounds, delta=1e-5):
    accountant = RDPAccountant()
    for _ in range(rounds * ROUND["steps"]):
        accountant.step(noise_multiplier=ROUND["noise_multiplier"], sample_rate=ROUND["sample_rate"])
    return accountant.get_epsilon(delta)


def test_new_ledger_is_empty_and_writes_nothing(setup):
    dataset_dir, ledger_dir, open_ledger = setup
    ledger = open_ledger()
    assert ledger.epsilon == 0.0 and not ledger.has_trained and ledger.delta == 1e-5
    assert not ledger_dir.exists() and not (dataset_dir / ".feddp").exists()


def test_rounds_persist_and_continue_across_instances(setup):
    dataset_dir, _, open_ledger = setup
    first = open_ledger()
    record = first.record_round(**ROUND, round_id=1, n_examples=2)
    assert record.epsilon == pytest.approx(_opacus_epsilon(1))
    assert first.path.exists() and first.marker_path.exists()
    marker = json.loads(first.marker_path.read_text())
    assert marker["rounds"] == 1 and marker["head"] == record.hash

    second = open_ledger()  # e.g. after a restart
    assert second.n_rounds == 1 and second.epsilon == pytest.approx(record.epsilon)
    assert second.history == [(1.1, 0.25, 8)]
    assert second.state_dict() == {"history": [(1.1, 0.25, 8)], "mechanism": "rdp"}
    record2 = second.record_round(**ROUND, round_id=2)
    assert record2.epsilon > record.epsilon
    assert record2.epsilon == pytest.approx(_opacus_epsilon(2))
    assert record2.epsilon_round == pytest.approx(record.epsilon)

    third = open_ledger()
    assert [r.round_id for r in third.rounds] == [1, 2]
    assert third.accountant().get_epsilon(1e-5) == pytest.approx(record2.epsilon)


def test_would_exceed_predicts_before_training(setup):
    _, _, open_ledger = setup
    ledger = open_ledger()
    ledger.record_round(**ROUND)
    spent = ledger.epsilon
    next_eps = ledger.epsilon_after(**ROUND)
    assert next_eps == pytest.approx(_opacus_epsilon(2))
    assert ledger.would_exceed(**ROUND, epsilon_max=next_eps - 0.01)
    assert not ledger.would_exceed(**ROUND, epsilon_max=next_eps + 0.01)
    assert not ledger.would_exceed(**ROUND, epsilon_max=None)
    with pytest.raises(BudgetExceededError, match="lab 'lab-a' declines to train") as info:
        ledger.check_budget(**ROUND, epsilon_max=spent + 0.1)
    assert info.value.epsilon_spent == pytest.approx(spent) and info.value.epsilon_next == pytest.approx(next_eps)
    assert ledger.n_rounds == 1  # checking spends nothing


def test_missing_ledger_is_an_error_not_zero(setup):
    _, ledger_dir, open_ledger = setup
    open_ledger().record_round(**ROUND)
    shutil.rmtree(ledger_dir)
    with pytest.raises(LedgerError, match="is missing, but dataset .* has trained 1 round"):
        open_ledger()


def test_edited_ledger_is_detected(setup):
    _, _, open_ledger = setup
    ledger = open_ledger()
    ledger.record_round(**ROUND)
    text = ledger.path.read_text()
    ledger.path.write_text(text.replace('"noise_multiplier":1.1', '"noise_multiplier":5.0'))
    with pytest.raises(LedgerError, match="line 2: hash mismatch"):
        open_ledger()


def test_truncated_or_restored_ledger_is_detected(setup):
    _, _, open_ledger = setup
    ledger = open_ledger()
    ledger.record_round(**ROUND)
    old_copy = ledger.path.read_bytes()
    ledger.record_round(**ROUND)
    ledger.path.write_bytes(old_copy)  # a valid chain, but one round short
    with pytest.raises(LedgerError, match="marker records 2 round.*ledger has 1 round"):
        open_ledger()


def test_edited_marker_is_detected(setup):
    _, _, open_ledger = setup
    ledger = open_ledger()
    ledger.record_round(**ROUND)
    marker = json.loads(ledger.marker_path.read_text())
    marker["head"] = "0" * 64
    ledger.marker_path.write_text(json.dumps(marker))
    with pytest.raises(LedgerError, match="does not match marker"):
        open_ledger()
    ledger.marker_path.write_text("{not json")
    with pytest.raises(LedgerError, match="unreadable or was edited"):
        open_ledger()


def test_lost_marker_relinks_to_the_ledger(setup):
    _, _, open_ledger = setup
    ledger = open_ledger()
    ledger.record_round(**ROUND)
    ledger.marker_path.unlink()
    with pytest.warns(UserWarning, match="marker .* is missing; continuing that ledger"):
        again = open_ledger()
    assert again.n_rounds == 1 and again.marker_path.exists()


def test_added_tiles_keep_the_same_ledger(setup):
    dataset_dir, ledger_dir, open_ledger = setup
    ledger = open_ledger()
    ledger.record_round(**ROUND)
    write_dataset(dataset_dir, n=3, size=(8, 8))  # a newly annotated tile
    grown = open_ledger()
    assert grown.ledger_id == ledger.ledger_id and grown.fingerprint_changed
    assert grown.epsilon == pytest.approx(ledger.epsilon)


def test_without_dataset_dir_found_by_fingerprint(tmp_path):
    first = PrivacyLedger(tmp_path, "lab-b", "f" * 64)
    first.record_round(**ROUND)
    assert PrivacyLedger(tmp_path, "lab-b", "f" * 64).n_rounds == 1
    assert PrivacyLedger(tmp_path, "lab-b", "e" * 64).n_rounds == 0


def test_delta_and_accountant_are_fixed(setup):
    _, _, open_ledger = setup
    open_ledger(delta=1e-6).record_round(**ROUND)
    assert open_ledger().delta == 1e-6
    with pytest.raises(LedgerError, match="delta=1e-06; received delta=0.0001"):
        open_ledger(delta=1e-4)
    with pytest.raises(LedgerError, match="uses the 'rdp' accountant"):
        open_ledger(accountant="prv")


def test_concurrent_writer_is_detected(setup):
    _, _, open_ledger = setup
    open_ledger().record_round(**ROUND)
    a, b = open_ledger(), open_ledger()
    a.record_round(**ROUND)
    with pytest.raises(LedgerError, match="changed on disk"):
        b.record_round(**ROUND)


def test_two_new_ledgers_for_one_dataset_cannot_both_start(setup):
    _, _, open_ledger = setup
    a, b = open_ledger(), open_ledger()  # both opened before any round exists
    a.record_round(**ROUND)
    with pytest.raises(LedgerError, match="another process recorded the first round"):
        b.record_round(**ROUND)
    assert open_ledger().n_rounds == 1


def test_interrupted_marker_update_is_recovered_conservatively(setup):
    _, _, open_ledger = setup
    ledger = open_ledger()
    ledger.record_round(**ROUND)
    stale_marker = ledger.marker_path.read_bytes()
    ledger.record_round(**ROUND)
    ledger.marker_path.write_bytes(stale_marker)  # crash between ledger and marker writes
    with pytest.warns(UserWarning, match="interrupted write"):
        recovered = open_ledger()
    assert recovered.n_rounds == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_ledger().n_rounds == 2  # marker repaired


def test_prv_accountant(tmp_path):
    ledger = PrivacyLedger(tmp_path, "lab-c", "a" * 64, accountant="prv")
    record = ledger.record_round(**ROUND)
    assert 0 < record.epsilon < _opacus_epsilon(1)  # PRV is tighter than RDP


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="lab_id"):
        PrivacyLedger(tmp_path, "../x", "a")
    ledger = PrivacyLedger(tmp_path, "lab", "a")
    with pytest.raises(ValueError, match="sample_rate"):
        ledger.would_exceed(1.0, 1.5, 3, 1.0)
    with pytest.raises(ValueError, match="expected 5 steps"):
        ledger.record_round(noise_multiplier=1.0, sample_rate=0.5, steps=5, history=[(1.0, 0.5, 4)])
