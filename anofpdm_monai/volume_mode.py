"""Volume mode: AnoFPDM decisions made on a whole volume's slices at once (``anofpdm-*-volume``).

The forward process is the paper's (same network calls, same N, k and w as the encoding's
calibration); only the decisions differ, and they are calibrated with image-level labels only:

* **Map**: the channel mean of the aggregated maps, median-filtered with a calibrated window
  (the paper's 5 x 5, 3 x 3 or none: a 5 x 5 median erases any lesion of fewer than 13 pixels).
* **Pixel threshold**: a level ``q`` of the anomaly-map values of the *brain* pixels of healthy
  validation slices; a pixel is anomalous when its map value is at least that value. The map's
  background never enters, so the fraction of a slice that can be flagged follows the lesion, not
  a fixed quantile of S x S pixels.
* **3-D post-processing in physical units**: 26-connected components of the stacked slice masks
  smaller than ``min_lesion_mm3`` (the slices' own voxel size) are removed. A lesion's thin edge
  slices stay connected to its core; isolated specks do not.
* **Health decision**: one statistic, chosen on validation by accuracy, among the paper's cosine
  similarity, dmax, and the slice's lesion area after post-processing; optionally averaged with
  the two neighbouring slices (a lesion spans slices). Its threshold is the one of highest
  validation accuracy.
* **Mixed setup**: a slice predicted healthy keeps the mask pixels of components that reach a
  slice predicted unhealthy (anchored), and loses the others.

The map filter, ``q`` and ``min_lesion_mm3`` are chosen together from small grids, by the validation accuracy of
the rule "a slice is unhealthy iff its post-processed mask is not empty": false positives on
healthy slices and misses on unhealthy ones are what image-level labels can measure.

Registers the ``volume`` decision, its calibration section (``"volume"`` in ``calibration.json``,
made by ``anofpdm calibrate`` on whole validation patients) and the methods ``anofpdm-ddim-volume``,
``anofpdm-ddpm-volume`` (:mod:`anofpdm_monai.methods`).

Shapes: B slices of one volume in slice order, M map channels, S x S pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import ndimage

from anofpdm_monai.forward_process import ForwardProcessResult
from anofpdm_monai.methods import ENCODINGS, AnoFPDMMethod, CalibrationSection, Decision, SectionContext, register, register_decision
from anofpdm_monai.segmentation import SegmentationResult, VolumeInputs, health_similarity, median_filter

if TYPE_CHECKING:
    from anofpdm_monai.data import PreprocessedStore

HEALTH_STATISTICS = ("sim", "dmax", "lesion_area")
MAP_FILTERS = (5, 3, 1)
"""Median-filter sides of the map: the paper's 5 x 5 (which erases lesions of a few pixels), 3 x 3, none."""
PIXEL_QUANTILES = (0.99, 0.995, 0.998, 0.999, 0.9995, 0.9998)
MIN_LESION_MM3 = (0.0, 10.0, 30.0, 100.0, 300.0)
NEIGHBOUR_WEIGHTS = (0.25, 0.5, 0.25)


@dataclass
class VolumeCalibration:
    """Calibrated decisions of the volume family (stored under ``"volume"`` in ``calibration.json``).

    Attributes:
        map_filter: side of the median filter of the map (1: none).
        pixel_quantile: level q of the healthy validation slices' brain-pixel map values.
        pixel_threshold: the map value at that level; pixels at or above it are anomalous.
        min_lesion_mm3: 3-D components of smaller volume are removed.
        health: the health statistic, one of :data:`HEALTH_STATISTICS`.
        smooth_slices: whether the statistic is averaged with its two neighbouring slices.
        health_threshold: a slice is unhealthy iff its (oriented) statistic exceeds this.
        accuracy: validation accuracy of the health decision.
        mask_accuracy: validation accuracy of "mask not empty" at the chosen q and size.
        candidates: validation accuracy of every (statistic, smoothing) pair.
        grid: validation accuracy of "mask not empty" over the (filter, q, size) grid.
        n_val_volumes, n_val_slices, n_val_unhealthy: the validation data.
    """

    map_filter: int
    pixel_quantile: float
    pixel_threshold: float
    min_lesion_mm3: float
    health: str
    smooth_slices: bool
    health_threshold: float
    accuracy: float
    mask_accuracy: float
    candidates: list[dict[str, Any]] = field(default_factory=list)
    grid: list[dict[str, Any]] = field(default_factory=list)
    n_val_volumes: int = 0
    n_val_slices: int = 0
    n_val_unhealthy: int = 0

    def __post_init__(self) -> None:
        if self.health not in HEALTH_STATISTICS:
            raise ValueError(f"health={self.health!r} must be one of {HEALTH_STATISTICS}")
        for name in ("pixel_quantile", "pixel_threshold", "min_lesion_mm3", "health_threshold"):
            value = float(getattr(self, name))
            if not np.isfinite(value):
                raise ValueError(f"{name}={value} must be finite")
        if not 0.0 < self.pixel_quantile < 1.0:
            raise ValueError(f"pixel_quantile={self.pixel_quantile} must lie in (0, 1)")
        if self.map_filter not in MAP_FILTERS:
            raise ValueError(f"map_filter={self.map_filter} must be one of {MAP_FILTERS}")
        if self.min_lesion_mm3 < 0:
            raise ValueError(f"min_lesion_mm3={self.min_lesion_mm3} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VolumeCalibration:
        return cls(**data)


def _stacked(slice_indices: np.ndarray) -> np.ndarray:
    """Row of each slice in a z stack where only consecutive slice indices are neighbours."""
    order = np.asarray(slice_indices, dtype=np.int64)
    return order - order.min() if order.size else order


def component_labels(masks: torch.Tensor, slice_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected components of stacked slice masks.

    Args:
        masks: (B, S, S) bool.
        slice_indices: (B,) distinct axial indices.

    Returns:
        ``(labels, sizes)``: (B, S, S) int component label per pixel (0 background) and the voxel
        count of each label (index 0 unused).
    """
    rows = _stacked(slice_indices)
    stack = np.zeros((int(rows.max()) + 1 if rows.size else 0, *masks.shape[1:]), dtype=bool)
    stack[rows] = masks.cpu().numpy()
    labels, _ = ndimage.label(stack, structure=np.ones((3, 3, 3), dtype=bool))
    return labels[rows], np.bincount(labels.ravel())


def remove_small_lesions(masks: torch.Tensor, slice_indices: np.ndarray, voxel_mm: Sequence[float], min_mm3: float) -> torch.Tensor:
    """Drop 26-connected 3-D components whose volume (voxels x voxel volume) is below ``min_mm3``.

    Args:
        masks: (B, S, S) bool masks of one volume's slices.
        slice_indices: (B,) their axial indices (gaps break connectivity).
        voxel_mm: voxel size of the stacked slices in mm.
        min_mm3: smallest kept volume; 0 keeps everything.

    Returns:
        (B, S, S) bool on the device of ``masks``.
    """
    if min_mm3 <= 0 or not bool(masks.any()):
        return masks
    labels, sizes = component_labels(masks, slice_indices)
    keep = sizes * float(np.prod(voxel_mm)) >= min_mm3
    keep[0] = False
    return torch.from_numpy(keep[labels]).to(masks.device)


def anchored_mixed_masks(masks: torch.Tensor, predicted_unhealthy: torch.Tensor, slice_indices: np.ndarray) -> torch.Tensor:
    """Mixed setup of the volume family: keep the components that reach a slice predicted unhealthy.

    Args:
        masks: (B, S, S) bool post-processed masks.
        predicted_unhealthy: (B,) bool.
        slice_indices: (B,) axial indices.

    Returns:
        (B, S, S) bool: every pixel of a kept component, in whichever slice it lies.
    """
    if not bool(masks.any()):
        return masks
    labels, sizes = component_labels(masks, slice_indices)
    anchored = np.zeros(sizes.shape[0], dtype=bool)
    anchored[np.unique(labels[predicted_unhealthy.cpu().numpy()])] = True
    anchored[0] = False
    return torch.from_numpy(anchored[labels]).to(masks.device)


def smooth_along_slices(values: torch.Tensor, slice_indices: np.ndarray) -> torch.Tensor:
    """Weighted mean (1/4, 1/2, 1/4) of each slice's value with its neighbours (missing neighbours drop out).

    Args:
        values: (B,) per-slice statistic.
        slice_indices: (B,) axial indices; a neighbour is the slice whose index differs by one.
    """
    rows = _stacked(slice_indices)
    n = int(rows.max()) + 1 if rows.size else 0
    stack = torch.zeros(n + 2, dtype=torch.float64)
    present = torch.zeros(n + 2, dtype=torch.float64)
    stack[torch.as_tensor(rows + 1)] = values.double().cpu()
    present[torch.as_tensor(rows + 1)] = 1.0
    w = torch.tensor(NEIGHBOUR_WEIGHTS, dtype=torch.float64)
    num = w[0] * stack[:-2] + w[1] * stack[1:-1] + w[2] * stack[2:]
    den = w[0] * present[:-2] + w[1] * present[1:-1] + w[2] * present[2:]
    return (num / den.clamp_min(1e-12))[torch.as_tensor(rows)].to(values.dtype)


def volume_map(per_channel_map: torch.Tensor, map_filter: int) -> torch.Tensor:
    """The volume family's anomaly map: channel mean of (B, M, S, S) maps, median-filtered (side ``map_filter``; 1: none)."""
    mean = per_channel_map.mean(dim=1)
    return mean if map_filter == 1 else median_filter(mean, map_filter)


def health_statistic(name: str, result: ForwardProcessResult, masks: torch.Tensor) -> torch.Tensor:
    """Per-slice health statistic, oriented so that larger means "more likely unhealthy".

    Args:
        name: ``"sim"`` (minus the paper's cosine similarity), ``"dmax"`` (mean over map channels of
            the maximum divergence) or ``"lesion_area"`` (pixels of the post-processed mask).
        result: the volume's forward process for one guidance strength (G = 1).
        masks: (B, S, S) post-processed masks.

    Returns:
        (B,) float64 on the CPU.
    """
    if name == "sim":
        return -health_similarity(result.mse_h[0], result.mse_u[0]).double().cpu()
    if name == "dmax":
        return result.dmax[0].mean(dim=-1).double().cpu()
    if name == "lesion_area":
        return masks.flatten(1).sum(dim=1).double().cpu()
    raise ValueError(f"health statistic {name!r} must be one of {HEALTH_STATISTICS}")


def volume_segment(result: ForwardProcessResult, inputs: VolumeInputs, calibration: VolumeCalibration, setup: str = "mixed") -> SegmentationResult:
    """Masks and maps of one volume by the volume family's decisions (see the module docstring).

    Args:
        result: the forward process of ALL the volume's slices, in slice order, one guidance strength (G = 1).
        inputs: brain pixels, slice indices and voxel size of the same slices.
        calibration: the volume family's calibration.
        setup: ``"mixed"`` (anchored components only) or ``"unhealthy"`` (every component kept).

    Returns:
        A :class:`~anofpdm_monai.segmentation.SegmentationResult` (``quantile`` holds the pixel
        level q and ``threshold`` the pixel threshold, per slice).
    """
    if result.guidance_scales.shape[0] != 1:
        raise ValueError(f"result must hold one guidance strength (G = 1), got G = {result.guidance_scales.shape[0]}")
    per_channel = result.aggregated_map[0]
    maps = volume_map(per_channel, calibration.map_filter)
    brain = inputs.brain.to(maps.device)
    masks = remove_small_lesions((maps >= calibration.pixel_threshold) & brain, inputs.slice_indices, inputs.voxel_mm, calibration.min_lesion_mm3)
    statistic = health_statistic(calibration.health, result, masks)
    if calibration.smooth_slices:
        statistic = smooth_along_slices(statistic, inputs.slice_indices)
    unhealthy = (statistic > calibration.health_threshold).to(maps.device)
    if setup not in ("mixed", "unhealthy"):
        raise ValueError(f"setup={setup!r} must be 'mixed' or 'unhealthy'")
    mixed = anchored_mixed_masks(masks, unhealthy, inputs.slice_indices)
    batch, channels = per_channel.shape[:2]
    return SegmentationResult(
        maps=maps,
        masks=mixed if setup == "mixed" else masks,
        predicted_unhealthy=unhealthy,
        sim=health_similarity(result.mse_h[0], result.mse_u[0]),
        end_step=result.end_step[0],
        dmax=result.dmax[0],
        quantile=maps.new_full((batch, channels), calibration.pixel_quantile),
        threshold=maps.new_full((batch,), calibration.pixel_threshold),
        mixed_masks=mixed,
        health=statistic.float(),
        health_threshold=float(calibration.health_threshold),
        divergence=result.divergence[0].mean(dim=-1),
        timesteps=result.timesteps,
    )


# --------------------------------------------------------------------------------------------
# Calibration (image-level labels only)
# --------------------------------------------------------------------------------------------


def best_threshold(statistic: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The threshold of highest accuracy for the rule "unhealthy iff statistic > threshold".

    Candidates are the midpoints between consecutive distinct values, and one below the smallest
    (everything unhealthy); ties go to the highest threshold (fewest slices flagged).

    Args:
        statistic: (V,) values, larger = more likely unhealthy.
        labels: (V,) 0 healthy, 1 unhealthy.

    Returns:
        ``(threshold, accuracy)``.
    """
    values = np.asarray(statistic, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    distinct = np.unique(values)
    candidates = np.concatenate([[distinct[0] - 1.0], (distinct[:-1] + distinct[1:]) / 2.0, [distinct[-1]]])
    order = np.argsort(values)
    sorted_values, sorted_labels = values[order], labels[order]
    # Slices at or below a candidate are called healthy: count correct calls on each side.
    below = np.searchsorted(sorted_values, candidates, side="right")
    healthy_below = np.concatenate([[0], np.cumsum(~sorted_labels)])[below]
    unhealthy_above = labels.sum() - np.concatenate([[0], np.cumsum(sorted_labels)])[below]
    accuracy = (healthy_below + unhealthy_above) / max(values.size, 1)
    best = np.flatnonzero(accuracy >= accuracy.max() - 1e-12)[-1]
    return float(candidates[best]), float(accuracy[best])


@dataclass
class ValidationVolume:
    """One validation volume's forward process and inputs, with its slices' image-level labels."""

    result: ForwardProcessResult
    inputs: VolumeInputs
    labels: np.ndarray


def calibrate_volume_mode(
    volumes: Sequence[ValidationVolume],
    pixel_quantiles: Sequence[float] = PIXEL_QUANTILES,
    min_lesion_mm3: Sequence[float] = MIN_LESION_MM3,
    map_filters: Sequence[int] = MAP_FILTERS,
) -> VolumeCalibration:
    """Choose the volume family's decisions on validation volumes with image-level labels only.

    1. For every map filter and pixel level q, the threshold is the q-quantile of the map values
       of the brain pixels of all healthy validation slices.
    2. (filter, q, minimum size) is the triple whose rule "unhealthy iff the post-processed mask
       is not empty" is most accurate (ties: the first in grid order).
    3. With that mask, each health statistic, raw and averaged with its neighbours, gets its best
       threshold (:func:`best_threshold`); the most accurate pair is kept (ties: the order of
       :data:`HEALTH_STATISTICS`, raw first).

    Args:
        volumes: whole validation volumes (every brain slice, in order), each with G = 1.
        pixel_quantiles, min_lesion_mm3, map_filters: the candidate grids.
    """
    if not volumes:
        raise ValueError("volume-mode calibration needs at least one validation volume")
    labels = np.concatenate([v.labels for v in volumes]).astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("volume-mode calibration needs healthy and unhealthy validation slices")
    healthy = [torch.from_numpy(~v.labels.astype(bool))[:, None, None] for v in volumes]
    grid, best = [], None
    for map_filter in map_filters:
        maps = [volume_map(v.result.aggregated_map[0], map_filter).float().cpu() for v in volumes]
        healthy_values = torch.cat([m[v.inputs.brain & h] for m, v, h in zip(maps, volumes, healthy)])
        if healthy_values.numel() == 0:
            raise ValueError("the healthy validation slices hold no brain pixel")
        sample = healthy_values[:: max(1, healthy_values.numel() // 4_000_000)].double()
        levels = torch.quantile(sample, torch.tensor(list(pixel_quantiles), dtype=torch.float64))
        for q, level in zip(pixel_quantiles, levels.tolist()):
            raw = [(m >= level) & v.inputs.brain for m, v in zip(maps, volumes)]
            for size in min_lesion_mm3:
                masks = [remove_small_lesions(r, v.inputs.slice_indices, v.inputs.voxel_mm, size) for r, v in zip(raw, volumes)]
                flagged = np.concatenate([m.flatten(1).any(dim=1).numpy() for m in masks])
                accuracy = float((flagged == labels).mean())
                grid.append({"map_filter": map_filter, "pixel_quantile": float(q), "pixel_threshold": float(level),
                             "min_lesion_mm3": float(size), "accuracy": accuracy})  # fmt: skip
                if best is None or accuracy > best[0] + 1e-12:
                    best = (accuracy, map_filter, float(q), float(level), float(size), masks)
    mask_accuracy, filter_star, q_star, level_star, size_star, masks_star = best

    candidates, chosen = [], None
    for name in HEALTH_STATISTICS:
        for smooth in (False, True):
            stats = []
            for v, m in zip(volumes, masks_star):
                s = health_statistic(name, v.result, m)
                stats.append(smooth_along_slices(s, v.inputs.slice_indices) if smooth else s)
            threshold, accuracy = best_threshold(torch.cat(stats).numpy(), labels)
            candidates.append({"health": name, "smooth_slices": smooth, "threshold": threshold, "accuracy": accuracy})
            if chosen is None or accuracy > chosen["accuracy"] + 1e-12:
                chosen = candidates[-1]
    return VolumeCalibration(
        map_filter=filter_star,
        pixel_quantile=q_star,
        pixel_threshold=level_star,
        min_lesion_mm3=size_star,
        health=chosen["health"],
        smooth_slices=chosen["smooth_slices"],
        health_threshold=chosen["threshold"],
        accuracy=chosen["accuracy"],
        mask_accuracy=mask_accuracy,
        candidates=candidates,
        grid=grid,
        n_val_volumes=len(volumes),
        n_val_slices=int(labels.size),
        n_val_unhealthy=int(labels.sum()),
    )


def validation_volumes(
    store: PreprocessedStore,
    forward: Callable[[torch.Tensor, str, Sequence[int]], ForwardProcessResult],
    max_volumes: int,
    seed: int = 0,
    progress: bool = True,
) -> list[ValidationVolume]:
    """Whole validation volumes of a store, each run through ``forward``, with image-level labels only.

    Args:
        store: a preprocessed store with a ``val`` split (its masks are never read; the manifest's
            slice labels are the image-level labels).
        forward: ``(slices (B, C, S, S), case id, slice indices) -> ForwardProcessResult`` (G = 1),
            e.g. :meth:`anofpdm_monai.inferers.SliceInferer.forward_process`.
        max_volumes: at most this many patients (a seeded choice, preferring patients with both
            healthy and unhealthy slices).
        seed: the choice's seed.
    """
    from tqdm.auto import tqdm

    rows = store.rows("val")
    if rows.empty:
        raise ValueError(f"{store.root}: the 'val' split is empty; volume-mode calibration needs validation patients")
    patients = sorted(rows["patient"].unique().tolist())
    rng = np.random.default_rng(seed)
    mixed = [p for p in patients if rows.loc[rows["patient"] == p, "label"].nunique() == 2]
    rest = [p for p in patients if p not in mixed]
    chosen = sorted(list(rng.permutation(mixed)) + list(rng.permutation(rest)), key=lambda p: p not in mixed)[:max_volumes]
    volumes = []
    for patient in tqdm(chosen, desc="volume calibration", unit="case", disable=not progress):
        case_rows = rows[rows["patient"] == patient].sort_values("slice")
        images, _, labels = store.load_slices(case_rows)
        indices = case_rows["slice"].to_numpy()
        voxel_mm = store.case_meta(patient).get("slice_voxel_mm")
        inputs = VolumeInputs.from_slices(images, indices, voxel_mm)
        volumes.append(ValidationVolume(forward(images, patient, indices), inputs, labels.numpy()))
    return volumes


def calibrate_section(context: SectionContext) -> VolumeCalibration:
    """The section's calibration hook: :func:`calibrate_volume_mode` on ``context.cases`` whole validation patients."""
    return calibrate_volume_mode(validation_volumes(context.store, context.forward, context.cases, context.seed))


def volume_decision(result: ForwardProcessResult, volume: VolumeInputs, calibration, section: VolumeCalibration, setup: str) -> SegmentationResult:
    """The :class:`~anofpdm_monai.methods.Decision` hook of the volume family (:func:`volume_segment`)."""
    if volume is None:
        raise ValueError("the volume decision needs the volume's VolumeInputs")
    return volume_segment(result, volume, section, setup=setup)


def describe(volume: VolumeCalibration) -> str:
    """One line on the calibrated volume family, for the calibration's log."""
    return (f"volume family ({volume.n_val_volumes} patients, {volume.n_val_slices} slices): pixel level q={volume.pixel_quantile} "
            f"(map >= {volume.pixel_threshold:.4g}), components >= {volume.min_lesion_mm3:g} mm^3, health by "
            f"{volume.health}{' (with neighbours)' if volume.smooth_slices else ''}: accuracy {volume.accuracy:.3f}")  # fmt: skip


SECTION = CalibrationSection(
    "volume", VolumeCalibration, calibrate_section, describe=describe,
    missing="recalibrate with volume mode on (anofpdm calibrate -m MODEL -d PREP --volume-only) to use the -volume methods",
)  # fmt: skip
register_decision(Decision("volume", volume_decision, section=SECTION, needs_volume=True))
for _encoding in ENCODINGS:
    register(AnoFPDMMethod(
        f"anofpdm-{_encoding}-volume",
        f"the volume family on the {_encoding.upper()} forward process: brain-pixel threshold, 3-D components in mm^3, calibrated health statistic",
        encoding=_encoding, variant="volume",
    ))  # fmt: skip
