"""Horizontal-vertical (HoVer-Net) maps measured against the foreground-only model, on training data.

A HoVer-Net-style model (Graham et al. 2019) predicts, besides nucleus / background, two maps
per pixel: the horizontal and the vertical distance of the pixel to its nucleus's centre,
scaled to [-1, 1] within each nucleus. The maps jump from +1 to -1 between two touching nuclei,
so their gradient marks where to cut; a marker-controlled watershed (scikit-image) cuts there.

This module trains such a model with the grid's budget (the U-Net of ``RunSettings`` with four
output channels: two class logits and the two maps), with or without DP-SGD (Opacus, per-sample
clipping and noise), and scores it beside foreground-only checkpoints on a held-out hospital's
tiles (``python -m experiments run --holdout``), never on the test split. Every model is scored
the same way: the whole tile at the model's pixel size in one forward pass.

    python -m experiments.hover --train runs/val-h5/fg/hospitals/pooled \\
        --val runs/val-h5/fg/holdout-h5-mixed --out runs/val-h5/hover \\
        --compare fg-centralized=runs/val-h5/fg/runs/centralized-s0/centralized.safetensors

writes ``OUT/<head>-<mode>-s<seed>.{json,safetensors}`` (mode ``centralized`` or ``eps<E>`` with
``--epsilon``) and merges the scores into ``benchmarks/results/hover_maps.json``. A second call
with the same output scores the saved weights again. ``--head foreground`` trains the product's
two-class model with the same loop, for comparisons under DP.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_feddp.training.dataset import SegmentationDataset
from napari_feddp.training.losses import DiceCELoss
from napari_feddp.training.metrics import IGNORE_INDEX

#: Output channels: background and nucleus logits, then the horizontal and vertical maps.
CHANNELS = 4


# --------------------------------------------------------------------------- targets


def hv_maps(instances: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical maps ``(B, 2, H, W)`` of instance maps ``(B, H, W)`` (0 and
    :data:`IGNORE_INDEX`: no nucleus).

    Inside each nucleus, a pixel's column (row) minus the nucleus centroid's, divided by the
    largest such offset on the same side of the centroid: -1 at the nucleus's left (top)
    edge, +1 at its right (bottom) edge; 0 outside nuclei.
    """
    if instances.ndim != 3:
        raise ValueError(f"hv_maps: expected instance maps (B, H, W), received shape {tuple(instances.shape)}")
    b, h, w = instances.shape
    ids = instances.clamp(min=0).long()
    n = int(ids.max()) + 1
    flat = (ids + torch.arange(b, device=ids.device).view(b, 1, 1) * n).flatten()
    inside = (ids > 0).flatten()
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=ids.device),
                            torch.arange(w, dtype=torch.float64, device=ids.device), indexing="ij")
    count = torch.bincount(flat, minlength=b * n).clamp(min=1).double()
    maps = []
    for coords in (xs, ys):
        coords = coords.expand(b, h, w).flatten()
        centre = torch.bincount(flat, weights=coords, minlength=b * n) / count
        offset = coords - centre[flat]
        zeros = torch.zeros(b * n, dtype=torch.float64, device=ids.device)
        right = zeros.scatter_reduce(0, flat, offset, "amax")
        left = zeros.scatter_reduce(0, flat, offset, "amin")
        scaled = torch.where(offset > 0, offset / right[flat].clamp(min=1e-12),
                             torch.where(offset < 0, offset / (-left[flat]).clamp(min=1e-12), offset * 0))
        maps.append(torch.where(inside, scaled, 0.0).view(b, h, w))
    return torch.stack(maps, 1).float()


def _sobel(maps: torch.Tensor) -> torch.Tensor:
    """``d/dx`` of channel 0 and ``d/dy`` of channel 1 of ``(B, 2, H, W)`` (5x5 Sobel, as HoVer-Net)."""
    smooth = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=maps.dtype, device=maps.device)
    diff = torch.tensor([-1.0, -2.0, 0.0, 2.0, 1.0], dtype=maps.dtype, device=maps.device)
    kx = (smooth[:, None] * diff[None, :]) / (smooth.sum() * (diff.abs().sum() / 2 + 1))
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)
    return F.conv2d(F.pad(maps, (2, 2, 2, 2), mode="replicate"), kernels, groups=2)


def _classes(target: torch.Tensor) -> torch.Tensor:
    """Nucleus / background targets of instance maps (:data:`IGNORE_INDEX` kept)."""
    return torch.where(target != IGNORE_INDEX, (target > 0).long(), IGNORE_INDEX)


class HoverLoss(nn.Module):
    """Per-sample ``DiceCE(classes) + MSE(maps) + MSGE(map gradients inside nuclei)``.

    The target is an instance map ``(B, H, W)`` (0 background, :data:`IGNORE_INDEX` outside the
    tile); every term is normalised by the sample's own pixel counts, so the batch loss is a
    mean of per-sample losses (what DP-SGD's per-sample clipping needs).
    """

    def __init__(self, map_weight: float = 1.0, gradient_weight: float = 1.0) -> None:
        super().__init__()
        self.classes = DiceCELoss()
        self.map_weight, self.gradient_weight = map_weight, gradient_weight

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_sample(output, target).mean()

    def per_sample(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.ndim != 4 or output.shape[1] != CHANNELS or target.shape != (output.shape[0], *output.shape[2:]):
            raise ValueError(f"HoverLoss: expected output (B, {CHANNELS}, H, W) and target (B, H, W), "
                             f"received {tuple(output.shape)} and {tuple(target.shape)}")
        valid = target != IGNORE_INDEX
        loss = self.classes.per_sample(output[:, :2], _classes(target))
        maps, truth = output[:, 2:], hv_maps(target)
        n_valid = valid.flatten(1).sum(1).clamp(min=1)
        mse = ((maps - truth) ** 2 * valid.unsqueeze(1)).flatten(1).sum(1) / (2 * n_valid)
        nuclei = (target > 0).unsqueeze(1)
        msge = ((_sobel(maps) - _sobel(truth)) ** 2 * nuclei).flatten(1).sum(1) / (2 * nuclei.flatten(1).sum(1) + 1)
        return loss + self.map_weight * mse + self.gradient_weight * msge


class InstanceDataset(SegmentationDataset):
    """:class:`SegmentationDataset` whose targets are the instance maps themselves (int64; 0
    background, :data:`IGNORE_INDEX` outside the tile): crops and flips / rotations move them
    with the image, and :class:`HoverLoss` derives the maps from them."""

    def __init__(self, dataset_dir, **kwargs: Any) -> None:
        super().__init__(dataset_dir, n_classes=3, **kwargs)

    def load_tile(self, tile: int) -> tuple[np.ndarray, np.ndarray]:
        if tile not in self._cache:
            image, instances = self.load_instances(tile)
            if not self.cache:
                return image, instances.astype(np.int32, copy=False)
            self._cache[tile] = image, instances.astype(np.int32, copy=False)
        return self._cache[tile]


# --------------------------------------------------------------------------- decoding

#: Decoder defaults, chosen on the held-out hospital (see ``docs/results.md``).
MAP_SMOOTHING_UM = 0.0
MARKER_THRESHOLD = 0.7
MIN_AREA_UM2 = 3.0
MIN_MARKER_UM2 = 4.0


def nuclei_from_maps(nucleus: np.ndarray, maps: np.ndarray, mpp: float, *, smoothing_um: float = MAP_SMOOTHING_UM,
                     marker_threshold: float = MARKER_THRESHOLD, min_area_um2: float = MIN_AREA_UM2,
                     min_marker_um2: float = MIN_MARKER_UM2) -> np.ndarray:
    """Instance labels (int32) from a nucleus probability ``(h, w)`` and the two maps ``(2, h, w)``.

    HoVer-Net's decoding: where the maps change fast (Sobel of each map, smoothed by
    ``smoothing_um``, each scaled to [0, 1]) is a border between nuclei; nucleus pixels below
    ``marker_threshold`` of that edge strength are markers, and a watershed on the edge strength
    grows them over the nucleus mask (probability > 0.5). Pieces below ``min_area_um2`` are dropped,
    markers below ``min_marker_um2`` too (their pixels join a neighbour).
    """
    from scipy import ndimage as ndi
    from skimage.filters import gaussian, sobel_h, sobel_v
    from skimage.measure import label
    from skimage.morphology import disk, remove_small_objects
    from skimage.segmentation import watershed

    from napari_feddp.inference.instances import grow_markers

    min_pixels = max(1, round(min_area_um2 / mpp**2))
    mask = nucleus > 0.5
    mask = remove_small_objects(mask, max_size=min_pixels - 1) if min_pixels > 1 else mask
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    sigma = smoothing_um / mpp
    edges = []
    for channel, derivative in ((maps[0], sobel_v), (maps[1], sobel_h)):  # d/dx of h, d/dy of v
        smoothed = gaussian(channel.astype(np.float64), sigma=sigma) if sigma > 0 else channel.astype(np.float64)
        magnitude = np.abs(derivative(smoothed))
        span = magnitude.max() - magnitude.min()
        edges.append((magnitude - magnitude.min()) / span if span > 0 else np.zeros_like(magnitude))
    edge = np.maximum(*edges) * mask
    markers = mask & (edge < marker_threshold)
    markers = ndi.binary_fill_holes(ndi.binary_opening(markers, structure=disk(1)))
    min_marker = round(min_marker_um2 / mpp**2)
    markers = label(remove_small_objects(markers, max_size=min_marker - 1) if min_marker > 1 else markers,
                    connectivity=1)
    labels = watershed(edge, markers, mask=mask) if markers.any() else markers
    return grow_markers(labels.astype(np.int32), mask)  # foreground without a marker: a nucleus of its own


# --------------------------------------------------------------------------- training


class ForegroundLoss(nn.Module):
    """The product's per-sample Dice + CE of a foreground-only model, on instance-map targets."""

    def __init__(self) -> None:
        super().__init__()
        self.classes = DiceCELoss()

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.classes(output, _classes(target))


#: Model heads: output channels and loss.
HEADS = {"hover": (CHANNELS, HoverLoss), "foreground": (2, ForegroundLoss)}


def build_model(settings, head: str = "hover") -> nn.Module:
    from napari_feddp.models import UNet

    return UNet(**{**settings.unet_params, "n_classes": HEADS[head][0]})


def train(folder: Path, settings, *, steps: int, seed: int, noise: float | None = None,
          head: str = "hover") -> tuple[nn.Module, dict]:
    """``steps`` Adam steps of the grid's batch / crop / lr on ``folder`` (seeded); with ``noise``,
    DP-SGD through Opacus (Poisson sampling, per-sample clipping at ``settings.max_grad_norm``).
    ``head``: ``"hover"`` or ``"foreground"`` (the product's two classes, trained by the same loop)."""
    from torch.utils.data import DataLoader

    from napari_feddp.models.build import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(seed)
    model = build_model(settings, head)
    dataset = InstanceDataset(folder, crop_size=settings.crop_size, source_mpp=settings.mpp,
                              target_mpp=settings.mpp, normalization=(IMAGENET_MEAN, IMAGENET_STD), seed=seed)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    loss_fn, engine, trained = HEADS[head][1](), None, model
    if noise:
        from napari_feddp.federation.settings import NodeSettings
        from napari_feddp.training.local import make_private

        run = settings.replace(max_steps=steps, dp_mode="sample", noise_multiplier=noise)
        config = run.train_config(NodeSettings(max_delta=run.target_delta, max_epsilon=0)).model_copy(
            update={"seed": seed})
        engine, trained, optimizer, loader = make_private(model, optimizer, loader, config, noise)
    trained.train()
    taken, losses, start = 0, [], time.perf_counter()
    while taken < steps:
        for images, targets in loader:
            if not len(images):  # an empty Poisson batch (DP-SGD): no update
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(trained(images), targets)
            with warnings.catch_warnings():  # Opacus' hooks on the first layer: harmless
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            taken += 1
            if taken >= steps:
                break
    record = {"steps": taken, "seconds": round(time.perf_counter() - start, 1), "noise_multiplier": noise,
              "final_loss": float(np.mean(losses[-20:]))}
    if engine is not None:
        record["epsilon"] = engine.get_epsilon(settings.target_delta)
        trained.cleanup()
    return model, record


# --------------------------------------------------------------------------- scoring


def predict(model: nn.Module, image: np.ndarray, source_mpp: float, mpp: float) -> np.ndarray:
    """Raw output ``(C, h, w)`` of ``model`` on an RGB tile resampled to ``mpp`` (one forward pass)."""
    from napari_feddp.models.build import IMAGENET_MEAN, IMAGENET_STD
    from napari_feddp.resampling import resize_image

    h, w = (round(s * source_mpp / mpp) for s in image.shape[:2])
    pixels = torch.from_numpy(resize_image(image, (h, w)).astype(np.float32) / 255.0).permute(2, 0, 1)
    pixels = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pad_y, pad_x = -h % model.size_multiple, -w % model.size_multiple
    pixels = F.pad(pixels.unsqueeze(0), (0, pad_x, 0, pad_y), mode="reflect")
    model.eval()
    with torch.no_grad():
        return model(pixels)[0, :, :h, :w].numpy()


def decode(kind: str, output: np.ndarray, mpp: float, **params: Any) -> np.ndarray:
    """Instances from a model's raw output: ``"hover"`` (maps) or ``"classes"`` (the product's decoding
    of a foreground-only or contour model's arg max)."""
    from napari_feddp.inference.instances import nuclei_from_classes

    if kind == "hover" and params.pop("foreground_split", False):  # the maps ignored
        return nuclei_from_classes(output[:2].argmax(0), mpp, **params)
    if kind == "hover":
        probability = torch.from_numpy(output[:2]).softmax(0)[1].numpy()
        return nuclei_from_maps(probability, output[2:], mpp, **params)
    return nuclei_from_classes(output.argmax(0), mpp, contour_class=2 if len(output) == 3 else None, **params)


def score_models(models: dict[str, tuple[str, nn.Module, float]], folder: Path, *, source_mpp: float = 0.25,
                 decoders: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Mean per-tile AJI / PQ / DQ / SQ and pooled Dice of each ``name -> (kind, model, mpp)``
    (and each decoder variant ``name -> params`` of the hover models) on ``folder``'s tiles."""
    from napari_feddp.resampling import resize_labels
    from napari_feddp.training._io import find_instance_map, read_image, read_instances
    from napari_feddp.training.dataset import find_pairs
    from napari_feddp.training.instance_metrics import instance_scores, mean_instance_scores

    results: dict[str, dict[str, Any]] = {}
    tiles = [(p, read_image(p.image_path), read_instances(find_instance_map(folder, p.name)))
             for p in find_pairs(folder, source_mpp=source_mpp)]
    for name, (kind, model, mpp) in models.items():
        variants = (decoders or {"": {}}) if kind == "hover" else {"": {}}
        outputs = [predict(model, image, source_mpp, mpp) for _, image, _ in tiles]
        fit = map_fit(outputs, [truth for _, _, truth in tiles]) if kind == "hover" else {}
        for variant, params in variants.items():
            per_tile, inter, total = [], 0, 0
            for (_, _, truth), output in zip(tiles, outputs, strict=True):
                labels = resize_labels(decode(kind, output, mpp, **params), truth.shape)
                per_tile.append(instance_scores(truth, labels))
                inter += int(((labels > 0) & (truth > 0)).sum())
                total += int((labels > 0).sum() + (truth > 0).sum())
            results[f"{name}{variant}"] = {**mean_instance_scores(per_tile), "dice": 2 * inter / max(total, 1),
                                           "n_images": len(tiles), **({"decoder": params} if params else {}), **fit}
    return results


def map_fit(outputs: list[np.ndarray], truths: list[np.ndarray]) -> dict[str, float]:
    """How well the predicted maps fit the true ones inside nuclei (at the model's pixel size):
    ``map_r2`` (1 - residual / total sum of squares about 0) and the mean absolute value of
    the predicted and of the true maps."""
    from napari_feddp.resampling import resize_labels

    residual = total = predicted = true = count = 0.0
    for output, truth in zip(outputs, truths, strict=True):
        instances = resize_labels(truth, output.shape[1:]).astype(np.int64)
        maps = hv_maps(torch.from_numpy(instances[None]))[0].numpy()
        inside = instances > 0
        residual += float(((output[2:] - maps) ** 2)[:, inside].sum())
        total += float((maps**2)[:, inside].sum())
        predicted += float(np.abs(output[2:])[:, inside].sum())
        true += float(np.abs(maps)[:, inside].sum())
        count += 2 * int(inside.sum())
    return {"map_r2": 1 - residual / total, "map_mean_abs": predicted / count, "true_map_mean_abs": true / count}


def load_checkpoint(path: Path) -> tuple[nn.Module, float]:
    from napari_feddp.segmentation import load_model

    loaded = load_model(str(path))
    return loaded.model, loaded.card.input.mpp


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file, save_file

    from experiments.runner import _grid_settings, noise_for_epsilon

    parser = argparse.ArgumentParser(prog="python -m experiments.hover", description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="training patches (a prepared pooled folder)")
    parser.add_argument("--val", type=Path, required=True, help="held-out tiles with instances/ (0.25 µm/px)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=400, help="Adam steps (the grid's centralized budget: 400)")
    parser.add_argument("--epsilon", type=float, help="train with DP-SGD at this epsilon (delta of the grid)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head", choices=sorted(HEADS), default="hover",
                        help="hover: classes and maps; foreground: the product's two classes, same loop")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/hover_maps.json"),
                        help="summary file the run's scores are merged into (by output file name)")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=CHECKPOINT",
                        help="foreground-only or contour checkpoints scored the same way")
    args = parser.parse_args(argv)
    settings = _grid_settings()
    args.out.mkdir(parents=True, exist_ok=True)
    mode = f"eps{args.epsilon:g}" if args.epsilon else "centralized"
    stem = args.out / f"{args.head}-{mode}-s{args.seed}"
    noise = None
    if args.epsilon:
        n = len(list((args.train / "images").iterdir()))
        noise = noise_for_epsilon(args.epsilon, n, settings.replace(num_rounds=1, max_steps=args.steps))
    weights = stem.with_suffix(".safetensors")
    if weights.exists():  # trained before: score again (e.g. other decoders)
        model = build_model(settings, args.head)
        model.load_state_dict(load_file(weights))
        record = json.loads(stem.with_suffix(".json").read_text())["training"]
    else:
        model, record = train(args.train, settings, steps=args.steps, seed=args.seed, noise=noise, head=args.head)
        save_file(model.state_dict(), weights)
    models = {args.head: ("hover" if args.head == "hover" else "classes", model, settings.mpp)}
    for item in args.compare:
        name, path = item.split("=", 1)
        models[name] = ("classes", *load_checkpoint(Path(path)))
    decoders = {f"-s{s:g}-m{m:g}-a{a:g}": {"smoothing_um": s, "marker_threshold": m, "min_marker_um2": a}
                for s in (0.0, 0.25) for m in (0.5, 0.7) for a in (1.0, 4.0, 10.0)}
    decoders["-foreground-split"] = {"foreground_split": True}
    scores = score_models(models, args.val, decoders=decoders)
    entry = {"training": record, "steps": args.steps, "seed": args.seed, "epsilon": args.epsilon,
             "train": str(args.train), "val": str(args.val), "compared": dict(c.split("=", 1) for c in args.compare),
             "scores": scores}
    stem.with_suffix(".json").write_text(json.dumps(entry, indent=2, allow_nan=False) + "\n")
    summary = json.loads(args.results.read_text()) if args.results.exists() else {}
    summary[str(stem)] = {**entry, "written": datetime.now(UTC).isoformat(timespec="seconds")}
    args.results.write_text(json.dumps(dict(sorted(summary.items())), indent=2, allow_nan=False) + "\n")
    best = max((k for k in scores if k.startswith(args.head)), key=lambda k: scores[k]["aji"])
    for name in [best, *(k for k in scores if not k.startswith(args.head))]:
        s = scores[name]
        print(f"{name:32s} AJI {s['aji']:.4f} PQ {s['pq']:.4f} Dice {s['dice']:.4f}")
    return 0 if all(math.isfinite(s["aji"]) for s in scores.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
