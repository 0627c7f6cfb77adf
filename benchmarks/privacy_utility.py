"""What privacy costs: FedAvg, local-only and FedDP (local and distributed noise) side by side.

Run from the repository root after the grid's runs exist::

    .venv/bin/python -m experiments run --foreground-only --out runs/monuseg-fg \\
        --settings fedavg local feddp-eps8 feddp-dist-eps8
    .venv/bin/python -m experiments run --foreground-only --out runs/monuseg-fg-tnbc \
        --settings feddp-dist-eps8 fedavg --pretrain-steps 500 --pretrain-data tnbc
    .venv/bin/python benchmarks/privacy_utility.py --grid runs/monuseg-fg --pretrained-grid runs/monuseg-fg-tnbc

Writes ``benchmarks/results/privacy_utility.json`` (``--out`` to change)::

    {"fedavg": {...}, "local_mean": {...}, "feddp_eps8_local_noise": {...}, "feddp_eps8_distributed": {...},
     "feddp_eps8_distributed_average_last_20": {...},
     "public_pretrained_only": {...}, "local_mean_public_pretrained": {...}, "fedavg_public_pretrained": {...},
     "feddp_eps8_distributed_public_pretrained": {...},
     "feddp_eps8_adopted": {...}, "recipe": "...",
     "secagg_round_overhead": x,
     "attack_secagg": {"psnr", "ssim", "psnr_noise_baseline"}}

each setting ``{"aji", "pq", "dice", "jaccard", "accuracy", "epsilon", "delta", "seeds", "threat_model"}``:
means over the grid's seeds on the MoNuSeg test split, as the runner scored them (``local_mean``: the
mean over the hospitals' own models). ``secagg_round_overhead`` comes from
``benchmarks/results/federation_round.json``, ``attack_secagg`` from
``benchmarks/results/privacy_attack_secagg.json`` (the gradient-inversion attack on what the
coordinator receives under secure aggregation), when those files exist. ``--pretrained-grid``
adds the same settings started from the public-pretrained model (TNBC, no privacy cost) as
``*_public_pretrained`` rows, and the pretrained model alone. The adopted recipe is distributed
noise, from the public-pretrained start when that grid is given (the start chosen on the held-out
hospital, ``docs/results.md``). ``feddp_eps8_distributed_average_last_20`` scores the same runs with the mean
of their last 20 round models (a fifth of the rounds, fixed beforehand; the ServerApp's
``average-last``) as the final model, computed here from each run's round checkpoints.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's experiments/ package

KEYS = ("aji", "pq", "dice", "jaccard", "accuracy")
PRETRAINED_ROWS = {"pretrained": "public_pretrained_only", "local": "local_mean_public_pretrained",
                   "fedavg": "fedavg_public_pretrained",
                   "feddp-dist-eps8": "feddp_eps8_distributed_public_pretrained"}
#: The adopted FedDP recipe: distributed noise under secure aggregation.
ADOPTED = "feddp-dist-eps8"
ROWS = {"fedavg": "fedavg", "local": "local_mean", "feddp-eps8": "feddp_eps8_local_noise",
        ADOPTED: "feddp_eps8_distributed"}
THREAT = {
    "fedavg": "no DP: every party that sees a model or an update",
    "local": "no DP, nothing shared",
    "feddp-eps8": "local noise: each lab's update carries the full DP-SGD noise; holds against everyone, "
                  "coordinator and all other labs included",
    ADOPTED: "distributed noise: at least noise-split labs of every sum honest, the coordinator follows SecAgg+ "
             "(docs/privacy.md)",
    "pretrained": "public data only: no hospital data, nothing to protect",
}


def summarise(grid: Path, names: dict[str, str] = ROWS) -> dict:
    """One row per setting the grid has run (means over its seeds), named by ``names``."""
    from experiments.report import load_records

    rows = {}
    for setting, records in load_records(grid).items():
        if setting not in names:
            continue
        row = {k: statistics.fmean(r[k] for r in records) for k in KEYS if all(k in r for r in records)}
        if len(records) > 1:
            row.update({f"{k}_std": statistics.stdev(r[k] for r in records) for k in ("aji", "dice") if k in row})
        epsilons = [r["epsilon"] for r in records if r.get("epsilon") is not None]
        row.update(epsilon=max(epsilons) if epsilons else None, delta=records[0].get("delta"), seeds=len(records),
                   seed_dice=[round(r["dice"], 4) for r in records], threat_model=THREAT[setting],
                   minutes_per_run=round(statistics.fmean(r.get("seconds", 0) for r in records) / 60, 1))
        rows[names[setting]] = row
    return rows


def averaged(grid: Path, setting: str, last: int, test_dir: Path) -> dict | None:
    """The setting's runs with the mean of their last ``last`` round models as the final model, scored.

    The same arithmetic as the ServerApp's ``average-last`` (post-processing of released models,
    so the epsilon is unchanged), applied to the round checkpoints each run kept.
    """
    import torch

    from experiments.report import load_records
    from experiments.runner import score
    from napari_feddp.models import load_checkpoint, save_checkpoint

    rows = []
    for record in load_records(grid).get(setting, []):
        folder = Path(record["checkpoint"]).parent
        models = [load_checkpoint(p) for p in sorted(folder.glob("round-*.safetensors"))[-last:]]
        model, card = models[-1]
        state = {name: torch.stack([m.state_dict()[name].double() for m, _ in models]).mean(0).to(value.dtype)
                 for name, value in model.state_dict().items()}  # fmt: skip
        model.load_state_dict(state)
        path = save_checkpoint(folder / f"final-average-last-{last}.safetensors", model, card)
        rows.append({**score(path, test_dir, None), "epsilon": record.get("epsilon"), "delta": record.get("delta")})
        print(f"  {setting} seed {record['seed']}, mean of the last {last} models: Dice {rows[-1]['dice']:.4f} "
              f"AJI {rows[-1].get('aji', float('nan')):.4f}", flush=True)
    if not rows:
        return None
    row = {k: statistics.fmean(r[k] for r in rows) for k in KEYS if all(k in r for r in rows)}
    row.update(epsilon=max(r["epsilon"] for r in rows), delta=rows[0]["delta"], seeds=len(rows),
               seed_dice=[round(r["dice"], 4) for r in rows], threat_model=THREAT[setting], average_last=last)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=Path, default=Path("runs/monuseg-fg"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "privacy_utility.json")
    parser.add_argument("--average-last", type=int, default=20,
                        help="also score the distributed runs with the mean of their last N round models "
                        "(0: not)")
    parser.add_argument("--pretrained-grid", type=Path, default=None,
                        help="a grid of the same budget started from the public-pretrained model "
                        "(--pretrain-steps N --pretrain-data tnbc)")
    parser.add_argument("--data", type=Path, default=None, help="MoNuSeg folder with test/ (default: found)")
    args = parser.parse_args(argv)
    from experiments.runner import find_monuseg

    rows = summarise(args.grid)
    recipe = ("distributed noise (dp-noise distributed): one DP-SGD step per round over all hospitals, each "
              "adding noise-multiplier/sqrt(5), summed under SecAgg+, server Adam; the same hospital-steps, "
              "sample rate and noise multiplier as the local-noise row")
    if args.average_last > 1:
        test_dir = (args.data or find_monuseg()) / "test"
        if (row := averaged(args.grid, ADOPTED, args.average_last, test_dir)) is not None:
            rows[f"feddp_eps8_distributed_average_last_{args.average_last}"] = row
    if "feddp_eps8_distributed" in rows:
        rows["feddp_eps8_adopted"] = rows["feddp_eps8_distributed"]
    if args.pretrained_grid is not None:
        pretrained = summarise(args.pretrained_grid, PRETRAINED_ROWS)
        rows.update(pretrained)
        if "feddp_eps8_distributed_public_pretrained" in pretrained:
            rows["feddp_eps8_adopted"] = pretrained["feddp_eps8_distributed_public_pretrained"]
            budget = json.loads(next(args.pretrained_grid.glob("feddp-dist-eps8-s*.json")).read_text())["budget"]
            recipe += (f", started from a model pretrained for {budget['pretrain_steps']} steps without DP on the "
                       f"public {budget['pretrain_data'].upper()} set (no privacy cost)")
    result = {"benchmark": "privacy_utility", "created": datetime.now(UTC).isoformat(timespec="seconds"),
              "grid": str(args.grid), **rows, "recipe": recipe}
    rounds = HERE / "results" / "federation_round.json"
    if rounds.is_file():
        result["secagg_round_overhead"] = json.loads(rounds.read_text()).get("secagg_round_overhead")
    attack = HERE / "results" / "privacy_attack_secagg.json"
    if attack.is_file():
        data = json.loads(attack.read_text())
        result["attack_secagg"] = {k: data.get(k) for k in ("psnr_no_dp", "ssim_no_dp", "psnr_dp", "ssim_dp",
                                                            "psnr_noise_baseline", "ssim_noise_baseline")}
        result["attack_secagg"].update(psnr=data.get("psnr_dp"), ssim=data.get("ssim_dp"),
                                       labs=data.get("secagg_labs"), by_batch_size=data.get("by_batch_size"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
