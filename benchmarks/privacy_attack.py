"""Privacy audit: gradient inversion (Geiping et al.) against one FedDP client update.

Run from the repository root::

    .venv/bin/python benchmarks/privacy_attack.py            # full run (~15 min on 2 shared CPU cores)
    .venv/bin/python benchmarks/privacy_attack.py --quick    # smoke run (~1-2 min), writes nothing unless --out

Writes ``benchmarks/results/privacy_attack.json`` and ``docs/images/privacy_attack.png``
(``--out`` / ``--figure`` to change) and prints a summary. See ``docs/privacy.md``.

What is measured. An honest-but-curious server receives one lab's weights after
ONE local SGD step (learning rate known) on B real MoNuSeg crops (B = 1 and 4,
64 x 64 px at 0.5 µm/px) of the shipped architecture (``default_card`` U-Net:
depth 4, base width 16, GroupNorm 8, untrained initial global model), so it
reads the update ``(w_before - w_after) / lr``. The update is computed by the
product's ``train_local``: plainly (no DP), and with DP-SGD at the FedDP defaults
of :class:`napari_feddp.federation.settings.RunSettings` (Opacus, per-sample
clipping at ``max_grad_norm``, Gaussian noise ``noise_multiplier * max_grad_norm``,
divided by the expected batch size). The attacker knows the architecture, the
weights before the step and the masks, and runs
:func:`experiments.gradient_inversion.invert_gradients` (cosine gradient matching + TV prior).

Reconstructions are scored with PSNR and SSIM against the true crops in [0, 1]
RGB after optimal matching (:func:`experiments.gradient_inversion.score_reconstructions`).
References scored the same way, with the same crops:

* ``noise_baseline`` - the attack's starting images, scored the same way (asked for by
  the audit). With ``--start mean-colour`` (default) the start is the public mean H&E
  colour: the best guess the attacker has without the update, so "no better than the
  baseline" means "the update taught the attacker nothing". ``--start noise`` uses
  Geiping et al.'s standard-normal start, which the attack's TV prior alone improves on;
* ``prior_only`` - the same attack, same start, against an update that holds no
  information about the crops (pure Gaussian noise): what the attack's TV prior
  and the known masks produce on their own. A DP reconstruction that scores like
  this control has learnt nothing from the update;
* ``mean_colour`` - every pixel the mean RGB colour of the public MoNuSeg *test*
  split (no attack at all);
* ``mask_paint`` - the known mask painted with the public mean nucleus and
  background colours: what knowing the labels alone gives the attacker.

Secure aggregation (``--secagg-labs N``, N >= 2; writes
``benchmarks/results/privacy_attack_secagg.json`` and no figure unless ``--figure``).
Under Flower SecAgg+ the server never reads one lab's update, only the uniform mean
of the N labs' updates. Each lab takes one step from the same global model on its
own B crops (lab k's from the k-th group of B tiles, lab 1's are the crops the
one-lab audit uses for the first batch size) and, with DP, clips per sample and
adds its own full DP-SGD noise (seed ``--seed + k - 1``). The attacker knows what
it knows above and lab 1's masks, and runs the same attack against the mean: it
matches the gradient of B dummy crops to the observed update (the other labs'
data is unknown to it). Scores are against lab 1's true crops; the references are
computed exactly as for one lab.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # the package and the experiments harness

from experiments.gradient_inversion import (  # noqa: E402
    AttackConfig,
    client_update,
    invert_gradients,
    score_reconstructions,
)
from napari_feddp.federation.settings import RunSettings  # noqa: E402
from napari_feddp.models import build_model, default_card  # noqa: E402
from napari_feddp.training import SegmentationDataset  # noqa: E402
from napari_feddp.training.dataset import crop_with_padding  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "monuseg"
#: Margins of the verdicts (dB PSNR, SSIM units).
RECOGNISABLE_PSNR_MARGIN = 3.0
RECOGNISABLE_SSIM_MARGIN = 0.1
NO_BETTER_PSNR_TOL = 1.0
NO_BETTER_SSIM_TOL = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = RunSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="client batch sizes B to attack")
    parser.add_argument("--crop", type=int, default=defaults.crop_size, help="crop edge in pixels at 0.5 µm/px")
    parser.add_argument("--iterations", type=int, nargs="+", default=None,
                        help="attack iterations per batch size (one value, or one per --batch-sizes; "
                        "default 2000 for B = 1, 1000 for larger B)")
    parser.add_argument("--tv", type=float, default=0.03, help="total-variation weight")
    parser.add_argument("--restarts", type=int, default=1, help="random restarts per attack")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                        help="client's local optimizer: sgd (update = gradient, the threat model of the audit) "
                             "or adam (what default_train uses; first step ~ lr * sign(gradient))")
    parser.add_argument("--start", choices=("mean-colour", "noise"), default="mean-colour",
                        help="attack start: the public mean H&E colour (the attacker's best guess without "
                        "the update; default) or Geiping et al.'s random noise")
    parser.add_argument("--seed", type=int, default=0, help="model init, crop choice, DP noise, attack start")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is ~10x faster than 2 for this workload on a "
                             "shared 2-core machine: thread barriers stall when cores are busy)")
    parser.add_argument("--secagg-labs", type=int, default=0,
                        help="N >= 2: the attacker observes the mean of N labs' one-step updates (secure "
                        "aggregation) and attacks lab 1's crops; 0 (default): one lab's update in the clear")
    parser.add_argument("--data", type=Path, default=DATA, help="MoNuSeg folder with train/ and test/")
    parser.add_argument("--quick", action="store_true",
                        help="32 px crops, 200 iterations; prints the result, writes only what --out/--figure name")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--log-every", type=int, default=0, help="print attack progress every N iterations")
    args = parser.parse_args(argv)
    if args.secagg_labs == 1 or args.secagg_labs < 0:
        parser.error("--secagg-labs: 0 (one lab in the clear) or the number of labs, at least 2")
    if args.iterations is None:
        args.iterations = [2000 if batch == 1 else 1000 for batch in args.batch_sizes]
    if args.quick:
        args.crop, args.iterations = 32, [200]
    elif args.out is None and args.figure is None and args.secagg_labs:
        args.out = REPO / "benchmarks" / "results" / "privacy_attack_secagg.json"
    elif args.out is None and args.figure is None:
        args.out = REPO / "benchmarks" / "results" / "privacy_attack.json"
        args.figure = REPO / "docs" / "images" / "privacy_attack.png"
    if len(args.iterations) == 1:
        args.iterations = args.iterations * len(args.batch_sizes)
    if len(args.iterations) != len(args.batch_sizes):
        parser.error("--iterations: give one value or one per --batch-sizes")
    return args


# --------------------------------------------------------------------------- data


def pick_crops(data_dir: Path, n: int, crop: int, *, first_tile: int, seed: int):
    """``n`` crops in [0, 1] RGB with their masks, one per tile, 10-60 % nuclei, no padding."""
    dataset = SegmentationDataset(data_dir / "train", crop_size=crop, target_mpp=0.5, augment=False)
    rng = np.random.default_rng(seed)
    images, masks, sources = [], [], []
    tile = first_tile
    while len(images) < n:
        image, mask = dataset.load_tile(tile % len(dataset.pairs))
        for _ in range(200):
            y0, x0 = (int(rng.integers(0, s - crop + 1)) for s in mask.shape)
            crop_image, crop_mask = crop_with_padding(image, mask, y0, x0, crop)
            if 0.1 <= crop_mask.mean() <= 0.6:
                break
        images.append(torch.from_numpy(np.ascontiguousarray(crop_image)).permute(2, 0, 1).float() / 255.0)
        masks.append(torch.from_numpy(crop_mask))
        sources.append({"tile": dataset.pairs[tile % len(dataset.pairs)].name, "y0": y0, "x0": x0})
        tile += 1
    return torch.stack(images), torch.stack(masks), sources


def public_colours(data_dir: Path) -> dict[str, torch.Tensor]:
    """Mean RGB in [0, 1] of all, nucleus and background pixels of the MoNuSeg *test* split
    (public H&E, disjoint from the victims' tiles)."""
    dataset = SegmentationDataset(data_dir / "test", crop_size=64, target_mpp=0.5, augment=False)
    sums = {"all": np.zeros(3), "nucleus": np.zeros(3), "background": np.zeros(3)}
    counts = dict.fromkeys(sums, 0)
    for i in range(len(dataset.pairs)):
        image, mask = dataset.load_tile(i)
        pixels, labels = image.reshape(-1, 3).astype(np.float64) / 255.0, mask.reshape(-1)
        for key, chosen in (("all", slice(None)), ("nucleus", labels == 1), ("background", labels == 0)):
            sums[key] += pixels[chosen].sum(0)
            counts[key] += len(pixels[chosen])
    return {key: torch.tensor(sums[key] / counts[key], dtype=torch.float32) for key in sums}


# --------------------------------------------------------------------------- one batch size


def observed_updates(model, images: torch.Tensor, masks: torch.Tensor, args, settings: RunSettings,
                     normalization) -> tuple[dict, dict]:
    """What the server reads, without and with DP, and lab 1's own updates.

    ``images``/``masks`` hold the labs' crops one lab after the other (``max(1, args.secagg_labs)``
    labs, lab 1 first, equal shares). Each lab's update is :func:`client_update` from ``model``
    with DP noise seed ``args.seed + k`` for the k-th lab (0-based); the observation is their uniform
    mean (secure aggregation), i.e. lab 1's update itself when there is one lab.

    Returns
    -------
    observed, lab1 : dict
        ``{"no_dp": update, "dp": update}`` each, an update being a dict of parameter name to tensor.
    """
    share = len(images) // max(1, args.secagg_labs)
    per_lab: dict[str, list[dict[str, torch.Tensor]]] = {"no_dp": [], "dp": []}
    for k, (lab_images, lab_masks) in enumerate(zip(images.split(share), masks.split(share))):
        common = {"normalization": normalization, "lr": settings.learning_rate, "optimizer": args.optimizer,
                  "seed": args.seed + k}
        per_lab["no_dp"].append(client_update(model, lab_images, lab_masks, dp=False, **common))
        per_lab["dp"].append(client_update(model, lab_images, lab_masks, dp=True, max_grad_norm=settings.max_grad_norm,
                                           noise_multiplier=settings.noise_multiplier, **common))
    observed = {key: {name: torch.stack([u[name] for u in updates]).mean(0) for name in updates[0]}
                for key, updates in per_lab.items()}
    return observed, {key: updates[0] for key, updates in per_lab.items()}


def attack_batch(model, card, settings: RunSettings, batch: int, iterations: int, args, first_tile: int,
                 colours: dict[str, torch.Tensor]) -> dict:
    normalization = (card.input.normalization.mean, card.input.normalization.std)
    labs = max(1, args.secagg_labs)
    all_images, all_masks, all_sources = pick_crops(args.data, batch * labs, args.crop, first_tile=first_tile,
                                                    seed=args.seed)
    images, masks, sources = all_images[:batch], all_masks[:batch], all_sources[:batch]  # lab 1: the victim
    started = time.perf_counter()
    updates, lab1 = observed_updates(model, all_images, all_masks, args, settings, normalization)
    client_seconds = time.perf_counter() - started
    generator = torch.Generator().manual_seed(args.seed + 7)
    updates["prior_only"] = {name: torch.randn(v.shape, generator=generator) for name, v in updates["dp"].items()}

    config = AttackConfig(iterations=iterations, tv_weight=args.tv, restarts=args.restarts, seed=args.seed)
    start01 = None
    if args.start == "mean-colour":
        # Exactly the public mean colour: the start is then the "mean colour" guess, and the
        # noise-only baseline scores what the attacker knows before seeing the update.
        start01 = colours["all"].reshape(1, 3, 1, 1).expand(images.shape).clone()
    out: dict = {"batch_size": batch, "iterations": iterations, "crops": sources,
                 "client_update_seconds": round(client_seconds, 2), "attacks": {}}
    if args.secagg_labs:
        out["secagg_labs"] = labs
        out["other_labs_crops"] = [all_sources[k * batch:(k + 1) * batch] for k in range(1, labs)]
    recon = {}
    for name, update in updates.items():
        print(f"B={batch}: attacking the {name} update ({iterations} iterations)...", flush=True)
        result = invert_gradients(model, update, masks, normalization=normalization, config=config,
                                  log_every=args.log_every, start01=start01)
        score = score_reconstructions(images, result.images01)
        recon[name] = result.images01[score.assignment]  # reorder to the true crops' order
        out["attacks"][name] = {
            "psnr": score.psnr, "ssim": score.ssim, "assignment": score.assignment,
            "final_cosine": round(result.cosine, 4), "final_objective": round(result.objective, 5),
            "restart_objectives": result.restart_objectives, "seconds": round(result.seconds, 1),
        }
        init01 = result.init01
        print(f"    PSNR {score.mean_psnr:.2f} dB  SSIM {score.mean_ssim:.3f}  cosine {result.cosine:.3f}  "
              f"({result.seconds:.0f} s)", flush=True)
    baseline = score_reconstructions(images, init01)  # same seed -> the same start for all three attacks
    constant = colours["all"].reshape(1, 3, 1, 1).expand_as(images).clone()
    nucleus = (masks == 1).unsqueeze(1).float()
    painted = nucleus * colours["nucleus"].reshape(1, 3, 1, 1) + (1 - nucleus) * colours["background"].reshape(1, 3, 1, 1)
    flat, paint = score_reconstructions(images, constant), score_reconstructions(images, painted)
    out["noise_baseline"] = {"psnr": baseline.psnr, "ssim": baseline.ssim}
    out["mean_colour"] = {"psnr": flat.psnr, "ssim": flat.ssim}
    out["mask_paint"] = {"psnr": paint.psnr, "ssim": paint.ssim}
    out["update_diagnostics"] = _diagnostics(updates)
    if args.secagg_labs:
        out["update_diagnostics"].update(_secagg_diagnostics(updates, lab1))
    out["_images"] = {"original": images, "no_dp": recon["no_dp"], "dp": recon["dp"],
                      "prior_only": recon["prior_only"], "start": init01[baseline.assignment], "mask_paint": painted}
    return out


def _diagnostics(updates: dict) -> dict:
    def flat(update):
        return torch.cat([v.flatten() for v in update.values()])

    plain, dp = flat(updates["no_dp"]), flat(updates["dp"])
    cosine = float(torch.nn.functional.cosine_similarity(plain, dp, dim=0))
    return {"n_parameters": int(plain.numel()), "norm_no_dp": float(plain.norm()), "norm_dp": float(dp.norm()),
            "cosine_dp_vs_no_dp": cosine}


def _secagg_diagnostics(observed: dict, lab1: dict) -> dict:
    """How much of lab 1's own update is left in the observed mean (cosines; 1 = all of it)."""
    def flat(update):
        return torch.cat([v.flatten() for v in update.values()])

    own = flat(lab1["no_dp"])
    return {f"cosine_{key}_vs_lab1_no_dp": float(torch.nn.functional.cosine_similarity(flat(observed[key]), own, dim=0))
            for key in ("no_dp", "dp")}


# --------------------------------------------------------------------------- summary


def summarise(args, settings: RunSettings, runs: list[dict], n_params: int, seconds: float) -> dict:
    def pooled(key: str, metric: str) -> float:
        values = []
        for run in runs:
            source = run["attacks"][key] if key in run["attacks"] else run[key]
            values += source[metric]
        return float(np.mean(values))

    result = {
        "benchmark": "privacy_attack",
        "secagg_labs": args.secagg_labs,
        "psnr_no_dp": pooled("no_dp", "psnr"),
        "psnr_dp": pooled("dp", "psnr"),
        "ssim_no_dp": pooled("no_dp", "ssim"),
        "ssim_dp": pooled("dp", "ssim"),
        "psnr_noise_baseline": pooled("noise_baseline", "psnr"),
        "ssim_noise_baseline": pooled("noise_baseline", "ssim"),
        "psnr_prior_only": pooled("prior_only", "psnr"),
        "ssim_prior_only": pooled("prior_only", "ssim"),
        "psnr_mean_colour": pooled("mean_colour", "psnr"),
        "ssim_mean_colour": pooled("mean_colour", "ssim"),
        "psnr_mask_paint": pooled("mask_paint", "psnr"),
        "ssim_mask_paint": pooled("mask_paint", "ssim"),
        "aggregation": "mean over every attacked crop of every batch size (PSNR in dB, SSIM in [-1, 1])",
    }
    by_b = {}
    for run in runs:
        entry = {f"{m}_{k}": float(np.mean(run["attacks"][k][m])) for k in run["attacks"] for m in ("psnr", "ssim")}
        entry.update({f"{m}_{k}": float(np.mean(run[k][m])) for k in ("noise_baseline", "mean_colour", "mask_paint")
                      for m in ("psnr", "ssim")})
        by_b[str(run["batch_size"])] = entry
    recognisable = all(
        e["psnr_no_dp"] >= e["psnr_prior_only"] + RECOGNISABLE_PSNR_MARGIN
        and e["psnr_no_dp"] >= e["psnr_noise_baseline"] + RECOGNISABLE_PSNR_MARGIN
        and e["ssim_no_dp"] >= e["ssim_prior_only"] + RECOGNISABLE_SSIM_MARGIN
        for e in by_b.values()
    )
    result["verdict"] = {
        "no_dp_recognisable": recognisable,
        "no_dp_recognisable_rule": (f"for every B: no-DP PSNR >= prior-only and noise baseline + "
                                    f"{RECOGNISABLE_PSNR_MARGIN} dB and SSIM >= prior-only + "
                                    f"{RECOGNISABLE_SSIM_MARGIN} (and see the figure)"),
        "dp_no_better_than_noise_baseline": all(
            e["psnr_dp"] <= e["psnr_noise_baseline"] + NO_BETTER_PSNR_TOL
            and e["ssim_dp"] <= e["ssim_noise_baseline"] + NO_BETTER_SSIM_TOL for e in by_b.values()),
        "dp_no_better_than_prior_only": all(
            e["psnr_dp"] <= e["psnr_prior_only"] + NO_BETTER_PSNR_TOL
            and e["ssim_dp"] <= e["ssim_prior_only"] + NO_BETTER_SSIM_TOL for e in by_b.values()),
        "tolerances": {"psnr_db": NO_BETTER_PSNR_TOL, "ssim": NO_BETTER_SSIM_TOL},
    }
    result["by_batch_size"] = by_b
    result["runs"] = [{k: v for k, v in run.items() if k != "_images"} for run in runs]
    result["settings"] = {
        "model": "default_card U-Net " + json.dumps(default_card().architecture.params),
        "parameters": n_params,
        "initial_weights": f"untrained, torch.manual_seed({args.seed})",
        "crop": args.crop, "mpp": settings.mpp, "data": str(args.data / "train"),
        "client_step": (f"train_local, steps=1, optimizer={args.optimizer}, lr={settings.learning_rate}, batch_size=B "
                        "(Poisson sample rate 1), DiceCELoss"),
        "dp": (f"Opacus make_private via train_local: dp_mode=sample, noise_multiplier="
               f"{settings.noise_multiplier}, max_grad_norm={settings.max_grad_norm}, expected batch B"),
        "start": ("the public mean colour of the MoNuSeg test split (what the attacker knows without the "
                  "update); psnr/ssim_noise_baseline score this start" if args.start == "mean-colour" else
                  "standard-normal noise in normalised input space (Geiping et al.)"),
        "attack": (f"cosine gradient matching + TV (weight {args.tv}), Adam lr 0.1 on signed gradients, "
                   f"step decay x0.1 at 3/8, 5/8, 7/8, boxed to [0, 1], known masks, restarts={args.restarts}"),
        "iterations": dict(zip(map(str, args.batch_sizes), args.iterations)),
        "threads": args.threads, "seed": args.seed, "quick": args.quick,
    }
    if args.secagg_labs:
        result["settings"]["observation"] = (
            f"secure aggregation: the uniform mean of {args.secagg_labs} labs' one-step updates from the same global "
            f"model, each lab on its own B crops (other tiles) with its own DP noise (seed + lab index); the attack "
            f"matches lab 1's B crops (masks known) to the mean, scored against lab 1's true crops")
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                         "torch": torch.__version__, "opacus": _version("opacus"),
                         "scikit-image": _version("skimage"), "device": "cpu"}
    result["seconds"] = round(seconds, 1)
    result["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    return result


def _version(module: str) -> str:
    return __import__(module).__version__


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------- figure


def save_figure(runs: list[dict], path: Path, start: str = "noise", labs: int = 0) -> None:
    """Originals, no-DP, DP, prior-only control and attack start; one column per crop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("original", "original"), ("no_dp", "no DP"), ("dp", "DP (FedDP defaults)"),
            ("prior_only", "control: no-info update"), ("start", f"start: {start.replace('-', ' ')}")]
    columns = [(run, i) for run in runs for i in range(run["batch_size"])]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.35 * len(columns) + 0.9, 1.5 * len(rows)),
                             squeeze=False)
    for c, (run, i) in enumerate(columns):
        for r, (key, label) in enumerate(rows):
            ax = axes[r, c]
            ax.imshow(run["_images"][key][i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"B={run['batch_size']} #{i + 1}", fontsize=8)
            else:
                scores = run["attacks"][key] if key in run["attacks"] else run["noise_baseline"]
                ax.set_xlabel(f"{scores['psnr'][i]:.1f} dB / {scores['ssim'][i]:.2f}", fontsize=7, labelpad=2)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    title = "Gradient inversion of one client update (PSNR / SSIM vs original)"
    if labs:
        title = f"Gradient inversion, mean of {labs} labs (PSNR / SSIM vs lab 1's crops)"
    fig.suptitle(title if len(columns) > 2 else title.replace(" (", "\n("), fontsize=9 if len(columns) > 2 else 7,
                 y=0.995)
    fig.tight_layout(pad=0.3, h_pad=0.4, w_pad=0.2, rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    quantize_png(buffer.getvalue(), path)


def quantize_png(png: bytes, path: Path) -> None:
    """Save as a 256-colour palette PNG (the noise rows do not compress otherwise; < 300 KB)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.data / "train").is_dir():
        raise SystemExit(f"MoNuSeg data not found at {args.data}/train (see docs/privacy.md)")
    started = time.perf_counter()
    settings = RunSettings()
    card = default_card(tile_size=args.crop, mpp=settings.mpp, depth=settings.model_depth,
                        base_width=settings.model_base_width, groups=settings.model_groups)
    torch.manual_seed(args.seed)
    model = build_model(card)
    n_params = sum(p.numel() for p in model.parameters())
    colours = public_colours(args.data)  # the start and the no-attack references, for every B
    runs, first_tile = [], 0
    for batch, iterations in zip(args.batch_sizes, args.iterations):
        runs.append(attack_batch(model, card, settings, batch, iterations, args, first_tile, colours))
        first_tile += batch * max(1, args.secagg_labs)  # distinct tiles for every crop of every lab
    result = summarise(args, settings, runs, n_params, time.perf_counter() - started)
    if args.figure is not None:
        save_figure(runs, args.figure, args.start, args.secagg_labs)
    text = json.dumps(_jsonable(result), indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    keys = [f"{m}_{k}" for m in ("psnr", "ssim")
            for k in ("no_dp", "dp", "noise_baseline", "prior_only", "mean_colour", "mask_paint")]
    print(json.dumps({k: round(result[k], 3) for k in keys}, indent=2))
    print(json.dumps(result["verdict"], indent=2))
    print(f"total {result['seconds']:.0f} s" + (f"; wrote {args.out}" if args.out else "")
          + (f" and {args.figure}" if args.figure else ""))
    return result


if __name__ == "__main__":
    main()
