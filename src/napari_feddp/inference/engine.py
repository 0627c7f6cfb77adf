"""Segment a whole slide tile by tile: a generator that reports progress and can be cancelled.

Pipeline: tissue mask on a thumbnail -> tile plan (tiles touching tissue and the requested
region) -> tiles read and resampled on worker threads, a few batches ahead -> batched forward
pass (mixed precision on CUDA) -> softmax x window -> :class:`TileBlender` -> finished pixels
become labels -> :class:`ChunkWriter` writes each zarr chunk once. Nothing scales with the
slide's area except the (bounded) thumbnail; see :mod:`.blending` for what scales with its width.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import torch
import zarr

from ..slides import Slide
from ..slides._pyramid import lazy_pyramid
from ._malloc import keep_freed_memory
from ._output import ChunkWriter, create_output
from ._reader import TileReader, as_slide
from .blending import WINDOWS, TileBlender, tile_profiles, window_profile
from .device import autocast, select_device
from .errors import InferenceCancelled, InferenceError
from .spec import InferenceSpec
from .tiling import Geometry, TilePlan, choose_geometry, plan_tiles
from .tissue import TissueMask, detect_tissue

#: Largest overlap fraction accepted (above it nearly every pixel is predicted many times over).
MAX_OVERLAP = 0.9


@dataclass(frozen=True)
class Progress:
    """One progress report of a running segmentation.

    Attributes
    ----------
    done, total : int
        Tiles predicted so far and to predict (or windows, see ``unit``).
    elapsed_seconds : float
        Time since the run (or the step) started.
    eta_seconds : float or None
        Estimated time to finish; None until the first batch is done.
    stage : str
        ``"planning"`` (tissue detection), ``"predicting"``, ``"finished"`` or ``"cancelled"``;
        later steps add their own (e.g. ``"labelling nuclei"``, :mod:`napari_feddp.nuclei`).
    skipped : int
        Grid tiles never predicted (background, or outside the region).
    unit : str
        What ``done`` and ``total`` count: ``"tiles"`` or ``"windows"``.
    """

    done: int
    total: int
    elapsed_seconds: float
    eta_seconds: float | None
    stage: str
    skipped: int = 0
    unit: str = "tiles"

    @property
    def fraction(self) -> float:
        """``done / total`` in ``[0, 1]`` (0 while planning, when the total is not known yet)."""
        if self.total:
            return self.done / self.total
        return 0.0 if self.stage == "planning" else 1.0


@dataclass(eq=False)
class SegmentationResult:
    """Outcome of :func:`segment_slide`.

    Attributes
    ----------
    labels : zarr.Array
        ``(H, W)`` class indices at the processing resolution, 0 outside tissue and the
        region; its attributes hold the geometry and ``"complete"``.
    level : int
        Slide level that was read.
    downsample : (float, float)
        Level-0 pixels per label pixel ``(y, x)``.
    mpp : (float, float) or None
        Micrometres per label pixel.
    pyramid : list of dask.array.Array
        ``labels`` and lazily downsampled copies for display (nearest neighbour).
    complete : bool
        False when the run was cancelled: ``labels`` is then partial, never a segmentation.
    tissue : TissueMask or None
        Mask that selected the tiles.
    region : (y0, x0, y1, x1) or None
        Level-0 rectangle that was segmented (clipped to the slide).
    tiles_done, tiles_total, tiles_skipped : int
    class_names : tuple of str or None
    path : Path or None
        Directory of the zarr store when on disk.
    elapsed_seconds : float
    """

    labels: zarr.Array
    level: int
    downsample: tuple[float, float]
    mpp: tuple[float, float] | None
    pyramid: list[da.Array]
    complete: bool
    tissue: TissueMask | None
    region: tuple[int, int, int, int] | None
    tiles_done: int
    tiles_total: int
    tiles_skipped: int
    class_names: tuple[str, ...] | None
    path: Path | None
    elapsed_seconds: float
    _tempdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def layer_kwargs(self, units: str | None = None) -> dict:
        """Keyword arguments for ``viewer.add_labels(result.pyramid, **kwargs)``.

        Parameters
        ----------
        units : {"micrometer", "pixel"}, optional
            Coordinates of the slide layer it is drawn over: micrometres when the
            pixel size is known (default), else level-0 pixels.
        """
        if units is None:
            units = "micrometer" if self.mpp is not None else "pixel"
        if units not in ("micrometer", "pixel"):
            raise ValueError(f"units: expected 'micrometer' or 'pixel', received {units!r}")
        if units == "micrometer" and self.mpp is None:
            raise ValueError("units: 'micrometer' needs a pixel size, and this result has none")
        unit = (1.0, 1.0)
        if units == "micrometer":
            unit = (self.mpp[0] / self.downsample[0], self.mpp[1] / self.downsample[1])  # level-0 mpp
        scale = tuple(d * u for d, u in zip(self.downsample, unit))
        # A label pixel covers level-0 pixels [i d, (i + 1) d): its centre is at i d + (d - 1) / 2.
        translate = tuple((d - 1) / 2 * u for d, u in zip(self.downsample, unit))
        return {
            "scale": scale,
            "translate": translate,
            "name": "segmentation" if self.complete else "segmentation (incomplete)",
            "metadata": {
                "complete": self.complete,
                "class_names": list(self.class_names) if self.class_names else None,
                "downsample": list(self.downsample),
                "level": self.level,
            },
        }


def segment_slide(
    image: Any,
    model: torch.nn.Module,
    spec: InferenceSpec,
    *,
    region: Sequence[float] | None = None,
    tissue: bool | TissueMask | np.ndarray = True,
    batch_size: int = 8,
    overlap: float = 0.25,
    device: str | torch.device = "auto",
    out: str | os.PathLike | Any | None = None,
    overwrite: bool = False,
    cancel: Any = None,
    mpp: float | tuple[float, float] | None = None,
    num_workers: int | None = None,
    prefetch_batches: int = 2,
    window: str = "hann",
    mixed_precision: bool = True,
    mask_output: bool = True,
    augment: bool = False,
) -> Generator[Progress, None, SegmentationResult]:
    """Segment ``image`` with ``model``; a generator of :class:`Progress`.

    Parameters
    ----------
    image : Slide or array-like
        A slide from :func:`napari_feddp.slides.open_slide`, or a ``(Y, X, 3)`` uint8 array.
    model : torch.nn.Module
        Maps ``(B, 3, T, T)`` normalised images to logits ``(B, C, T, T)``. Moved to
        ``device`` and put in eval mode for the run (its mode is restored afterwards).
    spec : InferenceSpec
        Tile size, resolution and normalisation the model expects.
    region : (y0, x0, y1, x1), optional
        Level-0 rectangle to segment (clipped to the slide); the rest stays 0.
    tissue : bool, TissueMask or array
        True: predict only tiles touching detected tissue. False: every tile. A mask
        (any resolution, covering the slide) is used as given.
    batch_size : int
        Tiles per forward pass.
    overlap : float
        Fraction of a tile shared with each neighbour, in ``[0, 0.9]``.
    device : str or torch.device
        ``"auto"`` (CUDA, then MPS, then CPU) or an explicit device.
    out : path, zarr store or None
        Where to write the label map (see :func:`._output.create_output`).
    overwrite : bool
        Replace an existing store at ``out``.
    cancel : threading.Event or callable, optional
        Checked before every batch; when set the run stops with ``complete=False``.
    mpp : float or (float, float), optional
        Level-0 micrometres per pixel, for arrays or slides without one.
    num_workers : int, optional
        Threads reading tiles (0: in the calling thread). Default: 1 on the CPU (reading a
        tile costs a few ms against a forward pass of tens; more threads would steal cores
        from the model), else the CPU count, at most 4.
    prefetch_batches : int
        Batches read ahead of the one being predicted.
    window : {"hann", "gaussian"}
        Blending window.
    mixed_precision : bool
        Autocast the forward pass to bfloat16/float16 on CUDA.
    mask_output : bool
        Set labels outside the tissue mask to 0.
    augment : bool
        Test-time augmentation: every tile's class probabilities are the mean over its 8
        flips and 90-degree rotations (each mapped back), at 8 times the model time. Free in
        privacy (it only post-processes the model) and measured in ``docs/results.md``.

    Yields
    ------
    Progress
        First while planning, then after every batch, last ``"finished"`` or ``"cancelled"``.

    Returns
    -------
    SegmentationResult
        As the generator's return value (what napari's ``thread_worker`` emits as
        ``returned``); see :func:`run_to_completion`.

    Raises
    ------
    InferenceError
        Bad arguments (raised by this call), or, once running: no tissue found, no tile
        to predict, or a model output of the wrong shape.
    """
    slide = as_slide(image, mpp)
    _check_model(model, spec)
    _check_int("batch_size", batch_size, 1)
    _check_int("prefetch_batches", prefetch_batches, 0)
    if not isinstance(augment, bool):
        raise InferenceError(f"augment: expected True or False, received {augment!r}")
    if num_workers is not None:
        _check_int("num_workers", num_workers, 0)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap <= MAX_OVERLAP:
        raise InferenceError(f"overlap: expected a fraction of the tile in [0, {MAX_OVERLAP}], received {overlap!r}")
    if window not in WINDOWS:
        raise InferenceError(f"window: expected one of {WINDOWS}, received {window!r}")
    is_cancelled = _cancel_check(cancel)
    geometry = choose_geometry(slide, spec.mpp)
    clipped = _check_region(region, slide.shape)
    tissue_arg = _check_tissue(tissue, slide.shape)
    chosen_device = select_device(device)
    if chosen_device.type == "cpu":
        keep_freed_memory()  # glibc: reuse activation pages instead of faulting fresh ones in
    if num_workers is None:
        num_workers = 1 if chosen_device.type == "cpu" else min(4, os.cpu_count() or 1)
    run = _Run(slide, model, spec, geometry, clipped, tissue_arg, batch_size, float(overlap), chosen_device, out,
               overwrite, is_cancelled, num_workers, prefetch_batches, window, mixed_precision, mask_output, augment)
    return run.execute()


#: Views of a square tile for test-time augmentation: 4 rotations, each with and without a flip.
DIHEDRAL = 8


def _view(batch: torch.Tensor, t: int) -> torch.Tensor:
    """View ``t`` of a ``(B, C, T, T)`` batch: a 90-degree rotation ``t % 4`` times, flipped when ``t >= 4``."""
    out = torch.flip(batch, dims=(3,)) if t >= 4 else batch
    return torch.rot90(out, t % 4, dims=(2, 3))


def _unview(batch: torch.Tensor, t: int) -> torch.Tensor:
    """Map view ``t``'s prediction back onto the tile (inverse of :func:`_view`)."""
    out = torch.rot90(batch, -(t % 4), dims=(2, 3))
    return torch.flip(out, dims=(3,)) if t >= 4 else out


def run_to_completion(
    generator: Generator[Progress, None, SegmentationResult],
    *,
    allow_partial: bool = False,
    callback: Callable[[Progress], Any] | None = None,
) -> SegmentationResult:
    """Drain a :func:`segment_slide` generator and return its result.

    Parameters
    ----------
    generator
        From :func:`segment_slide`.
    allow_partial : bool
        Return a cancelled run's partial result instead of raising.
    callback : callable, optional
        Called with every :class:`Progress`.

    Raises
    ------
    InferenceCancelled
        If the run was cancelled and ``allow_partial`` is False (the partial result is ``.result``).
    """
    while True:
        try:
            progress = next(generator)
        except StopIteration as stop:
            result: SegmentationResult = stop.value
            break
        if callback is not None:
            callback(progress)
    if not result.complete and not allow_partial:
        raise InferenceCancelled(
            f"segmentation cancelled after {result.tiles_done} of {result.tiles_total} tiles; "
            "the partial label map is not a result",
            result,
        )
    return result


# --------------------------------------------------------------------------- checks


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InferenceError(f"{name}: expected an integer >= {minimum}, received {value!r}")


def _check_model(model: Any, spec: InferenceSpec) -> None:
    if not isinstance(spec, InferenceSpec):
        raise InferenceError(f"spec: expected an InferenceSpec, received {type(spec).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise InferenceError(f"model: expected a torch.nn.Module, received {type(model).__name__}")
    multiple = getattr(model, "size_multiple", 1)
    if isinstance(multiple, int) and multiple > 1 and spec.tile_size % multiple:
        raise InferenceError(f"spec.tile_size: the model needs a multiple of {multiple}, received {spec.tile_size}")


def _cancel_check(cancel: Any) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):
        return lambda: bool(cancel.is_set())
    if callable(cancel):
        return lambda: bool(cancel())
    raise InferenceError(
        f"cancel: expected a threading.Event, a callable returning bool or None, received {type(cancel).__name__}"
    )


def _check_region(region: Any, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Validate a level-0 ``(y0, x0, y1, x1)`` rectangle and clip it to the slide."""
    if region is None:
        return None
    try:
        values = [float(v) for v in region]
    except (TypeError, ValueError) as exc:
        raise InferenceError(f"region: expected (y0, x0, y1, x1) in level-0 pixels, received {region!r}") from exc
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise InferenceError(f"region: expected 4 finite numbers (y0, x0, y1, x1), received {region!r}")
    y0, x0, y1, x1 = values
    if y1 <= y0 or x1 <= x0:
        raise InferenceError(f"region: expected y0 < y1 and x0 < x1, received {tuple(values)}")
    height, width = shape
    clipped = (max(math.floor(y0), 0), max(math.floor(x0), 0), min(math.ceil(y1), height), min(math.ceil(x1), width))
    if clipped[0] >= clipped[2] or clipped[1] >= clipped[3]:
        raise InferenceError(
            f"region: expected a rectangle overlapping the slide (0, 0, {height}, {width}), "
            f"received {tuple(values)}, which lies outside it"
        )
    return clipped


def _check_tissue(tissue: Any, shape: tuple[int, int]) -> bool | TissueMask:
    if isinstance(tissue, (bool, np.bool_)):
        return bool(tissue)
    if isinstance(tissue, TissueMask):
        return tissue
    if isinstance(tissue, np.ndarray):
        mask = TissueMask.from_array(tissue, shape)
        if not mask.mask.any():
            raise InferenceError("tissue: the given mask is empty (no tissue); expected at least one True pixel")
        return mask
    raise InferenceError(f"tissue: expected True, False, a TissueMask or a 2-D boolean array, received {type(tissue).__name__}")


# --------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """One run's settings (checked by :func:`segment_slide`) and its state while it runs."""

    slide: Slide
    model: torch.nn.Module
    spec: InferenceSpec
    geometry: Geometry
    region: tuple[int, int, int, int] | None
    tissue: bool | TissueMask
    batch_size: int
    overlap: float
    device: torch.device
    out: Any
    overwrite: bool
    is_cancelled: Callable[[], bool]
    num_workers: int
    prefetch_batches: int
    window: str
    mixed_precision: bool
    mask_output: bool
    augment: bool
    plan: TilePlan | None = None
    mask: TissueMask | None = None
    done: int = 0
    cancelled: bool = False
    labels: zarr.Array | None = None
    path: Path | None = None
    tempdir: tempfile.TemporaryDirectory | None = None
    writer: ChunkWriter | None = None
    blender: TileBlender | None = None

    @property
    def label_mpp(self) -> tuple[float, float] | None:
        if self.slide.mpp is None:
            return None
        return tuple(m * d for m, d in zip(self.slide.mpp, self.geometry.downsample))  # type: ignore[return-value]

    def execute(self) -> Generator[Progress, None, SegmentationResult]:
        start = time.perf_counter()
        yield Progress(0, 0, 0.0, None, "planning")
        self.mask = detect_tissue(self.slide) if self.tissue is True else (None if self.tissue is False else self.tissue)
        plan = self.plan = plan_tiles(self.geometry, self.spec.tile_size, self.overlap, tissue=self.mask,
                                      region=self.region)
        if plan.n_tiles == 0:
            where = f"region {self.region} (level-0 y0, x0, y1, x1)" if self.region else "the slide"
            raise InferenceError(
                f"no tile to predict: expected tissue inside {where}, received only background there; "
                "pass tissue=False to predict it anyway"
            )
        total, skipped = plan.n_tiles, plan.n_grid - plan.n_tiles
        yield Progress(0, total, time.perf_counter() - start, None, "predicting", skipped)
        predict_start = time.perf_counter()
        steps = self._predict()
        try:
            for done in steps:
                eta = (time.perf_counter() - predict_start) / done * (total - done) if done else None
                yield Progress(done, total, time.perf_counter() - start, eta, "predicting", skipped)
        finally:
            steps.close()  # stops reader threads, restores the model's mode
        result = self._result(elapsed=time.perf_counter() - start)
        stage, eta = ("cancelled", None) if self.cancelled else ("finished", 0.0)
        yield Progress(self.done, total, result.elapsed_seconds, eta, stage, skipped)
        return result

    def _predict(self) -> Generator[int, None, None]:
        """Run every batch and yield the tiles done after each; stop early when cancelled."""
        plan, spec, device = self.plan, self.spec, self.device
        reader = TileReader(self.slide, self.geometry, spec.tile_size)
        tiles = plan.tiles()
        batches = [tiles[k : k + self.batch_size] for k in range(0, len(tiles), self.batch_size)]
        windows: dict[tuple, torch.Tensor] = {}

        def weights(batch: list[tuple[int, int]]) -> list[torch.Tensor]:
            """The 2-D window of each tile (border-aware; a handful of variants, cached)."""
            out = []
            for i, j in batch:
                sides = tile_profiles(plan, i, j)
                if sides not in windows:
                    (top, bottom), (left, right) = sides
                    rows = window_profile(spec.tile_size, self.window, at_start=top, at_end=bottom)
                    cols = window_profile(spec.tile_size, self.window, at_start=left, at_end=right)
                    windows[sides] = torch.from_numpy(np.outer(rows, cols)).to(device)
                out.append(windows[sides])
            return out

        scale = torch.tensor([1 / (255.0 * s) for s in spec.std], device=device).view(1, 3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(spec.mean, spec.std)], device=device).view(1, 3, 1, 1)
        was_training = self.model.training
        self.model.eval()
        self.model.to(device)
        executor = (ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="feddp-tiles")
                    if self.num_workers > 0 else _InlineExecutor())
        queue: deque[list[Future]] = deque()

        def submit(index: int) -> None:
            queue.append([executor.submit(reader, *plan.origin(i, j)) for i, j in batches[index]])

        # Blending, labelling and writing batch k run on their own thread while the model
        # predicts batch k + 1 (torch and numpy release the GIL); one batch in flight at most.
        blend_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feddp-blend")
        blending: Future | None = None
        try:
            for index in range(min(self.prefetch_batches + 1, len(batches))):
                submit(index)
            for index, batch in enumerate(batches):
                if self.is_cancelled():
                    self.cancelled = True
                    return
                futures = queue.popleft()
                if index + len(queue) + 1 < len(batches):
                    submit(index + len(queue) + 1)
                pixels = np.stack([future.result() for future in futures])
                host, event = self._forward(pixels, scale, shift, weights(batch))
                if blending is not None:
                    blending.result()  # re-raises a failed blend or write here
                    yield self.done
                blending = blend_pool.submit(self._blend, batch, host, event)
            if blending is not None:
                blending.result()
                if self.is_cancelled():
                    self.cancelled = True
                    return
            self.blender.finish()
            self.writer.flush_all()
            yield self.done
        finally:
            blend_pool.shutdown(wait=True)  # a cancelled run's partial labels stay consistent
            executor.shutdown(wait=True, cancel_futures=True)
            self.model.train(was_training)

    def _forward(
        self, pixels: np.ndarray, scale: torch.Tensor, shift: torch.Tensor, windows: list[torch.Tensor]
    ) -> tuple[torch.Tensor, Any]:
        """Weighted class probabilities ``(B, C, T, T)`` (C >= 2) of a uint8 batch ``(B, T, T, 3)``.

        Returned on the CPU with the CUDA event to wait for: the copy overlaps the next forward pass.
        """
        device = self.device
        batch = torch.from_numpy(pixels)
        if device.type == "cuda":
            batch = batch.pin_memory()
        with torch.inference_mode():
            # uint8 crosses to the device (4x less than float), is normalised there, in place.
            batch = batch.to(device, non_blocking=True).permute(0, 3, 1, 2)
            batch = torch.addcmul(shift, batch.float(), scale)  # (x / 255 - mean) / std
            if self.augment:
                probabilities = sum(_unview(self._probabilities(_view(batch, t), len(pixels)), t)
                                    for t in range(DIHEDRAL)) / DIHEDRAL
            else:
                probabilities = self._probabilities(batch, len(pixels))
            for k, window in enumerate(windows):
                probabilities[k].mul_(window)
        if device.type != "cuda":
            return probabilities.to("cpu"), None
        host = probabilities.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def _probabilities(self, batch: torch.Tensor, n: int) -> torch.Tensor:
        """Class probabilities ``(B, C, T, T)`` (C >= 2) of a normalised batch."""
        with autocast(self.device, self.mixed_precision):
            logits = self.model(batch)
        self._check_output(logits, n)
        logits = logits.float()
        if logits.shape[1] == 1:
            foreground = torch.sigmoid(logits)
            return torch.cat([1 - foreground, foreground], dim=1)
        return torch.softmax(logits, dim=1)

    def _check_output(self, logits: Any, n: int) -> None:
        size, n_classes = self.spec.tile_size, self.spec.n_classes
        expected = f"({n}, {n_classes if n_classes is not None else 'C'}, {size}, {size})"
        if not isinstance(logits, torch.Tensor):
            raise InferenceError(f"model output: expected a tensor of shape {expected}, received {type(logits).__name__}")
        shape = tuple(logits.shape)
        ok = len(shape) == 4 and shape[0] == n and shape[2:] == (size, size) and shape[1] >= 1
        if not ok or (n_classes is not None and shape[1] != n_classes):
            raise InferenceError(f"model output: expected logits of shape {expected}, received {shape}")

    def _blend(self, batch: list[tuple[int, int]], host: torch.Tensor, event: Any) -> None:
        if event is not None:
            event.synchronize()
        array = host.numpy()
        if self.blender is None:
            self._open_output(array.shape[1])
        for k, (row, col) in enumerate(batch):
            self.blender.add(row, col, array[k])
            self.done += 1
        self.writer.flush_rows_before(self.blender.done_rows)

    def _open_output(self, n_channels: int) -> None:
        n_classes = self.spec.n_classes or n_channels
        attributes = {
            "complete": False,
            "level": self.geometry.level,
            "downsample": list(self.geometry.downsample),
            "mpp": list(self.label_mpp) if self.label_mpp else None,
            "class_names": list(self.spec.class_names) if self.spec.class_names else None,
            "region": list(self.region) if self.region else None,
            "tile_size": self.spec.tile_size,
            "overlap": self.overlap,
        }
        dtype = np.dtype(np.uint8 if max(n_classes, 2) <= 256 else np.uint16)
        self.labels, self.path, self.tempdir = create_output(
            self.out, self.plan.shape, self.plan.chunks, dtype, attributes, overwrite=self.overwrite
        )
        self.writer = ChunkWriter(self.labels)
        self.blender = TileBlender(self.plan, n_channels, self._finalise)

    def _finalise(self, y0: int, x0: int, acc: np.ndarray) -> None:
        """Turn finished accumulator rows into labels and hand them to the writer."""
        weights, dtype = self.spec.class_weights, self.labels.dtype
        if len(acc) == 2:  # the common binary case, without argmax over a 2-long axis
            if weights is None:
                labels = (acc[1] > acc[0]).astype(dtype)
            else:
                labels = (acc[1] * weights[1] > acc[0] * weights[0]).astype(dtype)
            keep = (acc[0] + acc[1]) > 0
        else:
            keep = acc.sum(axis=0) > 0
            if weights is not None:
                acc = acc * np.asarray(weights, acc.dtype)[:, None, None]
            labels = acc.argmax(axis=0).astype(dtype)
        h, w = labels.shape
        window = self.plan.window
        if window is not None:
            rows = (np.arange(y0, y0 + h) >= window[0]) & (np.arange(y0, y0 + h) < window[2])
            cols = (np.arange(x0, x0 + w) >= window[1]) & (np.arange(x0, x0 + w) < window[3])
            keep &= rows[:, None] & cols[None, :]
        if self.mask_output and self.mask is not None:
            dy, dx = self.geometry.downsample
            keep &= self.mask.sample((h, w), (dy, dx), (y0 * dy, x0 * dx))
        labels[~keep] = 0
        self.writer.put(y0, x0, labels)

    def _result(self, *, elapsed: float) -> SegmentationResult:
        if self.labels is None:  # cancelled before the first batch came back
            self._open_output(max(self.spec.n_classes or 2, 2))
        if self.cancelled:
            self.writer.discard()
        else:
            self.labels.attrs["complete"] = True
        plan = self.plan
        return SegmentationResult(
            labels=self.labels,
            level=self.geometry.level,
            downsample=self.geometry.downsample,
            mpp=self.label_mpp,
            pyramid=lazy_pyramid(da.from_zarr(self.labels), labels=True),
            complete=not self.cancelled,
            tissue=self.mask,
            region=self.region,
            tiles_done=self.done,
            tiles_total=plan.n_tiles,
            tiles_skipped=plan.n_grid - plan.n_tiles,
            class_names=self.spec.class_names,
            path=self.path,
            elapsed_seconds=elapsed,
            _tempdir=self.tempdir,
        )


class _InlineExecutor:
    """``num_workers=0``: read each tile in the calling thread, between forward passes."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # re-raised by future.result(), as a thread would
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass
