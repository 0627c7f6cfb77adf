"""Summary table (Markdown, paper-shaped) and plots from the per-run JSON files of an experiment."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from .runner import DP_EPSILONS, OBJECT_SCORES, SETTINGS, SWEEP_ONLY

LABELS = {
    "pretrained": "Public pretraining only (initial model of every row)",
    "centralized": "Centralized (pooled, no DP)",
    "local": "Local only (mean / worst hospital)",
    "fedavg": "FedAvg (no DP)",
    "feddp-eps1": "FedDP sample-level, ε=1",
    "feddp-eps3": "FedDP sample-level, ε=3",
    "feddp-eps8": "FedDP sample-level, ε=8",
    "feddp-dist-eps8": "FedDP distributed noise, ε=8",
    "feddp-eps16": "FedDP sample-level, ε=16 (privacy-cost sweep)",
    "feddp-eps32": "FedDP sample-level, ε=32 (privacy-cost sweep)",
    "feddp-clip": "FedDP machinery, clipping only (diagnostic, no privacy)",
    "feddp-update": "FedDP update-level (client DP)",
}


def load_records(out: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """``<setting>-s<seed>.json`` files of ``out`` grouped by setting."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(out).glob("*-s[0-9]*.json")):
        record = json.loads(path.read_text())
        if "setting" in record:
            grouped.setdefault(record["setting"], []).append(record)
    return grouped


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def summarize(grouped: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per setting: mean / std of the metrics, seeds, epsilon, relative change vs FedAvg."""
    rows = []
    fedavg = grouped.get("fedavg")
    base = _mean_std([r["dice"] for r in fedavg])[0] if fedavg else None
    for setting in SETTINGS:
        records = grouped.get(setting)
        if not records and (setting == "pretrained" or setting in SWEEP_ONLY):
            continue  # a grid from a random init has no pretrained row; the sweep is on request
        if not records:
            rows.append({"setting": setting, "label": LABELS[setting], "run": False})
            continue
        row: dict[str, Any] = {"setting": setting, "label": LABELS[setting], "run": True, "seeds": len(records)}
        for key in ("dice", "jaccard", "accuracy", *OBJECT_SCORES):
            if key in OBJECT_SCORES and not all(key in r for r in records):
                continue  # runs scored before the test folder had per-nucleus annotations
            row[key], row[f"{key}_std"] = _mean_std([r[key] for r in records])
            row[f"{key}_text"] = _fmt([r[key] for r in records])
        if setting == "local":
            row["worst_dice_text"] = _fmt([r["worst_dice"] for r in records])
        eps = [r["epsilon"] for r in records if r.get("epsilon") is not None]
        row["epsilon"] = max(eps) if eps else None
        row["seconds"] = sum(r.get("seconds", 0) for r in records) / len(records)
        if base and setting.startswith("feddp"):
            row["rel_change_pct"] = 100.0 * (row["dice"] - base) / base
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]], command: str = "python -m experiments run --out DIR") -> str:
    """Paper-shaped Markdown table."""
    objects = any("aji" in row for row in rows)
    extra = " AJI | PQ |" if objects else ""
    lines = [f"| Setting |{extra} Dice | Jaccard | Pixel acc. | ε (δ=1e-5) | Δ Dice vs FedAvg | seeds | time / run |",
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if objects else "")]
    for row in rows:
        if not row["run"]:
            lines.append(f"| {row['label']} | not run yet | |{' | |' if objects else ''} | | | | "
                         f"`{command} --settings {row['setting']}` |")
            continue
        dice = row["dice_text"] + (f" / worst {row['worst_dice_text']}" if "worst_dice_text" in row else "")
        if row["setting"] == "pretrained":
            eps = "0 (public data only)"
        elif row.get("epsilon") is None:
            eps = "∞ (no DP)" if row["setting"] in ("centralized", "local", "fedavg", "feddp-clip") else "-"
        else:
            eps = f"{row['epsilon']:.2f}"
        rel = f"{row['rel_change_pct']:+.1f} %" if "rel_change_pct" in row else ""
        scores = f" {row.get('aji_text', '')} | {row.get('pq_text', '')} |" if objects else ""
        lines.append(f"| {row['label']} |{scores} {dice} | {row['jaccard_text']} | {row['accuracy_text']} | {eps} | {rel} "
                     f"| {row['seeds']} | {row['seconds'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def round_series(grouped: dict[str, list[dict[str, Any]]], metric: str) -> dict[str, dict[int, list[float]]]:
    """Per setting (in table order), the values of ``metric`` (``"dice"`` on the per-round test
    subset, or ``"epsilon"``) of every seed, by round; settings without ε have no ε curve."""
    series: dict[str, dict[int, list[float]]] = {}
    for setting in sorted(grouped, key=lambda s: (SETTINGS.index(s) if s in SETTINGS else len(SETTINGS), s)):
        per_round: dict[int, list[float]] = {}
        for record in grouped[setting]:
            for entry in record.get("rounds") or []:
                value = entry.get("test_subset", {}).get("dice") if metric == "dice" else entry.get("epsilon")
                if value is not None and math.isfinite(value):
                    per_round.setdefault(int(entry["round"]), []).append(float(value))
        if per_round:
            series[setting] = per_round
    return series


def plot_rounds(grouped: dict[str, list[dict[str, Any]]], out: str | os.PathLike, prefix: str = "results_") -> list[Path]:
    """``<prefix>dice_vs_round.png`` and ``<prefix>epsilon_vs_round.png`` for the federated settings
    (mean over seeds, band = range of the seeds; one colour per setting in both plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    written = []
    for metric, ylabel, name in (("dice", "test Dice (subset)", "dice_vs_round"),
                                 ("epsilon", "ε spent (δ=1e-5, log scale)", "epsilon_vs_round")):
        series = round_series(grouped, metric)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for setting, per_round in series.items():
            xs = sorted(per_round)
            means = [sum(per_round[x]) / len(per_round[x]) for x in xs]
            seeds = max(len(v) for v in per_round.values())
            label = LABELS.get(setting, setting) + (f" (mean of {seeds} seeds)" if seeds > 1 else "")
            colour = f"C{SETTINGS.index(setting) % 10}" if setting in SETTINGS else None
            (line,) = ax.plot(xs, means, marker="o", label=label, color=colour)
            if seeds > 1:
                ax.fill_between(xs, [min(per_round[x]) for x in xs], [max(per_round[x]) for x in xs],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        if metric == "epsilon":
            ax.set_yscale("log")
        ax.set_xlabel("federated round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        path = out / f"{prefix}{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_privacy_cost(rows: list[dict[str, Any]], out: str | os.PathLike,
                      prefix: str = "results_") -> Path | None:
    """``<prefix>dice_vs_epsilon.png``: test Dice of the sample-level FedDP settings against
    their ε (mean, bar = std over seeds), with FedAvg, FedAvg - 1 point (the target
    for ε = 8), centralized and the clipping-only diagnostic (if run) as lines. None when fewer than two ε were run."""
    dp = sorted((DP_EPSILONS[r["setting"]], r) for r in rows if r["run"] and r["setting"] in DP_EPSILONS)
    if len(dp) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar([e for e, _ in dp], [r["dice"] for _, r in dp], yerr=[r["dice_std"] or 0.0 for _, r in dp],
                marker="o", capsize=3, label="FedDP sample-level (seeds: " +
                ", ".join(f"ε {e:g}: {r['seeds']}" for e, r in dp) + ")")
    by_setting = {r["setting"]: r for r in rows if r["run"]}
    for setting, style, colour, label in (("centralized", ":", "grey", "centralized"),
                                          ("fedavg", "-", "black", "FedAvg (no DP)"),
                                          ("feddp-clip", "-.", "tab:green", "clipping only, no noise")):
        if setting in by_setting:
            ax.axhline(by_setting[setting]["dice"], color=colour, linestyle=style, linewidth=1, label=label)
    if "fedavg" in by_setting:
        ax.axhline(by_setting["fedavg"]["dice"] - 0.01, color="tab:red", linestyle="--", linewidth=1,
                   label="FedAvg - 1 Dice point")
    ax.set_xscale("log", base=2)
    ax.set_xticks([e for e, _ in dp], [f"{e:g}" for e, _ in dp])
    ax.set_xlabel("ε per hospital (δ = 1e-5, privacy unit: one patch)")
    ax.set_ylabel("test Dice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = Path(out) / f"{prefix}dice_vs_epsilon.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: str | os.PathLike) -> dict[str, Any]:
    """Write ``summary.json``, ``table.md`` and the PNG plots into ``out``."""
    out = Path(out)
    grouped = load_records(out)
    rows = summarize(grouped)
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(rows))
    plots = plot_rounds(grouped, out)
    cost = plot_privacy_cost(rows, out)
    plots += [cost] if cost else []
    return {"rows": rows, "plots": [str(p) for p in plots]}


__all__ = ["load_records", "markdown_table", "plot_privacy_cost", "plot_rounds", "round_series", "summarize", "write_report"]
