"""Privacy ledger: persistence, budget, tamper detection, and tile identity that survives renames and resets."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
from opacus.accountants import RDPAccountant

from napari_feddp.training import (
    BudgetExceededError,
    LedgerError,
    PrivacyLedger,
    dataset_fingerprint,
    privacy_report,
    reset_ledger,
)
from napari_feddp.training.ledger import tile_hashes

from .conftest import write_dataset

ROUND = {"noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 8}


@pytest.fixture
def setup(tmp_path):
    dataset_dir = write_dataset(tmp_path / "lab-data", n=2, size=(8, 8))
    ledger_dir = tmp_path / "ledgers"

    def open_ledger(**kwargs):
        return PrivacyLedger(ledger_dir, "lab-a", dataset_fingerprint(dataset_dir), dataset_dir=dataset_dir, **kwargs)

    return dataset_dir, ledger_dir, open_ledger


def _opacus_epsilon(rounds, delta=1e-5, *others):
    """Opacus RDP epsilon of ``rounds`` ROUNDs followed by ``others`` ((sigma, q, steps), ...)."""
    accountant = RDPAccountant()
    for _ in range(rounds * ROUND["steps"]):
        accountant.step(noise_multiplier=ROUND["noise_multiplier"], sample_rate=ROUND["sample_rate"])
    for sigma, rate, steps in others:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return accountant.get_epsilon(delta)


def _open(ledger_dir, dataset_dir, lab="lab-a", **kwargs):
    return PrivacyLedger(ledger_dir, lab, dataset_fingerprint(dataset_dir), dataset_dir=dataset_dir, **kwargs)


def _copy_tiles(source, target, names, *, prefix="copy-"):
    """Copy tiles (image and mask bytes) into ``target`` under new file names."""
    for sub in ("images", "masks"):
        (target / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(source / sub / f"{name}.png", target / sub / f"{prefix}{name}.png")
    return target


def test_new_ledger_is_empty_and_writes_nothing(setup):
    dataset_dir, ledger_dir, open_ledger = setup
    ledger = open_ledger()
    assert ledger.epsilon == 0.0 and ledger.n_rounds == 0 and ledger.delta == 1e-5
    assert not ledger_dir.exists() and not (dataset_dir / ".feddp").exists()


def test_rounds_persist_and_continue_across_instances(setup):
    dataset_dir, ledger_dir, open_ledger = setup
    first = open_ledger()
    record = first.record_round(**ROUND, round_id=1, n_examples=2)
    assert record.epsilon == pytest.approx(_opacus_epsilon(1))
    assert first.path.exists() and first.marker_path.exists()
    marker = json.loads(first.marker_path.read_text())
    assert marker["rounds"] == 1 and marker["head"] == record.hash

    second = open_ledger()  # e.g. after a restart
    assert second.n_rounds == 1 and second.epsilon == pytest.approx(record.epsilon)
    assert [r.history for r in privacy_report(ledger_dir, dataset_dir).rounds] == [[(1.1, 0.25, 8)]]
    record2 = second.record_round(**ROUND, round_id=2)
    assert record2.epsilon > record.epsilon
    assert record2.epsilon == pytest.approx(_opacus_epsilon(2))
    assert record2.epsilon_round == pytest.approx(record.epsilon)

    assert open_ledger().epsilon == pytest.approx(record2.epsilon)
    assert [r.round_id for r in privacy_report(ledger_dir, dataset_dir).rounds] == [1, 2]


def test_budget_is_checked_before_training(setup):
    _, _, open_ledger = setup
    ledger = open_ledger()
    ledger.record_round(**ROUND)
    spent = ledger.epsilon
    next_eps = ledger.epsilon_after(**ROUND)
    assert next_eps == pytest.approx(_opacus_epsilon(2))
    assert ledger.check_budget(**ROUND, epsilon_max=next_eps + 0.01) == next_eps
    assert ledger.check_budget(**ROUND, epsilon_max=None) == next_eps
    with pytest.raises(BudgetExceededError):
        ledger.check_budget(**ROUND, epsilon_max=next_eps - 0.01)
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
    with pytest.warns(UserWarning, match="has no marker .*; continuing that ledger"):
        again = open_ledger()
    assert again.n_rounds == 1 and again.marker_path.exists()


def test_added_tiles_keep_the_same_ledger(setup):
    dataset_dir, ledger_dir, open_ledger = setup
    ledger = open_ledger()
    ledger.record_round(**ROUND)
    write_dataset(dataset_dir, n=3, size=(8, 8))  # a newly annotated tile
    grown = open_ledger()
    assert grown.path == ledger.path
    assert grown.epsilon == pytest.approx(ledger.epsilon)


def test_without_dataset_dir_found_by_fingerprint(tmp_path):
    first = PrivacyLedger(tmp_path, "lab-b", "f" * 64)
    first.record_round(**ROUND)
    assert PrivacyLedger(tmp_path, "lab-b", "f" * 64).n_rounds == 1
    assert PrivacyLedger(tmp_path, "lab-other", "f" * 64).n_rounds == 1  # the lab label does not matter
    assert PrivacyLedger(tmp_path, "lab-b", "e" * 64).n_rounds == 0


def test_rounds_without_tile_hashes_count_for_every_tile_of_that_fingerprint(setup):
    dataset_dir, ledger_dir, open_ledger = setup
    PrivacyLedger(ledger_dir, "lab-a", dataset_fingerprint(dataset_dir)).record_round(**ROUND)
    with pytest.warns(UserWarning, match="holds tiles that trained before"):
        assert open_ledger().epsilon == pytest.approx(_opacus_epsilon(1))


def test_a_backup_copy_in_the_ledger_dir_is_not_counted_twice(setup):
    _, ledger_dir, open_ledger = setup
    ledger = open_ledger()
    ledger.record_round(**ROUND)
    (ledger_dir / "backup").mkdir()
    shutil.copyfile(ledger.path, ledger_dir / "backup" / ledger.path.name)
    assert open_ledger().n_rounds == 1 and open_ledger().epsilon == pytest.approx(_opacus_epsilon(1))


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
        ledger.epsilon_after(1.0, 1.5, 3)
    with pytest.raises(ValueError, match="expected 5 steps"):
        ledger.record_round(noise_multiplier=1.0, sample_rate=0.5, steps=5, history=[(1.0, 0.5, 4)])


# --------------------------------------------------------------------------- identity is the tiles' content


def test_renaming_the_lab_keeps_the_epsilon(setup):
    dataset_dir, ledger_dir, open_ledger = setup
    first = open_ledger().record_round(**ROUND, round_id=1)
    renamed = _open(ledger_dir, dataset_dir, lab="lab-b")  # also what re-keying does: new key file, new name
    assert renamed.n_rounds == 1 and renamed.epsilon == pytest.approx(first.epsilon)
    assert renamed.epsilon == pytest.approx(_opacus_epsilon(1))
    second = renamed.record_round(**ROUND, round_id=2)
    assert second.epsilon == pytest.approx(_opacus_epsilon(2))
    again = open_ledger()
    assert [(r.lab_id, r.round_id) for r in privacy_report(ledger_dir, dataset_dir).rounds] == [
        ("lab-a", 1), ("lab-b", 2)]
    assert again.epsilon == pytest.approx(_opacus_epsilon(2))


def test_deleting_the_marker_and_adding_a_tile_keeps_the_epsilon(setup):
    dataset_dir, ledger_dir, open_ledger = setup
    spent = open_ledger().record_round(**ROUND).epsilon
    shutil.rmtree(dataset_dir / ".feddp")
    write_dataset(dataset_dir, n=3, size=(8, 8))  # same seed: tile00 and tile01 unchanged, tile02 new
    with pytest.warns(UserWarning, match="has no marker .*; continuing that ledger"):
        grown = open_ledger()
    assert len(privacy_report(ledger_dir, dataset_dir).tiles) == 3
    assert grown.epsilon == pytest.approx(spent) == pytest.approx(_opacus_epsilon(1))
    assert grown.epsilon_after(**ROUND) == pytest.approx(_opacus_epsilon(2))


def test_rename_delete_marker_and_add_tile_together_keep_the_epsilon(setup):
    dataset_dir, ledger_dir, open_ledger = setup
    ledger = open_ledger()
    ledger.record_round(**ROUND)
    ledger.record_round(**ROUND)
    shutil.rmtree(dataset_dir / ".feddp")
    write_dataset(dataset_dir, n=3, size=(8, 8))
    with pytest.warns(UserWarning, match="has no marker"):
        renamed = _open(ledger_dir, dataset_dir, lab="lab-renamed")
    assert renamed.n_rounds == 2 and renamed.epsilon == pytest.approx(_opacus_epsilon(2))
    renamed.record_round(**ROUND)
    assert _open(ledger_dir, dataset_dir, lab="lab-a").epsilon == pytest.approx(_opacus_epsilon(3))


def test_new_tiles_start_at_zero_but_old_tiles_keep_their_epsilon(setup, tmp_path):
    dataset_dir, ledger_dir, open_ledger = setup
    spent = open_ledger().record_round(**ROUND).epsilon

    fresh_dir = write_dataset(tmp_path / "fresh", n=2, size=(8, 8), seed=7)
    fresh = _open(ledger_dir, fresh_dir, lab="lab-z")
    assert fresh.epsilon == 0.0 and fresh.n_rounds == 0

    # Old tiles under new file names, in a new folder, next to a new tile.
    mixed_dir = _copy_tiles(dataset_dir, write_dataset(tmp_path / "mixed", n=1, size=(8, 8), seed=7), ["tile00"])
    with pytest.warns(UserWarning, match="holds tiles that trained before"):
        mixed = _open(ledger_dir, mixed_dir, lab="lab-z")
    assert len(tile_hashes(mixed_dir)) == 2 and mixed.epsilon >= spent
    assert mixed.epsilon == pytest.approx(_opacus_epsilon(1))

    # Per tile: tile00 composes both rounds, the others only the round they were in.
    other = {"noise_multiplier": 1.3, "sample_rate": 0.5, "steps": 6}
    mixed.record_round(**other)
    both = _opacus_epsilon(1, 1e-5, (1.3, 0.5, 6))
    assert both > _opacus_epsilon(1)
    assert _open(ledger_dir, mixed_dir, lab="lab-z").epsilon == pytest.approx(both)
    with pytest.warns(UserWarning, match="rounds recorded from another folder holding some of these tiles"):
        assert open_ledger().epsilon == pytest.approx(both)  # tile00 is in the original dataset too
    report = privacy_report(ledger_dir, dataset_dir)
    assert {t.name: t.n_rounds for t in report.tiles} == {"tile00": 2, "tile01": 1}
    assert report.tiles[1].epsilon == pytest.approx(_opacus_epsilon(1)) and report.epsilon == pytest.approx(both)


def test_repainting_a_mask_does_not_make_the_image_fresh(setup, tmp_path):
    dataset_dir, ledger_dir, open_ledger = setup
    spent = open_ledger().record_round(**ROUND).epsilon
    repainted = _copy_tiles(dataset_dir, tmp_path / "repainted", ["tile00"], prefix="")
    mask = repainted / "masks" / "tile00.png"
    write_dataset(tmp_path / "other-mask", n=1, size=(8, 8), seed=3)
    shutil.copyfile(tmp_path / "other-mask" / "masks" / "tile00.png", mask)
    with pytest.warns(UserWarning, match="holds tiles that trained before"):
        ledger = _open(ledger_dir, repainted)
    assert tile_hashes(repainted)["tile00"][0] != tile_hashes(dataset_dir)["tile00"][0]
    assert ledger.epsilon == pytest.approx(spent)


def test_budget_declines_after_a_rename(setup):
    dataset_dir, ledger_dir, open_ledger = setup
    open_ledger().record_round(**ROUND)
    renamed = _open(ledger_dir, dataset_dir, lab="lab-b")
    budget = _opacus_epsilon(1) + 0.1  # the next round needs more than this
    assert _opacus_epsilon(2) > budget
    with pytest.raises(BudgetExceededError, match="lab 'lab-b' declines to train") as info:
        renamed.check_budget(**ROUND, epsilon_max=budget)
    assert info.value.epsilon_spent == pytest.approx(_opacus_epsilon(1))
    assert info.value.epsilon_next == pytest.approx(_opacus_epsilon(2))


def test_a_renamed_lab_cannot_bypass_a_deleted_ledger(setup):
    dataset_dir, ledger_dir, open_ledger = setup
    ledger = open_ledger()
    ledger.record_round(**ROUND)
    ledger.path.unlink()
    with pytest.raises(LedgerError, match="is missing, but dataset .* has trained 1 round"):
        _open(ledger_dir, dataset_dir, lab="lab-b")


# --------------------------------------------------------------------------- deliberate resets


def test_reset_needs_a_reason_and_is_logged(setup):
    dataset_dir, ledger_dir, open_ledger = setup
    ledger = open_ledger()
    first = ledger.record_round(**ROUND, round_id=1)
    for reason in ("", "   "):
        with pytest.raises(ValueError, match="reason: expected a non-empty explanation"):
            reset_ledger(ledger_dir, dataset_dir, reason=reason)
    assert open_ledger().epsilon == pytest.approx(first.epsilon)  # a refused reset changes nothing

    reset = reset_ledger(ledger_dir, dataset_dir, reason="new cohort approved by the ethics board", operator="dr-x")
    assert reset.tiles == tuple(sorted(tile for tile, _ in tile_hashes(dataset_dir).values()))
    assert reset.rounds == (first.hash,)
    assert reset.epsilon == pytest.approx(_opacus_epsilon(1)) and reset.operator == "dr-x"
    (line,) = (ledger_dir / "resets.jsonl").read_text().splitlines()
    logged = json.loads(line)
    assert logged["kind"] == "reset" and logged["reason"] == "new cohort approved by the ethics board"
    assert logged["timestamp"] and logged["hash"] == reset.hash

    after = _open(ledger_dir, dataset_dir, lab="lab-b")
    assert after.epsilon == 0.0 and after.n_rounds == 0
    record = after.record_round(**ROUND, round_id=2)
    assert record.epsilon == pytest.approx(_opacus_epsilon(1))
    assert len(after.path.read_text().splitlines()) == 3  # genesis + both rounds: nothing was deleted
    assert privacy_report(ledger_dir, dataset_dir).resets == [reset]
    with pytest.raises(ValueError, match="nothing to reset"):
        reset_ledger(ledger_dir, write_dataset(dataset_dir.parent / "never", n=1, size=(8, 8), seed=9),
                     reason="x")


def test_reset_releases_only_the_tiles_present(setup, tmp_path):
    dataset_dir, ledger_dir, open_ledger = setup
    spent = open_ledger().record_round(**ROUND).epsilon
    subset = _copy_tiles(dataset_dir, tmp_path / "subset", ["tile00"])
    reset_ledger(ledger_dir, subset, reason="tile00 re-scanned")
    assert _open(ledger_dir, subset).epsilon == 0.0
    assert open_ledger().epsilon == pytest.approx(spent)  # tile01 was not released
    report = privacy_report(ledger_dir, dataset_dir)
    assert {t.name: t.n_rounds for t in report.tiles} == {"tile00": 0, "tile01": 1}


def test_edited_reset_log_is_detected(setup):
    dataset_dir, ledger_dir, open_ledger = setup
    open_ledger().record_round(**ROUND)
    reset_ledger(ledger_dir, dataset_dir, reason="audit")
    log = ledger_dir / "resets.jsonl"
    log.write_text(log.read_text().replace('"reason":"audit"', '"reason":"other"'))
    with pytest.raises(LedgerError, match="reset log .* line 1: hash mismatch"):
        open_ledger()


def test_a_reset_after_opening_is_detected_before_recording(setup):
    dataset_dir, ledger_dir, open_ledger = setup
    open_ledger().record_round(**ROUND)
    ledger = open_ledger()
    reset_ledger(ledger_dir, dataset_dir, reason="audit")
    with pytest.raises(LedgerError, match="changed on disk"):
        ledger.record_round(**ROUND)
