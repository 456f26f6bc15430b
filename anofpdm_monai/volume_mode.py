"""Volume mode: AnoFPDM decisions made on a whole volume's slices at once (``anofpdm-*-volume``).

The forward process is the paper's (same network calls, same N, k and w as the encoding's
calibration); only the decisions differ, and they are calibrated with image-level labels only:

* **Map**: the channel mean of the aggregated maps, median-filtered with a calibrated window
  (the paper's 5 x 5, 3 x 3 or none: a 5 x 5 median erases any lesion of fewer than 13 pixels).
* **Pixel threshold**: a level ``q`` of the anomaly-map values of the *brain* pixels of healthy
  validation slices; a pixel is anomalous when its map value is at least that value. The map's
  background never enters, so the fraction of a slice that can be flagged follows the lesion, not
  a fixed quantile of S x S pixels.
* **3-D post-processing in physical units**: 26-connected components smaller than
  ``min_lesion_mm3`` are removed (:func:`~anofpdm_monai.segmentation.keep_components`). A lesion's
  thin edge slices stay connected to its core; isolated specks do not.
* **Minimum lesion size by a false-positive rate** (Neyman-Pearson): the smallest candidate size at
  which the healthy validation slices keep at most ``fp_rate`` false-positive components per 100 ml
  of their brain (:func:`fp_rate_size`). A component lying wholly in slices labelled healthy is a false
  positive whatever the pixels say, so image-level labels measure the rate; the rate is the one knob
  (``anofpdm calibrate --fp-rate``, default :data:`~anofpdm_monai.methods.DEFAULT_FP_RATE`).
* **Health decision**: one statistic, chosen on validation by accuracy, among the paper's cosine
  similarity, dmax, and the slice's lesion area after post-processing; optionally averaged with
  the two neighbouring slices (a lesion spans slices). Its threshold is the one of highest
  validation accuracy.
* **Mixed setup**: a slice predicted healthy keeps the mask pixels of components that reach a
  slice predicted unhealthy (anchored), and loses the others.
* **On the input grid** (:func:`input_grid_mask`, what ``segment`` writes): the continuous map is
  brought back to the input's voxel grid first (the inverse of the chain), and the threshold, the
  components in mm^3 of the input's voxels and the anchoring are decided there: no coarse-pixel
  slivers past a lesion's edge, sizes exact. The slice-grid masks (:func:`volume_segment`) remain
  what the health statistic and the per-slice scores read.

The map filter and ``q`` are chosen together from small grids, each pair with its own size by the
rate rule, by the validation accuracy of the rule "a slice is unhealthy iff its post-processed mask is
not empty".

Registers the ``volume`` decision, its calibration section (``"volume"`` in ``calibration.json``,
made by ``anofpdm calibrate`` on whole validation patients) and the methods ``anofpdm-ddim-volume``,
``anofpdm-ddpm-volume`` (:mod:`anofpdm_monai.methods`).

Shapes: B slices of one volume in slice order, M map channels, S x S pixels; (X, Y, Z) the input grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from anofpdm_monai.forward_process import ForwardProcessResult
from anofpdm_monai.io import spacing_volume_mm3, voxel_volume_mm3
from anofpdm_monai.methods import (
    DEFAULT_FP_RATE,
    ENCODINGS,
    AnoFPDMMethod,
    CalibrationSection,
    Decision,
    SectionContext,
    register,
    register_decision,
)
from anofpdm_monai.segmentation import SegmentationResult, VolumeInputs, health_similarity, keep_components, label_components, median_filter

if TYPE_CHECKING:
    from anofpdm_monai.data import PreprocessedStore
    from anofpdm_monai.transforms import CaseGeometry

HEALTH_STATISTICS = ("sim", "dmax", "lesion_area")
MAP_FILTERS = (5, 3, 1)
"""Median-filter sides of the map: the paper's 5 x 5 (which erases lesions of a few pixels), 3 x 3, none."""
PIXEL_QUANTILES = (0.99, 0.995, 0.998, 0.999, 0.9995, 0.9998)
MIN_LESION_MM3 = (0.0, 5.0, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0)
"""Candidate minimum lesion sizes in mm^3, ascending: the rate rule takes the smallest that meets the rate."""
SIZE_RULES = ("fp_rate", "accuracy")
"""How ``min_lesion_mm3`` was chosen: by the false-positive rate (this release), or with ``q`` by image-level
accuracy (calibrations of schema version 2 and older, migrated by :func:`migrate_section`)."""
NEIGHBOUR_WEIGHTS = (0.25, 0.5, 0.25)


@dataclass
class VolumeCalibration:
    """Calibrated decisions of the volume family (stored under ``"volume"`` in ``calibration.json``).

    Attributes:
        map_filter: side of the median filter of the map (1: none).
        pixel_quantile: level q of the healthy validation slices' brain-pixel map values.
        pixel_threshold: the map value at that level; pixels at or above it are anomalous.
        min_lesion_mm3: 3-D components of smaller volume are removed (:func:`fp_rate_size`).
        health: the health statistic, one of :data:`HEALTH_STATISTICS`.
        smooth_slices: whether the statistic is averaged with its two neighbouring slices.
        health_threshold: a slice is unhealthy iff its (oriented) statistic exceeds this.
        accuracy: validation accuracy of the health decision.
        mask_accuracy: validation accuracy of "mask not empty" at the chosen q and size.
        size_rule: how the size was chosen, one of :data:`SIZE_RULES`.
        fp_rate: the false-positive components per 100 ml of healthy brain the size was chosen to allow
            (None under the ``accuracy`` rule).
        fp_per_100ml: what the healthy validation slices keep at the chosen size (above ``fp_rate`` only when
            no candidate size met it; None when not measured).
        healthy_ml: brain volume of the healthy validation slices, ml (None when not measured).
        candidates: validation accuracy of every (statistic, smoothing) pair.
        grid: per (filter, q): its size by the rate rule, the rate there, the rate at every candidate
            size (``fp_per_100ml_by_size``, aligned with ``size_candidates``) and the accuracy of "mask not empty".
        size_candidates: the candidate sizes in mm^3 (:data:`MIN_LESION_MM3`).
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
    size_rule: str = "fp_rate"
    fp_rate: float | None = DEFAULT_FP_RATE
    fp_per_100ml: float | None = None
    healthy_ml: float | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    grid: list[dict[str, Any]] = field(default_factory=list)
    size_candidates: list[float] = field(default_factory=list)
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
        if self.size_rule not in SIZE_RULES:
            raise ValueError(f"size_rule={self.size_rule!r} must be one of {SIZE_RULES}")
        if self.size_rule == "fp_rate" and (self.fp_rate is None or not np.isfinite(self.fp_rate) or self.fp_rate < 0):
            raise ValueError(f"fp_rate={self.fp_rate} must be a number >= 0 under the fp_rate size rule")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VolumeCalibration:
        return cls(**data)


def _stacked(slice_indices: np.ndarray) -> np.ndarray:
    """Row of each slice in a z stack where only consecutive slice indices are neighbours."""
    order = np.asarray(slice_indices, dtype=np.int64)
    return order - order.min() if order.size else order


def stack_slices(masks: torch.Tensor, slice_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, S, S) slice masks as one (Z, S, S) bool volume, empty rows where slice indices leave gaps; and each slice's row."""
    rows = _stacked(slice_indices)
    stack = np.zeros((int(rows.max()) + 1 if rows.size else 0, *masks.shape[1:]), dtype=bool)
    stack[rows] = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else masks
    return stack, rows


def component_labels(masks: torch.Tensor, slice_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected components of stacked slice masks (:func:`~anofpdm_monai.segmentation.label_components`).

    Args:
        masks: (B, S, S) bool.
        slice_indices: (B,) distinct axial indices.

    Returns:
        ``(labels, sizes)``: (B, S, S) int component label per pixel (0 background) and the voxel
        count of each label (index 0 unused).
    """
    stack, rows = stack_slices(masks, slice_indices)
    labels, sizes = label_components(stack)
    return labels[rows], sizes


def keep_lesions(masks: torch.Tensor, slice_indices: np.ndarray, voxel_mm: Sequence[float], min_mm3: float) -> torch.Tensor:
    """Keep the 26-connected 3-D components of a volume's slice masks of at least ``min_mm3``.

    :func:`~anofpdm_monai.segmentation.keep_components` on the stacked slices (in mm^3 of their voxels).

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
    stack, rows = stack_slices(masks, slice_indices)
    kept = keep_components(stack, min_mm3, unit="mm3", voxel_mm3=spacing_volume_mm3(voxel_mm))
    return torch.from_numpy(kept[rows]).to(masks.device)


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
    masks = keep_lesions((maps >= calibration.pixel_threshold) & brain, inputs.slice_indices, inputs.voxel_mm, calibration.min_lesion_mm3)
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


def input_grid_mask(slices: SegmentationResult, geometry: CaseGeometry, section: VolumeCalibration, setup: str = "mixed") -> np.ndarray:
    """The volume family's mask decided on the input's own voxel grid (the :class:`Decision`'s ``input_mask`` hook).

    The continuous map goes back through the inverse of the chain first
    (:func:`~anofpdm_monai.transforms.slices_to_volume`, bilinear): then a voxel of a brain slice and of
    the brain is anomalous when its map value is at least ``section.pixel_threshold``, 26-connected
    components under ``section.min_lesion_mm3`` of the input's voxels are removed, and in the mixed setup
    only the components reaching a slice predicted unhealthy are kept (that slice's voxels on the input
    grid). So the mask's edge follows the interpolated map, not the coarse pixels, and sizes are exact.

    Args:
        slices: the decision's per-slice outputs (``maps`` (B, S, S), ``predicted_unhealthy`` (B,)).
        geometry: the case's :class:`~anofpdm_monai.transforms.CaseGeometry`.
        section: the volume family's calibration.
        setup: ``"mixed"`` (anchored components only) or ``"unhealthy"`` (every component kept).

    Returns:
        (X, Y, Z) uint8 0/1 on the input grid.
    """
    from anofpdm_monai.transforms import slices_to_volume

    if setup not in ("mixed", "unhealthy"):
        raise ValueError(f"setup={setup!r} must be 'mixed' or 'unhealthy'")
    maps = slices.maps.float().cpu()
    anomaly = slices_to_volume(maps, geometry, "map")
    covered = slices_to_volume(torch.ones_like(maps), geometry, "mask").astype(bool)  # brain slices, within the brain
    voxel_mm3 = voxel_volume_mm3(geometry.input_affine)
    kept = keep_components((anomaly >= section.pixel_threshold) & covered, section.min_lesion_mm3, unit="mm3", voxel_mm3=voxel_mm3)
    if setup == "unhealthy" or not kept.any():
        return kept.astype(np.uint8)
    unhealthy = slices.predicted_unhealthy.cpu().float()[:, None, None].expand_as(maps)
    anchor = slices_to_volume(unhealthy, geometry, "mask").astype(bool)
    labels, sizes = label_components(kept)
    anchored = np.zeros(sizes.shape[0], dtype=bool)
    anchored[np.unique(labels[anchor])] = True
    anchored[0] = False
    return anchored[labels].astype(np.uint8)


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


@dataclass
class VolumeComponents:
    """The 3-D components of one validation volume's thresholded map, as the size rule and the accuracy read them.

    Attributes:
        mm3: (L + 1,) volume of each component in mm^3 (index 0, the background: 0).
        false_positive: (L + 1,) bool: the component lies wholly in slices labelled healthy.
        slice_largest: (B,) the volume of the largest component reaching each slice (0: none).
        healthy_ml: brain volume of the slices labelled healthy, ml.
    """

    mm3: np.ndarray
    false_positive: np.ndarray
    slice_largest: np.ndarray
    healthy_ml: float

    @classmethod
    def of(cls, raw: torch.Tensor, volume: ValidationVolume) -> VolumeComponents:
        """From (B, S, S) bool thresholded brain pixels of ``volume`` (image-level labels only)."""
        labels, sizes = component_labels(raw, volume.inputs.slice_indices)
        voxel_mm3 = spacing_volume_mm3(volume.inputs.voxel_mm)
        mm3 = sizes * voxel_mm3  # as keep_components measures them
        mm3[0] = 0.0  # the background is no component
        unhealthy_rows = volume.labels.astype(bool)
        false_positive = np.ones(sizes.shape[0], dtype=bool)
        false_positive[np.unique(labels[unhealthy_rows])] = False
        false_positive[0] = False
        slice_largest = mm3[labels].reshape(labels.shape[0], -1).max(axis=1) if labels.size else np.zeros(0)
        healthy_voxels = int(volume.inputs.brain[torch.from_numpy(~unhealthy_rows)].sum())
        return cls(mm3, false_positive, slice_largest, healthy_voxels * voxel_mm3 / 1000.0)


def fp_rate_size(components: Sequence[VolumeComponents], fp_rate: float, sizes: Sequence[float] = MIN_LESION_MM3
                 ) -> tuple[float, float, list[float]]:  # fmt: skip
    """The Neyman-Pearson minimum lesion size: the smallest candidate at which the healthy slices keep at most ``fp_rate``
    false-positive components per 100 ml of their brain.

    A false positive is a component lying wholly in slices labelled healthy (image-level labels say no
    lesion is there); the rate at size s counts those of at least s mm^3 (the ones
    :func:`~anofpdm_monai.segmentation.keep_components` keeps) over the healthy slices' brain volume.

    Args:
        components: every validation volume's components at one map filter and level q.
        fp_rate: components per 100 ml allowed, >= 0.
        sizes: candidate sizes in mm^3, ascending.

    Returns:
        ``(size, rate, rates)``: the chosen size, the rate there, and the rate at every candidate. When no
        candidate meets ``fp_rate``, the largest candidate (its rate then exceeds ``fp_rate``).
    """
    if not fp_rate >= 0:
        raise ValueError(f"fp_rate={fp_rate} must be >= 0")
    candidates = [float(x) for x in sizes]
    if not candidates or candidates != sorted(candidates):
        raise ValueError(f"sizes={sizes} must be ascending candidate sizes")
    healthy_ml = sum(c.healthy_ml for c in components)
    if healthy_ml <= 0:
        raise ValueError("the healthy validation slices hold no brain voxel; the false-positive rate is undefined")
    fp = np.concatenate([c.mm3[c.false_positive] for c in components])
    rates = [float((fp >= max(size, np.finfo(float).tiny)).sum() / (healthy_ml / 100.0)) for size in candidates]
    chosen = next((i for i, rate in enumerate(rates) if rate <= fp_rate + 1e-12), len(candidates) - 1)
    return candidates[chosen], rates[chosen], rates


def calibrate_volume_mode(
    volumes: Sequence[ValidationVolume],
    pixel_quantiles: Sequence[float] = PIXEL_QUANTILES,
    min_lesion_mm3: Sequence[float] = MIN_LESION_MM3,
    map_filters: Sequence[int] = MAP_FILTERS,
    fp_rate: float = DEFAULT_FP_RATE,
) -> VolumeCalibration:
    """Choose the volume family's decisions on validation volumes with image-level labels only.

    1. For every map filter and pixel level q, the threshold is the q-quantile of the map values
       of the brain pixels of all healthy validation slices.
    2. Each (filter, q) gets its minimum lesion size by the false-positive rate (:func:`fp_rate_size`).
    3. (filter, q) is the pair whose rule "unhealthy iff the post-processed mask is not empty" (at its
       size) is most accurate (ties: the first in grid order).
    4. With that mask, each health statistic, raw and averaged with its neighbours, gets its best
       threshold (:func:`best_threshold`); the most accurate pair is kept (ties: the order of
       :data:`HEALTH_STATISTICS`, raw first).

    Args:
        volumes: whole validation volumes (every brain slice, in order), each with G = 1.
        pixel_quantiles, min_lesion_mm3, map_filters: the candidate grids (sizes ascending).
        fp_rate: false-positive components per 100 ml of healthy brain the size may leave.
    """
    if not volumes:
        raise ValueError("volume-mode calibration needs at least one validation volume")
    labels = np.concatenate([v.labels for v in volumes]).astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("volume-mode calibration needs healthy and unhealthy validation slices")
    healthy = [torch.from_numpy(~v.labels.astype(bool))[:, None, None] for v in volumes]
    grid, best, healthy_ml = [], None, 0.0
    for map_filter in map_filters:
        maps = [volume_map(v.result.aggregated_map[0], map_filter).float().cpu() for v in volumes]
        healthy_values = torch.cat([m[v.inputs.brain & h] for m, v, h in zip(maps, volumes, healthy)])
        if healthy_values.numel() == 0:
            raise ValueError("the healthy validation slices hold no brain pixel")
        sample = healthy_values[:: max(1, healthy_values.numel() // 4_000_000)].double()
        levels = torch.quantile(sample, torch.tensor(list(pixel_quantiles), dtype=torch.float64))
        for q, level in zip(pixel_quantiles, levels.tolist()):
            components = [VolumeComponents.of((m >= level) & v.inputs.brain, v) for m, v in zip(maps, volumes)]
            healthy_ml = sum(c.healthy_ml for c in components)
            size, rate, rates = fp_rate_size(components, fp_rate, min_lesion_mm3)
            largest = np.concatenate([c.slice_largest for c in components])
            flagged = (largest > 0) & (largest >= size)
            accuracy = float((flagged == labels).mean())
            grid.append({"map_filter": map_filter, "pixel_quantile": float(q), "pixel_threshold": float(level),
                         "min_lesion_mm3": size, "fp_per_100ml": rate, "fp_per_100ml_by_size": rates,
                         "accuracy": accuracy})  # fmt: skip
            if best is None or accuracy > best[0] + 1e-12:
                best = (accuracy, map_filter, float(q), float(level), size, rate)
    mask_accuracy, filter_star, q_star, level_star, size_star, rate_star = best
    masks_star = [keep_lesions((volume_map(v.result.aggregated_map[0], filter_star).float().cpu() >= level_star) & v.inputs.brain,
                               v.inputs.slice_indices, v.inputs.voxel_mm, size_star) for v in volumes]  # fmt: skip

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
        size_rule="fp_rate",
        fp_rate=float(fp_rate),
        fp_per_100ml=rate_star,
        healthy_ml=float(healthy_ml),
        candidates=candidates,
        grid=grid,
        size_candidates=[float(x) for x in min_lesion_mm3],
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
            e.g. :meth:`anofpdm_monai.inferers.ForwardProcessInferer.forward_process`.
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
    """The section's calibration hook: :func:`calibrate_volume_mode` on ``context.cases`` whole validation patients
    at ``context.fp_rate``."""
    return calibrate_volume_mode(validation_volumes(context.store, context.forward, context.cases, context.seed), fp_rate=context.fp_rate)


def volume_decision(result: ForwardProcessResult, volume: VolumeInputs, calibration, section: VolumeCalibration, setup: str) -> SegmentationResult:
    """The :class:`~anofpdm_monai.methods.Decision` hook of the volume family (:func:`volume_segment`)."""
    if volume is None:
        raise ValueError("the volume decision needs the volume's VolumeInputs")
    return volume_segment(result, volume, section, setup=setup)


def describe(volume: VolumeCalibration) -> str:
    """One line on the calibrated volume family, for the calibration's log."""
    if volume.size_rule == "fp_rate":
        met = "" if volume.fp_per_100ml <= volume.fp_rate + 1e-12 else ", NOT met by any candidate size (largest taken)"
        size = (f"components >= {volume.min_lesion_mm3:g} mm^3 (healthy slices: {volume.fp_per_100ml:.3g} false-positive "
                f"components per 100 ml at fp_rate {volume.fp_rate:g}{met}; {volume.healthy_ml:.0f} ml)")  # fmt: skip
    else:
        size = f"components >= {volume.min_lesion_mm3:g} mm^3 (chosen by accuracy)"
    return (f"volume family ({volume.n_val_volumes} patients, {volume.n_val_slices} slices): pixel level q={volume.pixel_quantile} "
            f"(map >= {volume.pixel_threshold:.4g}), {size}, health by "
            f"{volume.health}{' (with neighbours)' if volume.smooth_slices else ''}: accuracy {volume.accuracy:.3f}")  # fmt: skip


def migrate_section(data: dict[str, Any], version: int) -> dict[str, Any]:
    """The ``"volume"`` object of a ``calibration.json`` of schema ``version`` as the current one.

    Version 1 wrote the section as version 2 does; versions 1 and 2 chose the minimum lesion size with q by
    image-level accuracy and did not say so (read as ``size_rule: "accuracy"``, no rate).
    """
    if version < 3:
        data = {"size_rule": "accuracy", "fp_rate": None, "fp_per_100ml": None, "healthy_ml": None, **data}
    return data


SECTION = CalibrationSection(
    "volume", VolumeCalibration, calibrate_section, describe=describe, migrate=migrate_section,
    missing="recalibrate with volume mode on (anofpdm calibrate -m MODEL -d PREP --volume-only) to use the -volume methods",
)  # fmt: skip
register_decision(Decision("volume", volume_decision, section=SECTION, needs_volume=True, input_mask=input_grid_mask))
for _encoding in ENCODINGS:
    register(AnoFPDMMethod(
        f"anofpdm-{_encoding}-volume",
        f"the volume family on the {_encoding.upper()} forward process: brain-pixel threshold, 3-D components in mm^3, calibrated health statistic",
        encoding=_encoding, variant="volume",
    ))  # fmt: skip
