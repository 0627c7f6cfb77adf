"""Experiment runs are what their budget says: a fresh work folder, and every planned round trained."""

from __future__ import annotations


def test_an_interrupted_runs_ledger_and_checkpoints_do_not_carry_over(tmp_path):
    from experiments.runner import fresh_workdir

    work = fresh_workdir(tmp_path, "feddp-dist-eps8", 0)
    assert work == tmp_path / "runs" / "feddp-dist-eps8-s0" and work.is_dir()
    # An interrupted run leaves its labs' privacy ledgers (49 rounds spent) and a checkpoint.
    ledger = work / "ledgers" / "h1-breast" / "0123456789abcdef.jsonl"
    ledger.parent.mkdir(parents=True)
    ledger.write_text('{"kind": "genesis"}\n' + '{"kind": "round"}\n' * 49)
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "final.safetensors").write_bytes(b"stale")
    other = fresh_workdir(tmp_path, "fedavg", 0)
    (other / "kept.txt").write_text("another setting's run")

    again = fresh_workdir(tmp_path, "feddp-dist-eps8", 0)
    assert again == work and list(again.iterdir()) == []
    assert (other / "kept.txt").is_file()  # only this setting and seed is reset


def test_a_run_that_trained_fewer_rounds_than_its_budget_is_refused():
    import pytest

    from experiments.runner import _all_rounds_aggregated

    full = [{"round": r, "aggregated": True} for r in range(1, 101)]
    _all_rounds_aggregated("feddp", full, 100)
    # From round 53 on every lab declined (its ledger had no budget left): the global model froze.
    short = full[:52] + [{"round": r, "aggregated": False, "declined": {"101": "budget"}, "failed": {},
                          "note": "secure aggregation finished with 0 lab(s), 5 needed"} for r in range(53, 101)]
    with pytest.raises(RuntimeError, match=r"52 of 100 rounds aggregated; round 53 was not.*budget"):
        _all_rounds_aggregated("feddp", short, 100)
