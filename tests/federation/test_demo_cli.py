"""``napari-feddp federation ...`` commands; the demo runs a real federation on loopback."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from napari_feddp.cli import main
from napari_feddp.commands import CommandError, federation
from napari_feddp.federation.demo import make_synthetic_lab, prepare_demo_labs
from napari_feddp.federation.sites import split_by_site, tcga_site
from napari_feddp.models import load_checkpoint

from ..conftest import require_data
from .conftest import wait_no_processes


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="napari-feddp")
    federation.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["federation", *argv])


def test_every_subcommand_is_wired():
    for argv in (["certs", "--out", "x"], ["keys", "--out", "x", "--lab", "a"], ["serve", "--pki", "x"],
                 ["run", "--checkpoint-dir", "x", "--connection", "y"],
                 ["join", "--superlink", "h:1", "--dataset", "d"],
                 ["demo", "--checkpoint-dir", "x"]):
        assert callable(parse(*argv).func)
    assert parse("demo", "--checkpoint-dir", "x").max_steps == 3  # demo-sized defaults


def test_certs_makes_no_lab_key_and_keys_makes_one_in_the_lab(tmp_path, capsys):
    args = parse("certs", "--out", str(tmp_path / "pki"))
    assert args.func(args) == 0
    manifest = json.loads((tmp_path / "pki" / "pki.json").read_text())
    assert "nodes" not in manifest and not list((tmp_path / "pki").rglob("*.pub"))
    assert "makes its own key pair" in capsys.readouterr().out
    args = parse("keys", "--out", str(tmp_path / "lab"), "--lab", "lab-a")
    assert args.func(args) == 0
    assert (tmp_path / "lab" / "lab-a.key").stat().st_mode & 0o777 == 0o600
    assert "send to the coordinator" in capsys.readouterr().out
    with pytest.raises(CommandError, match="exists"):
        args.func(args)  # a second run never replaces the lab's key silently


def test_an_unlimited_budget_is_said_out_loud(tmp_path, capsys):
    from napari_feddp.commands.federation import policy_from_args

    policy = policy_from_args(parse("join", "--superlink", "h:1", "--dataset", "d", "--epsilon-budget", "0"))
    assert policy["max_epsilon"] == 0 and "UNLIMITED" in capsys.readouterr().err
    policy = policy_from_args(parse("join", "--superlink", "h:1", "--dataset", "d"))
    assert policy["max_epsilon"] == 8.0 and policy["accept_dp_modes"] == "sample"


def test_secure_by_default(tmp_path):
    with pytest.raises(CommandError, match="--pki is required"):
        args = parse("serve")
        args.func(args)
    with pytest.raises(CommandError, match="--ca and --key are required"):
        args = parse("join", "--superlink", "127.0.0.1:1", "--dataset", str(tmp_path))
        args.func(args)
    with pytest.raises(CommandError, match="--ca CA.pem is required"):
        args = parse("run", "--superlink", "127.0.0.1:1", "--checkpoint-dir", str(tmp_path))
        args.func(args)


def test_demo_splits_monuseg_across_labs_by_tissue_source_site(tmp_path):
    labs, source = prepare_demo_labs(tmp_path, 3, data=require_data("monuseg"), epsilon_budget=8.0)
    assert source.endswith("monuseg") and [lab.name for lab in labs] == ["lab-1", "lab-2", "lab-3"]
    sites = []
    for lab in labs:
        stems = sorted(p.stem for p in (lab.data_dir / "images").iterdir())
        assert stems and stems == sorted(p.stem for p in (lab.data_dir / "masks").iterdir())
        sites.append({tcga_site(stem) for stem in stems})
        assert lab.max_epsilon == 8.0 and lab.eval_dir is not None  # held-out tiles from test/
        assert (lab.eval_dir / "images").is_dir()
    assert sum(len(s) for s in sites) == len(set().union(*sites))  # a site belongs to one lab
    assert sum(len(list((lab.data_dir / "images").iterdir())) for lab in labs) == 30


def test_demo_splits_any_dataset_folder_and_deals_tiles_when_sites_are_few(tmp_path):
    folder = make_synthetic_lab(tmp_path / "plain", n_tiles=5, size=32)
    labs, source = prepare_demo_labs(tmp_path / "work", 2, data=folder)
    assert source == str(folder)
    assert [len(list((lab.data_dir / "images").iterdir())) for lab in labs] == [3, 2]
    assert all(lab.eval_dir is None for lab in labs)
    names = ["TCGA-A7-1-x", "TCGA-A7-2-x", "TCGA-B0-1-x", "other"]
    assert split_by_site(names, 2) == {"lab-1": ["TCGA-A7-1-x", "TCGA-A7-2-x", "other"], "lab-2": ["TCGA-B0-1-x"]}
    assert split_by_site(names[:2], 2) == {"lab-1": ["TCGA-A7-1-x"], "lab-2": ["TCGA-A7-2-x"]}


def test_demo_data_folder_must_hold_a_dataset(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        rc = main(["federation", "demo", "--data", str(folder), "--workdir", str(tmp_path / "work")])
        assert rc == 2
        err = capsys.readouterr().err
        assert f"data folder {folder}: expected images/ and masks/" in err
    assert not (tmp_path / "work" / "federation").exists()  # nothing was started
    with pytest.raises(SystemExit):
        parse("demo", "--data", str(tmp_path), "--synthetic")


@pytest.mark.slow
def test_demo_trains_three_tls_labs_for_two_rounds_and_leaves_nothing_running(tmp_path, capsys):
    workdir, checkpoints = tmp_path / "work", tmp_path / "checkpoints"
    args = parse(
        "demo", "--clients", "3", "--rounds", "2", "--checkpoint-dir", str(checkpoints),
        "--synthetic", "--tiles", "4", "--crop-size", "32", "--depth", "2", "--base-width", "8",
        "--max-steps", "2", "--batch-size", "2", "--workdir", str(workdir),
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "TLS + node authentication" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[:2] for row in rows] == [["1", "3"], ["2", "3"]]  # 3 labs accepted per round

    rounds = [json.loads(line) for line in (checkpoints / "rounds.jsonl").read_text().splitlines()]
    assert [r["aggregated"] for r in rounds] == [True, True]
    epsilons = [r["epsilon_max"] for r in rounds]
    assert 0 < epsilons[0] < epsilons[1]

    initial, _ = load_checkpoint(checkpoints / "round-000.safetensors")
    final, card = load_checkpoint(checkpoints / "final.safetensors")
    changed = [not np.allclose(initial.state_dict()[k].numpy(), v.numpy()) for k, v in final.state_dict().items()]
    assert all(changed)  # every tensor of the global model moved
    for index in (1, 2):
        _, round_card = load_checkpoint(checkpoints / f"round-{index:03d}.safetensors")
        assert round_card.provenance.round == index
        assert round_card.provenance.privacy.dp_mode == "sample"
        assert round_card.provenance.privacy.epsilon == pytest.approx(epsilons[index - 1])
    assert card.metrics["dice"] >= 0
    evaluation = json.loads((checkpoints / "evaluation.json").read_text())
    assert evaluation["nodes"] == 3 and len(evaluation["per_node"]) == 3
    assert json.loads((checkpoints / "summary.json").read_text())["status"] == "completed"
    # every lab kept the final model in its local model store
    stores = list((workdir / "federation" / "model-stores").glob("*/*.safetensors"))
    assert len(stores) == 3

    assert wait_no_processes(str(workdir)) == []
