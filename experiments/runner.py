"""Run the comparison grid: centralized, local-only, FedAvg, FedDP (sample / update).

Compute budget. Every setting sees the same number of training examples and
takes the same total number of optimizer steps of the same batch size:

* federated settings: ``rounds x hospitals x local_steps`` steps of ``batch_size``
  (each hospital takes ``local_steps`` steps per round, through the real Flower
  engine, :class:`~napari_feddp.federation.pilot.LocalFederation` on loopback);
* centralized: the same total ``rounds x hospitals x local_steps`` steps on the
  pooled patches (``train_local`` directly, configured as a lab's round by
  :meth:`~napari_feddp.federation.settings.RunSettings.train_config`, no DP);
* local-only: each hospital alone takes its federated share,
  ``rounds x local_steps`` steps (so all hospitals together spend the same total);
  the table reports the mean and the worst hospital.

All models are scored on the official MoNuSeg test split with the tiled engine
(:func:`napari_feddp.evaluation.evaluate_folder`, at 0.25 µm/px), pooled Dice,
Jaccard and pixel accuracy.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from napari_feddp.federation.settings import RunSettings, SettingsError

from .hospitals import HOSPITALS, prepare_hospitals

#: Every setting the runner knows, in table order.
SETTINGS = ("pretrained", "centralized", "local", "fedavg", "feddp-eps1", "feddp-eps3", "feddp-eps8",
            "feddp-eps16", "feddp-eps32", "feddp-clip", "feddp-update", "feddp-dist-eps8")
DP_EPSILONS = {"feddp-eps1": 1.0, "feddp-eps3": 3.0, "feddp-eps8": 8.0, "feddp-eps16": 16.0, "feddp-eps32": 32.0}
#: Diagnostic: the sample-level DP-SGD machinery (per-sample clipping, Poisson sampling, the
#: ledger) with a negligible noise multiplier, i.e. no privacy. Its gap to FedAvg is what
#: clipping and sampling cost; the rest of a DP setting's gap is the noise.
CLIP_ONLY_NOISE = 1e-4
#: Settings trained with sample-level DP-SGD (their own ``Budget.for_sample_dp``).
SAMPLE_DP = (*DP_EPSILONS, "feddp-clip", "feddp-dist-eps8")
#: Run only when asked for (``--settings``): the privacy-cost sweep past the grid's epsilons,
#: which measures what budget FedDP needs to come within 1 Dice point of FedAvg, and the
#: clipping-only diagnostic.
SWEEP_ONLY = ("feddp-eps16", "feddp-eps32", "feddp-clip", "feddp-dist-eps8")
#: Distributed DP noise at epsilon 8: one DP-SGD step per round over all hospitals, each adding
#: its share of the noise under secure aggregation (``dp-noise distributed``). The same lab-steps,
#: sample rate and steps per hospital as ``feddp-eps8``, hence the same noise multiplier; run
#: in one process (:mod:`experiments.inprocess`: one round per step).
DISTRIBUTED = {"feddp-dist-eps8": 8.0}
#: What ``run_grid`` runs when no settings are given.
GRID = tuple(s for s in SETTINGS if s not in SWEEP_ONLY)


#: A run's JSON records the shared settings under these keys (record key -> ``RunSettings`` field).
RECORD_KEYS = {"rounds": "num_rounds", "local_steps": "max_steps", "batch_size": "batch_size",
               "crop_size": "crop_size", "learning_rate": "learning_rate", "base_width": "model_base_width",
               "depth": "model_depth", "groups": "model_groups", "mpp": "mpp", "delta": "target_delta",
               "max_grad_norm": "max_grad_norm", "update_clipping_norm": "update_clipping_norm"}


def _grid_settings() -> RunSettings:
    """The grid's shared settings where they differ from ``RunSettings``' defaults.

    Batch 32 and base width 8 (chosen on a held-out training hospital, ``--holdout h5-mixed``;
    docs/results.md): DP-SGD's noise on the mean gradient is sigma * C / batch and its norm
    grows with the number of weights.
    """
    return RunSettings(num_rounds=10, max_steps=10, batch_size=32, crop_size=128, learning_rate=2e-3,
                       model_base_width=8)


@dataclass
class Budget:
    """Model and compute budget shared by every setting of the grid.

    ``settings`` holds the shared hyperparameters, as a federated run's settings (rounds,
    local steps ``max_steps``, batch, learning rate, crop, model, pixel size, delta, clipping
    norms): the federated runs and the direct training (centralized, local-only, public
    pretraining) are all derived from it. The other fields are the experiment's own.
    """

    settings: RunSettings = field(default_factory=_grid_settings)
    hospitals: tuple[str, ...] = tuple(HOSPITALS)
    grid: int = 4
    max_tiles: int | None = None
    test_names: tuple[str, ...] | None = None
    round_eval_names: tuple[str, ...] | None = None
    timeout: float = 5400.0
    #: Sample-level DP runs only: batch size and local steps per round, at the same number of
    #: training crops (``batch_size * local_steps``); None keeps the shared values. DP-SGD
    #: gains from larger batches: the noise on the mean gradient is sigma * C / batch.
    dp_batch_size: int | None = None
    dp_local_steps: int | None = None
    #: Sample-level DP runs only: Adam learning rate (None: the shared one). DP-SGD's noise
    #: makes every Adam step partly a random step of size ~lr, so DP usually wants its own lr;
    #: choose it on training data (see ``docs/results.md``), never on the test split.
    dp_learning_rate: float | None = None
    #: Sample-level DP runs only: augmentation multiplicity K (each tile's gradient averaged
    #: over K augmented crops before clipping; same accounting, K times the compute). None: 1.
    dp_augmentations: int | None = None
    #: Steps of public pretraining (:mod:`~experiments.pretraining`: the CC0 sample
    #: slide with colour-deconvolution pseudo-labels, no DP, not counted in any setting's budget);
    #: every setting starts from that model. 0 (the default): a seeded random init. Public
    #: pretraining (500 steps) is measured in ``docs/results.md`` and not used by default.
    pretrain_steps: int = 0
    #: The public pretraining data: None or ``"cmu1"`` (the CC0 sample slide, pseudo-labels),
    #: ``"tnbc"`` (the annotated TNBC set; foreground-only models).
    pretrain_data: str | None = None
    #: Three classes (background, nucleus, contour): the model outlines each nucleus, so
    #: touching nuclei are separated (targets from each hospital's ``instances/``). False:
    #: foreground only, nuclei split by a distance watershed. Sets ``settings.n_classes``.
    contours: bool = True
    #: Model selection on training data: this hospital is left out of every setting and its
    #: training tiles (at their own 0.25 µm/px) replace the test split. None: the real grid.
    holdout: str | None = None

    def __post_init__(self) -> None:
        classes = 3 if self.contours else 2
        if self.settings.n_classes != classes:
            self.settings = self.settings.replace(n_classes=classes)
        if self.settings.max_steps < 1:
            raise SettingsError([("max-steps", "the budget counts local steps: expected at least 1 per round, "
                                               f"received {self.settings.max_steps}")])

    def for_sample_dp(self) -> Budget:
        """The budget a sample-level DP run uses (its own batch, local steps and lr, if set)."""
        changes = {name: value for name, value in (("batch_size", self.dp_batch_size),
                                                    ("max_steps", self.dp_local_steps),
                                                    ("learning_rate", self.dp_learning_rate),
                                                    ("augmentation_multiplicity", self.dp_augmentations)) if value}
        return replace(self, settings=self.settings.replace(**changes))

    @property
    def total_steps(self) -> int:
        return self.settings.num_rounds * len(self.hospitals) * self.settings.max_steps

    def as_record(self) -> dict[str, Any]:
        """The budget as a run's JSON holds it (what :func:`same_budget` compares kept runs by).

        The shared settings under :data:`RECORD_KEYS` (any other setting only where it differs
        from its default; the classes are recorded as ``contours``), then the experiment's fields.
        """
        shared = self.settings.model_dump()
        record = {key: shared.pop(name) for key, name in RECORD_KEYS.items()}
        del shared["n_classes"]
        record.update({name: value for name, value in shared.items()
                       if value != RunSettings.model_fields[name].default})
        for own in (f.name for f in fields(self) if f.name != "settings"):
            value = getattr(self, own)
            record[own] = list(value) if isinstance(value, tuple) else value
        return record


def quick_budget() -> Budget:
    """A few-minute smoke run: tiny crops, 1 round, 2 hospitals, 2 test images."""
    return Budget(settings=_grid_settings().replace(num_rounds=1, max_steps=2, batch_size=4, crop_size=64,
                                                    model_depth=3, model_groups=4),
                  hospitals=("h1-breast", "h2-kidney"), max_tiles=1, timeout=300.0)


def noise_for_epsilon(epsilon: float, n_examples: int, settings: RunSettings) -> float:
    """DP-SGD noise multiplier reaching (just under) ``epsilon`` after all rounds of a hospital."""
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    sample_rate = 1.0 / math.ceil(n_examples / settings.batch_size)  # as training.plan_round
    with warnings.catch_warnings():
        # The search probes very large noise, where RDP's largest order is optimal: harmless
        # (as in training.derive_noise_multiplier).
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(
            target_epsilon=epsilon * 0.99, target_delta=settings.target_delta, sample_rate=sample_rate,
            steps=settings.num_rounds * settings.max_steps, accountant="rdp", epsilon_tolerance=0.005))


# --------------------------------------------------------------------------- evaluation

#: Object scores recorded per run when the test folder has per-nucleus annotations.
OBJECT_SCORES = ("aji", "pq", "dq", "sq", "f1")


def score(checkpoint: Path, test_dir: Path, names: tuple[str, ...] | None) -> dict[str, Any]:
    """Pooled Dice / Jaccard / accuracy of a checkpoint on the test folder (0.25 µm/px)."""
    from napari_feddp.evaluation import evaluate_folder
    from napari_feddp.segmentation import load_model

    report = evaluate_folder(test_dir, load_model(str(checkpoint)), mpp=0.25,
                             names=list(names) if names else None)
    objects = {k: report.instances[k] for k in OBJECT_SCORES} if report.instances else {}
    return {"dice": report.dice, "jaccard": report.jaccard, "accuracy": report.accuracy, **objects,
            "n_images": report.n_images, "seconds": round(report.seconds, 1)}


# --------------------------------------------------------------------------- training


def _card(settings: RunSettings, name: str, training_data: str):
    from napari_feddp.models import default_card

    return default_card(name=name, mpp=settings.mpp, tile_size=settings.crop_size, training_data=training_data,
                        **settings.unet_params)


def train_direct(folder: Path, steps: int, settings: RunSettings, seed: int, out: Path, name: str, *,
                 noise: float | None = None, init: Path | None = None) -> Path:
    """Training without federation with ``train_local``: ``steps`` steps of the lab round
    ``settings`` describe (model, crop, batch, lr, clipping) on ``folder``; returns the checkpoint.

    ``noise``: DP-SGD with that noise multiplier (per-sample clipping at ``settings.max_grad_norm``,
    no ledger and no epsilon limit: for experiments on training data only); None trains without DP.
    """
    import torch

    from napari_feddp.federation.settings import NodeSettings
    from napari_feddp.models import UNet, save_checkpoint
    from napari_feddp.models.build import IMAGENET_MEAN, IMAGENET_STD
    from napari_feddp.training import SegmentationDataset, train_local

    torch.manual_seed(seed)
    model = UNet(**settings.unet_params)
    if init is not None:
        model.load_state_dict(_initial_weights(init, settings))
    # The patches are prepared at the model's pixel size.
    dataset = SegmentationDataset(folder, crop_size=settings.crop_size, source_mpp=settings.mpp,
                                  target_mpp=settings.mpp, n_classes=settings.n_classes,
                                  rim_fraction=settings.rim_fraction, normalization=(IMAGENET_MEAN, IMAGENET_STD))
    run = settings.replace(max_steps=steps, dp_mode="sample" if noise else "none",
                           noise_multiplier=noise or settings.noise_multiplier)
    # Seeded (a federated round draws fresh noise and crops): every run of the grid is reproducible.
    config = run.train_config(NodeSettings(max_delta=run.target_delta, max_epsilon=0)).model_copy(
        update={"seed": seed})
    result = train_local(model, dataset, config)
    model.load_state_dict(result.state_dict)
    return save_checkpoint(out / f"{name}.safetensors", model, _card(settings, name, str(folder.name)))


def train_federated(folders: dict[str, Path], budget: Budget, *, dp_mode: str, noise: float, update_noise: float,
                    epsilon_budget: float, seed: int, out: Path, name: str,
                    init: Path | None = None) -> tuple[Path, list[dict]]:
    """One run through Flower (SuperLink + one SuperNode per hospital, TLS, loopback)."""
    from napari_feddp.federation.pilot import LocalFederation

    if dp_mode == "sample":
        folders = _ledger_folders(budget, folders, out)
    labs = hospital_labs(budget.hospitals, folders, dp_mode, epsilon_budget)
    settings = budget.settings.replace(
        min_clients=len(labs), min_updates=len(labs), dp_mode=dp_mode,
        noise_multiplier=noise if dp_mode == "sample" else 1.0, update_noise_multiplier=update_noise,
        source_mpp=budget.settings.mpp, seed=seed, checkpoint_dir=str(out / "checkpoints"), model_name=name,
        final_evaluation=False, resume_from=str(Path(init).resolve()) if init is not None else "",
        round_timeout=budget.timeout, node_wait_timeout=300.0)
    workdir = out / "flower"
    with LocalFederation(workdir=workdir, labs=labs, threads=1) as federation:
        outcome = federation.run(settings, timeout=budget.timeout,
                                 on_round=lambda r: print(f"  [{name}] round {r.get('round')}: "
                                                          f"loss={r.get('train_loss')} eps={r.get('epsilon_max')}",
                                                          flush=True))
    _all_rounds_aggregated(name, outcome.rounds, settings.num_rounds)
    return outcome.checkpoint_dir / "final.safetensors", outcome.rounds


def train_distributed(folders: dict[str, Path], budget: Budget, *, noise: float, epsilon_budget: float, seed: int,
                      out: Path, name: str, init: Path | None = None) -> tuple[Path, list[dict]]:
    """A distributed-noise run in one process: ``rounds x local_steps`` rounds of one DP-SGD step each."""
    from napari_feddp.federation.settings import NodeSettings

    from .inprocess import run_in_process

    folders = _ledger_folders(budget, folders, out)
    steps = budget.settings.num_rounds * budget.settings.max_steps
    settings = budget.settings.replace(
        num_rounds=steps, max_steps=1, min_clients=len(budget.hospitals), min_updates=len(budget.hospitals),
        dp_mode="sample", dp_noise="distributed", secure_aggregation="on", noise_multiplier=noise,
        source_mpp=budget.settings.mpp, seed=seed, checkpoint_dir=str(out / "checkpoints"), model_name=name,
        final_evaluation=False, resume_from=str(Path(init).resolve()) if init is not None else "")
    labs = [NodeSettings(lab=h, data_dir=str(folders[h]), ledger_dir=str(out / "ledgers"), max_epsilon=epsilon_budget,
                         accept_dp_modes="sample", min_noise_multiplier=0.0, max_noise_split=len(budget.hospitals),
                         model_store=str(out / "stores" / h), threads=max(1, os.cpu_count() or 1))
            for h in budget.hospitals]  # fmt: skip
    _, strategy = run_in_process(settings, labs, run_id=seed + 1)
    rounds = [report.to_dict() for _, report in sorted(strategy.reports.items())]
    _all_rounds_aggregated(name, rounds, settings.num_rounds)
    return Path(settings.checkpoint_dir) / "final.safetensors", rounds


def _all_rounds_aggregated(name: str, rounds: list[dict], planned: int) -> None:
    """Refuse a run that trained fewer rounds than its budget: its scores would not be the budget's.

    In a deployment a round without enough updates leaves the global model unchanged and the
    federation goes on; in an experiment every hospital is simulated, so such a round is a fault
    (a lab declining, e.g. its ledger already spent) that would silently shorten the run.
    """
    aggregated = sum(1 for r in rounds if r.get("aggregated"))
    if aggregated < planned:
        first = next((r for r in rounds if not r.get("aggregated")), {})
        raise RuntimeError(
            f"{name}: {aggregated} of {planned} rounds aggregated; round {first.get('round')} was not "
            f"(failed: {first.get('failed')}, declined: {first.get('declined')}, note: {first.get('note')})")


def _ledger_folders(budget: Budget, folders: dict[str, Path], out: Path) -> dict[str, Path]:
    """Each hospital's images/, masks/ and instances/ linked into a folder of this run.

    A DP-SGD dataset is bound to the privacy ledger that first used it (a marker in DIR/.feddp),
    so a second run on the same folder would (rightly) be refused. Each experiment run is a
    separate hypothetical deployment.
    """
    fresh = {}
    for h in budget.hospitals:
        fresh[h] = out / "data" / h
        fresh[h].mkdir(parents=True, exist_ok=True)
        for sub in ("images", "masks", "instances"):
            link = fresh[h] / sub
            if not link.exists() and (Path(folders[h]) / sub).is_dir():
                link.symlink_to(Path(folders[h]).resolve() / sub, target_is_directory=True)
    return fresh


def hospital_labs(hospitals, folders: dict[str, Path], dp_mode: str, epsilon_budget: float) -> list:
    """The simulated hospitals of a run, as :class:`~napari_feddp.federation.pilot.LabSpec`.

    The researcher plays every hospital and chooses each setting's DP mode and noise, so their
    policy accepts exactly what the setting asks (a real lab's default accepts DP-SGD only, with
    a minimum noise the clipping-only diagnostic is below).
    """
    from napari_feddp.federation.pilot import LabSpec

    policy = {"accept_dp_modes": dp_mode, "min_noise_multiplier": 0.0}
    return [LabSpec(name=h, data_dir=folders[h], max_epsilon=epsilon_budget if dp_mode == "sample" else 0.0,
                    policy=policy) for h in hospitals]


# --------------------------------------------------------------------------- one setting


def fresh_workdir(out: Path, setting: str, seed: int) -> Path:
    """An empty ``out/runs/<setting>-s<seed>`` for a run about to start.

    A folder left there belongs to a run that never wrote its record (interrupted) or is
    being replaced (``--rerun``); its privacy ledgers would make the new run start with that
    run's spending, and its checkpoints could be mistaken for the new run's.
    """
    work = out / "runs" / f"{setting}-s{seed}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def run_setting(setting: str, *, budget: Budget, folders: dict[str, Path], test_dir: Path, seed: int,
                out: Path, init: Path | None = None) -> dict[str, Any]:
    """Train and score one setting with one seed; writes ``out/<setting>-s<seed>.json``."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; expected one of {SETTINGS}")
    work = fresh_workdir(out, setting, seed)
    started = time.monotonic()
    shared = budget  # recorded: the grid's budget, which kept runs are compared against
    if setting in SAMPLE_DP:
        budget = budget.for_sample_dp()
    record: dict[str, Any] = {"setting": setting, "seed": seed, "budget": shared.as_record(),
                              "total_steps": budget.total_steps,
                              "examples_seen": budget.total_steps * budget.settings.batch_size}
    if setting in SAMPLE_DP:
        record.update(dp_batch_size=budget.settings.batch_size, dp_local_steps=budget.settings.max_steps,
                      dp_learning_rate=budget.settings.learning_rate)
    n_examples = {h: len(os.listdir(folders[h] / "images")) for h in budget.hospitals}
    if setting == "pretrained":
        # The shared starting point itself: public data only, no MoNuSeg training.
        if init is None:
            raise ValueError("setting 'pretrained' scores the public-pretrained initial model; "
                             "the budget has pretrain_steps = 0")
        record.update(score(init, test_dir, budget.test_names), checkpoint=str(init), epsilon=None,
                      total_steps=0, examples_seen=0, pretrain_steps=budget.pretrain_steps)
    elif setting == "centralized":
        ckpt = train_direct(folders["pooled"], budget.total_steps, budget.settings, seed, work, "centralized",
                            init=init)
        record.update(score(ckpt, test_dir, budget.test_names), checkpoint=str(ckpt), epsilon=None)
    elif setting == "local":
        per = {}
        for h in budget.hospitals:
            ckpt = train_direct(folders[h], budget.settings.num_rounds * budget.settings.max_steps, budget.settings,
                                seed, work, f"local-{h}", init=init)
            per[h] = score(ckpt, test_dir, budget.test_names)
        worst = min(per, key=lambda h: per[h]["dice"])
        averaged = [k for k in ("dice", "jaccard", "accuracy", *OBJECT_SCORES) if all(k in p for p in per.values())]
        record.update({k: sum(p[k] for p in per.values()) / len(per) for k in averaged})
        record.update(worst=worst, worst_dice=per[worst]["dice"], worst_jaccard=per[worst]["jaccard"],
                      worst_accuracy=per[worst]["accuracy"], per_hospital=per, epsilon=None)
    else:
        dp_mode, noise, update_noise, eps_budget = "none", 1.0, 0.0, 0.0
        if setting in DP_EPSILONS:
            dp_mode, eps_budget = "sample", DP_EPSILONS[setting]
            noise = noise_for_epsilon(eps_budget, min(n_examples.values()), budget.settings)
        elif setting == "feddp-clip":
            dp_mode, noise = "sample", CLIP_ONLY_NOISE  # eps_budget 0: the labs set no limit
        elif setting == "feddp-update":
            # "Comparable noise": the eps-8 sample-level noise multiplier, applied to the
            # aggregate of clipped client updates (Flower's client-side fixed clipping).
            dp_mode = "update"
            update_noise = noise_for_epsilon(8.0, min(n_examples.values()), budget.settings)
        if setting in DISTRIBUTED:
            dp_mode, eps_budget = "sample", DISTRIBUTED[setting]
            noise = noise_for_epsilon(eps_budget, min(n_examples.values()), budget.settings)
            ckpt, rounds = train_distributed(folders, budget, noise=noise, epsilon_budget=eps_budget, seed=seed,
                                             out=work, name=setting, init=init)
        else:
            ckpt, rounds = train_federated(folders, budget, dp_mode=dp_mode, noise=noise, update_noise=update_noise,
                                           epsilon_budget=eps_budget, seed=seed, out=work, name=setting, init=init)
        # The clipping-only diagnostic gives no guarantee: the accountant's astronomical epsilon
        # for its negligible noise is not a privacy claim, so none is recorded.
        guarantee = dp_mode != "none" and setting != "feddp-clip"
        per_round = []
        for row in rounds:
            entry = {"round": row.get("round"), "train_loss": row.get("train_loss"),
                     "train_dice": row.get("train_dice"), "epsilon": row.get("epsilon_max") if guarantee else None,
                     "seconds": row.get("seconds")}
            round_ckpt = ckpt.parent / f"round-{int(row['round']):03d}.safetensors"
            if budget.round_eval_names and round_ckpt.is_file():
                entry["test_subset"] = score(round_ckpt, test_dir, budget.round_eval_names)
            per_round.append(entry)
        epsilons = [r["epsilon"] for r in per_round if r.get("epsilon") is not None]
        record.update(score(ckpt, test_dir, budget.test_names), checkpoint=str(ckpt), rounds=per_round,
                      dp_mode=dp_mode, noise_multiplier=noise if dp_mode == "sample" else None,
                      update_noise_multiplier=update_noise if dp_mode == "update" else None,
                      epsilon=max(epsilons) if epsilons else None,
                      delta=budget.settings.target_delta if guarantee else None,
                      epsilon_unit=(None if not guarantee else "patch (sample-level)" if dp_mode == "sample" else
                                    "hospital (client-level, no client sampling)"))
    if setting in DISTRIBUTED:
        record.update(dp_noise="distributed", noise_split=len(budget.hospitals),
                      threat_model="every hospital honest in every sum; the coordinator follows SecAgg+ "
                                   "(docs/privacy.md, distributed noise)")
    record["seconds"] = round(time.monotonic() - started, 1)
    path = out / f"{setting}-s{seed}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def _initial_weights(path: Path, settings: RunSettings) -> dict[str, Any]:
    """The weights of checkpoint ``path``, checked against the settings' architecture."""
    from napari_feddp.models import load_checkpoint

    model, card = load_checkpoint(str(path))
    if any(card.architecture.params.get(k) != v for k, v in settings.unet_params.items()):
        raise ValueError(f"initial model {path}: architecture {card.architecture.params} does not match "
                         f"the budget's {settings.unet_params}")
    return model.state_dict()


def run_grid(out: str | os.PathLike, *, settings: list[str] | None = None, seeds: int = 1, quick: bool = False,
             budget: Budget | None = None, data: str | os.PathLike | None = None,
             scratch: str | os.PathLike | None = None, rerun: bool = False) -> list[dict[str, Any]]:
    """Run ``settings`` x ``seeds``; writes one JSON per run, ``summary.json``, table and plots.

    A (setting, seed) whose ``<setting>-s<seed>.json`` is already in ``out`` with the same
    budget is kept, not run again (so a grid can be extended with more seeds or settings),
    unless ``rerun``. A record made with another budget is an error: mixing budgets in one
    table would compare unlike runs.
    """
    from .report import write_report

    budget = budget or (quick_budget() if quick else Budget())
    if settings and "pretrained" in settings and not budget.pretrain_steps:
        raise ValueError("setting 'pretrained' scores the public-pretrained initial model: "
                         "give --pretrain-steps N (N > 0)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(data) if data else find_monuseg()
    test_dir = data_root / "test"
    if budget.holdout:
        budget, test_dir = _holdout(budget, data_root / "train", out / f"holdout-{budget.holdout}")
    if quick and budget.test_names is None:
        names = first_test_names(test_dir, 2)
        budget = replace(budget, test_names=tuple(names), round_eval_names=tuple(names[:1]))
    scratch = Path(scratch) if scratch else out / "hospitals"
    folders = prepare_hospitals(data_root / "train", scratch, hospitals=list(budget.hospitals),
                                target_mpp=budget.settings.mpp, grid=budget.grid, max_tiles=budget.max_tiles)
    chosen = settings or (["pretrained", "centralized", "fedavg", "feddp-eps8"] if quick else list(GRID))
    init = None
    if budget.pretrain_steps:
        from .pretraining import pretrain_public

        source = "the TNBC set" if budget.pretrain_data == "tnbc" else "the CC0 sample slide"
        print(f"== public pretraining ({budget.pretrain_steps} steps on {source})", flush=True)
        init = pretrain_public(out / "pretrained", budget)
    else:
        chosen = [s for s in chosen if s != "pretrained"]  # random init: nothing to score
    records = []
    wanted = budget.as_record()
    for seed in range(seeds):
        for setting in chosen:
            if setting == "pretrained" and seed > 0:
                continue  # one shared initial model: scoring it again per seed would add nothing
            done = out / f"{setting}-s{seed}.json"
            if done.is_file() and not rerun:
                record = json.loads(done.read_text())
                if not same_budget(record.get("budget", {}), wanted, setting):
                    raise ValueError(
                        f"{done} was made with another budget; use another --out, or --rerun to replace it")
                print(f"== {setting} (seed {seed}): kept {done.name}, Dice {record['dice']:.4f}", flush=True)
                records.append(record)
                continue
            print(f"== {setting} (seed {seed})", flush=True)
            record = run_setting(setting, budget=budget, folders=folders, test_dir=test_dir, seed=seed, out=out,
                                 init=init)
            print(f"   Dice {record['dice']:.4f}  Jaccard {record['jaccard']:.4f}  Acc {record['accuracy']:.4f}"
                  f"  eps {record.get('epsilon')}  ({record['seconds']:.0f} s)", flush=True)
            records.append(record)
    write_report(out)
    return records


def _holdout(budget: Budget, train_dir: Path, folder: Path) -> tuple[Budget, Path]:
    """The budget without ``budget.holdout`` and a validation folder of that hospital's tiles.

    The validation folder links the held-out hospital's MoNuSeg *training* tiles (images and
    masks, 0.25 µm/px), so a recipe can be chosen without touching the test split.
    """
    from napari_feddp.federation.sites import split_by_site
    from napari_feddp.training._io import find_instance_map
    from napari_feddp.training.dataset import find_pairs

    if budget.holdout not in budget.hospitals:
        raise ValueError(f"holdout {budget.holdout!r} is not one of the budget's hospitals {list(budget.hospitals)}")
    kept = tuple(h for h in budget.hospitals if h != budget.holdout)
    if not kept:
        raise ValueError("holdout: no hospital would be left to train on")
    pairs = find_pairs(train_dir)
    held = set(split_by_site([p.name for p in pairs], HOSPITALS)[budget.holdout])
    pairs = [p for p in pairs if p.name in held]
    if not pairs:
        raise ValueError(f"holdout {budget.holdout!r}: none of its tiles is in {train_dir}")
    for pair in pairs:
        instance_path = find_instance_map(train_dir, pair.name)
        for sub, source in (("images", pair.image_path), ("masks", pair.mask_path), ("instances", instance_path)):
            if source is None:
                continue
            link = folder / sub / source.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(source.resolve())
    round_eval = first_test_names(folder, len(budget.round_eval_names)) if budget.round_eval_names else None
    return replace(budget, hospitals=kept, round_eval_names=round_eval, test_names=None), folder


def first_test_names(test_dir: Path, n: int | None = None) -> tuple[str, ...]:
    """The first ``n`` image stems of a test folder in sorted order (all when ``n`` is None):
    the subsets used for per-round scoring and the model card's ``subset3_*``."""
    return tuple(sorted(p.stem for p in (Path(test_dir) / "images").iterdir())[:n])


def same_budget(kept: dict[str, Any], wanted: dict[str, Any], setting: str) -> bool:
    """Whether a finished run's recorded budget (``kept``) is the one a grid now asks for."""
    # A record without ``pretrain_steps`` started from a random init (``pretrain_steps = 0``).
    kept = _relevant({"pretrain_steps": 0, **kept}, setting)
    # Fields added later with a None default do not make an older record different.
    return kept == {k: v for k, v in _relevant(wanted, setting).items() if k in kept or v is not None}


def _relevant(budget: dict[str, Any], setting: str) -> dict[str, Any]:
    """The budget fields a run of ``setting`` depends on: the ``dp_*`` fields only matter to
    sample-level DP runs (a FedAvg record without ``dp_learning_rate`` matches a budget that sets one)."""
    if setting in SAMPLE_DP:
        return dict(budget)
    return {k: v for k, v in budget.items() if not k.startswith("dp_")}


def shared_data() -> Path:
    """The shared data folder: ``$FEDDP_SHARED_DATA``, or ``shared/data`` beside the checkout."""
    return Path(os.environ.get("FEDDP_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def find_monuseg() -> Path:
    """MoNuSeg (``train/``, ``test/``) in the :func:`shared_data` folder."""
    found = shared_data() / "monuseg"
    if not (found / "test" / "images").is_dir():
        raise FileNotFoundError(f"MoNuSeg not found in {found}: pass --data (folder with train/ and test/) "
                                "or set FEDDP_SHARED_DATA")
    return found


__all__ = ["Budget", "CLIP_ONLY_NOISE", "DP_EPSILONS", "GRID", "RECORD_KEYS", "SAMPLE_DP", "SETTINGS", "SWEEP_ONLY",
           "find_monuseg", "first_test_names", "noise_for_epsilon", "quick_budget", "run_grid", "run_setting",
           "same_budget", "train_direct"]
