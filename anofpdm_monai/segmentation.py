"""Per-slice decisions of AnoFPDM (ALGORITHM.md section 5); no pixel labels anywhere.

Registers the paper's decision variants (``aggregated``: eq. 20; ``last``: the SAM at t_e) and the
methods ``anofpdm-ddim``, ``anofpdm-ddim-last``, ``anofpdm-ddpm``, ``anofpdm-ddpm-last`` on them
(:mod:`anofpdm_monai.methods`).

Shapes: B slices, K visited timesteps, M map channels, S x S pixels.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from anofpdm_monai.forward_process import ForwardProcessResult
from anofpdm_monai.metrics import brain_foreground
from anofpdm_monai.methods import ENCODINGS, AnoFPDMMethod, Decision, register, register_decision


class Thresholds(Protocol):
    """What :func:`decide_slices` reads of a calibration (e.g. :class:`anofpdm_monai.calibration.Calibration`)."""

    thr_01: float
    D: list[float]

SETUPS = ("mixed", "unhealthy")
VARIANTS = ("aggregated", "last")
ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)
MEDIAN_KERNEL = 5
REFERENCE_MIN_AREA = 40
REFERENCE_SIZE = 128


@dataclass
class VolumeInputs:
    """What the volume decisions need of one volume besides the forward process.

    Attributes:
        brain: (B, S, S) bool brain pixels of the slices (:func:`anofpdm_monai.metrics.brain_foreground`).
        slice_indices: (B,) axial index of each slice; slices whose indices are not consecutive are
            not connected in 3-D (e.g. a ``--max-slices`` subset).
        voxel_mm: (x, y, z) size in mm of a voxel of the stacked S x S slices.
    """

    brain: torch.Tensor
    slice_indices: np.ndarray
    voxel_mm: tuple[float, float, float]

    @classmethod
    def from_slices(cls, x0: torch.Tensor, slice_indices: Sequence[int] | None, voxel_mm: Sequence[float] | None) -> VolumeInputs:
        """From (B, C, S, S) slices in [-1, 1]; ``slice_indices`` None means consecutive slices."""
        if voxel_mm is None:
            raise ValueError(
                "the slices' voxel size is unknown (a store preprocessed before it was recorded); "
                "the volume family sizes lesions in mm^3: preprocess the cohort again"
            )
        indices = np.arange(x0.shape[0]) if slice_indices is None else np.asarray(slice_indices, dtype=np.int64)
        if indices.shape != (x0.shape[0],):
            raise ValueError(f"slice_indices holds {indices.shape[0]} entries for {x0.shape[0]} slices")
        if len(voxel_mm) != 3 or not all(float(v) > 0 for v in voxel_mm):
            raise ValueError(f"voxel_mm={tuple(voxel_mm)} must be three positive sizes in mm")
        return cls(brain_foreground(x0).cpu(), indices, tuple(float(v) for v in voxel_mm))



def health_similarity(mse_h: torch.Tensor, mse_u: torch.Tensor) -> torch.Tensor:
    """Health-classification score of ALGORITHM.md section 5 (paper 4.2).

    Cosine similarity, over the visited steps, between ``mean_m mse_h[., m]`` and ``mean_m mse_u[., m]``.
    A zero vector gives similarity 0 (``torch.nn.functional.cosine_similarity`` with eps 1e-8).

    Args:
        mse_h: (..., K, M) HGP errors (eq. 16), e.g. (B, K, M) or (G, B, K, M).
        mse_u: (..., K, M) UGP errors (eq. 17).

    Returns:
        (...) similarity in [-1, 1] (in [0, 1] for non-negative errors), e.g. (B,).
    """
    return F.cosine_similarity(mse_h.mean(dim=-1), mse_u.mean(dim=-1), dim=-1, eps=1e-8)


def predict_unhealthy(sim: torch.Tensor, thr_01: float) -> torch.Tensor:
    """Health decision of ALGORITHM.md section 5: a slice is unhealthy iff ``sim <= thr_01``.

    Args:
        sim: (B,) similarities from :func:`health_similarity`.
        thr_01: calibrated threshold (section 6).

    Returns:
        (B,) bool, True for predicted unhealthy.
    """
    return sim <= thr_01


def median_filter(image: torch.Tensor, kernel_size: int = MEDIAN_KERNEL) -> torch.Tensor:
    """Median filter over the last two axes with ZERO padding (``scipy.ndimage.median_filter(mode="constant")``).

    Zero padding treats the outside of the slice as "no anomaly", which is what an anomaly map's
    background is.

    Args:
        image: (B, S, S) maps.
        kernel_size: odd window side.

    Returns:
        (B, S, S) filtered maps.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size} must be an odd positive integer")
    batch, height, width = image.shape
    patches = F.unfold(image[:, None], kernel_size=kernel_size, padding=kernel_size // 2)  # (B, k*k, S*S)
    return patches.median(dim=1).values.view(batch, height, width)


def anomaly_map(per_channel_map: torch.Tensor) -> torch.Tensor:
    """Slice anomaly map of ALGORITHM.md section 5 (after eq. 20): channel mean, then a 5 x 5 median filter.

    The median filter zero-pads the borders (see :func:`median_filter`).

    Args:
        per_channel_map: (B, M, S, S) per-channel maps (aggregated maps AAM, or SAM at t_e).

    Returns:
        (B, S, S) anomaly maps.
    """
    return median_filter(per_channel_map.mean(dim=1), MEDIAN_KERNEL)


def rowwise_quantile(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quantile ``q[i]`` of row ``values[i]`` with linear interpolation (as ``torch.quantile``'s default).

    Args:
        values: (N, P) rows.
        q: (N,) quantiles in [0, 1].

    Returns:
        (N,) the quantiles.
    """
    ordered = values.sort(dim=-1).values
    position = q.to(values.dtype).clamp(0, 1) * (values.shape[-1] - 1)
    low = position.floor().long()
    high = position.ceil().long()
    v_low = ordered.gather(-1, low[:, None])[:, 0]
    v_high = ordered.gather(-1, high[:, None])[:, 0]
    return v_low + (v_high - v_low) * (position - low.to(values.dtype))


def dynamic_threshold(
    per_channel_map: torch.Tensor, dmax: torch.Tensor, D: torch.Tensor | list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic threshold of ALGORITHM.md section 5 (paper Algorithm 1).

    ``r[m] = round(clamp(dmax[m] / D[m], 0, 1), 2)``, ``q[m] = 0.98 - 0.08 * r[m]`` and
    ``thr = mean_m quantile(AAM[m], q[m])`` over the slice's S x S pixels.

    Args:
        per_channel_map: (B, M, S, S) per-channel aggregated maps AAM[m].
        dmax: (B, M) maximum divergence per map channel.
        D: (M,) calibrated divergence scale per map channel, each > 0 (section 6).

    Returns:
        ``(quantile, threshold)``: (B, M) quantile levels q and (B,) thresholds.
    """
    batch, channels = per_channel_map.shape[:2]
    D = torch.as_tensor(D, dtype=per_channel_map.dtype, device=per_channel_map.device)
    if D.shape != (channels,) or not bool((D > 0).all()):
        raise ValueError(f"D must hold {channels} positive values (one per map channel), got {D.tolist()}")
    ratio = (dmax.to(per_channel_map.dtype) / D).clamp(0, 1)
    ratio = torch.round(ratio * 100) / 100
    quantile = 0.98 - 0.08 * ratio
    per_channel = rowwise_quantile(per_channel_map.reshape(batch * channels, -1), quantile.reshape(-1))
    return quantile, per_channel.view(batch, channels).mean(dim=1)


def min_component_area(image_size: int) -> int:
    """Largest area the paper's post-processing removes: 40 pixels at S = 128, scaled with S^2, at least 1.

    The paper removes components of area <= this; in the terms of :func:`keep_components` (which keeps
    components of at least ``min_size``) its smallest kept component is one pixel more.
    """
    return max(1, round(REFERENCE_MIN_AREA * (image_size / REFERENCE_SIZE) ** 2))


SIZE_UNITS = ("voxels", "mm3")
"""Units of a minimum component size (:func:`keep_components`): a voxel (or pixel) count, or a volume in mm^3."""


VOLUME_CONNECTIVITY = {26: np.ones((3, 3, 3), dtype=bool), 18: ndimage.generate_binary_structure(3, 2),
                       6: ndimage.generate_binary_structure(3, 1)}  # fmt: skip
"""Neighbourhoods of a voxel by connectivity: 26 (faces, edges, corners), 18 (faces, edges), 6 (faces)."""


def label_components(mask: np.ndarray, planar: bool = False, connectivity: int = 26) -> tuple[np.ndarray, np.ndarray]:
    """Connected components (8-connected in a plane; 26-, 18- or 6-connected in a volume), with ``scipy.ndimage.label``.

    Args:
        mask: bool array, (..., S, S) planes when ``planar`` (each plane labelled alone, labels distinct
            across planes), else one (X, Y, Z) volume.
        connectivity: of a volume, a key of :data:`VOLUME_CONNECTIVITY` (default 26: full); planes are 8-connected.

    Returns:
        ``(labels, sizes)``: int labels of the shape of ``mask`` (0 background, components numbered 1..n) and
        the voxel count of each label (index 0 unused; ``len(sizes) - 1`` components).
    """
    mask = np.asarray(mask, dtype=bool)
    if not planar:
        if mask.ndim != 3:
            raise ValueError(f"a volume mask must be 3-D (X, Y, Z), got shape {mask.shape}")
        if connectivity not in VOLUME_CONNECTIVITY:
            raise ValueError(f"connectivity={connectivity} must be one of {sorted(VOLUME_CONNECTIVITY)}")
        labels, count = ndimage.label(mask, structure=VOLUME_CONNECTIVITY[connectivity])
        return labels, np.bincount(labels.ravel(), minlength=count + 1)
    planes = mask.reshape(-1, *mask.shape[-2:])
    labels = np.zeros(planes.shape, dtype=np.int64)
    offset, structure = 0, np.ones((3, 3), dtype=bool)
    for i, plane in enumerate(planes):
        plane_labels, count = ndimage.label(plane, structure=structure)
        labels[i] = np.where(plane_labels > 0, plane_labels + offset, 0)
        offset += count
    return labels.reshape(mask.shape), np.bincount(labels.ravel(), minlength=offset + 1)


def keep_components(mask: ArrayOrTensor, min_size: float, *, unit: str, voxel_mm3: float | None = None,
                    planar: bool = False) -> ArrayOrTensor:  # fmt: skip
    """The project's one connected-component filter: keep the components of at least ``min_size``, drop the others.

    Components are fully connected (8 in a plane, 26 in a volume; :func:`label_components`), computed on
    the CPU. A component's size is its voxel count (``unit="voxels"``) or that count times ``voxel_mm3``
    (``unit="mm3"``); one of exactly ``min_size`` is kept. The paper's per-slice post-processing keeps
    ``min_component_area(S) + 1`` pixels and more, the volume family's keeps ``min_lesion_mm3`` and more.

    Args:
        mask: bool (or 0/1) tensor or array: (..., S, S) planes when ``planar``, else one (X, Y, Z) volume.
        min_size: smallest kept size, in ``unit``; 0 or less keeps every component.
        unit: one of :data:`SIZE_UNITS`.
        voxel_mm3: volume of one voxel in mm^3 (``unit="mm3"`` only).
        planar: filter each plane of the last two axes alone.

    Returns:
        A mask of the same kind, shape, dtype (and device) as ``mask``.
    """
    if unit not in SIZE_UNITS:
        raise ValueError(f"unit={unit!r} must be one of {SIZE_UNITS}")
    if unit == "mm3" and (voxel_mm3 is None or not np.isfinite(voxel_mm3) or voxel_mm3 <= 0):
        raise ValueError(f"voxel_mm3={voxel_mm3} must be a positive volume to size components in mm^3")
    if unit == "voxels" and voxel_mm3 is not None:
        raise ValueError("voxel_mm3 is for unit='mm3' only")
    if not np.isfinite(min_size):
        raise ValueError(f"min_size={min_size} must be finite")
    tensor = isinstance(mask, torch.Tensor)
    array = mask.detach().to("cpu", torch.bool).numpy() if tensor else np.asarray(mask).astype(bool)
    if min_size <= 0 or not array.any():
        return mask
    labels, sizes = label_components(array, planar=planar)
    measured = sizes * (float(voxel_mm3) if unit == "mm3" else 1.0)
    keep = measured >= min_size
    keep[0] = False
    kept = keep[labels]
    if tensor:
        return torch.from_numpy(kept).to(device=mask.device, dtype=mask.dtype)
    return kept.astype(mask.dtype, copy=False)


def mixed_setup_masks(masks: ArrayOrTensor, predicted_unhealthy: ArrayOrTensor) -> ArrayOrTensor:
    """The paper's mixed setup (ALGORITHM.md section 5): a slice predicted healthy gets an all-zero mask.

    Args:
        masks: (B, S, S) bool, tensor or array.
        predicted_unhealthy: (B,) bool, of the same kind.
    """
    return masks & predicted_unhealthy[:, None, None]


@dataclass
class SegmentationResult:
    """Per-slice outputs of a decision (:func:`decide_slices`; B slices, M map channels, S x S pixels).

    Attributes:
        maps: (B, S, S) anomaly maps (median-filtered mean over map channels).
        masks: (B, S, S) bool predicted lesion masks after post-processing.
        predicted_unhealthy: (B,) bool health decision.
        sim: (B,) health similarity.
        end_step: (B, M) long end step t_e as a timestep.
        dmax: (B, M) maximum divergence.
        quantile: (B, M) quantile levels of the dynamic threshold.
        threshold: (B,) dynamic thresholds.
        mixed_masks: (B, S, S) bool masks in the mixed setup (the method's own rule), whichever
            setup ``masks`` follows.
        network_calls: batched network calls per slice that produced it (0 when not counted).
        health: (B,) the score the health decision thresholds, larger = more likely unhealthy
            (the paper's variants: 1 - sim; the volume family: its calibrated statistic).
        health_threshold: a slice is predicted unhealthy when ``health`` reaches above it
            (the paper's variants: 1 - thr_01).
        divergence: (B, K) d(t) of eq. 12 at the visited timesteps, mean over the map channels.
        timesteps: (K,) the visited timesteps.
    """

    maps: torch.Tensor
    masks: torch.Tensor
    predicted_unhealthy: torch.Tensor
    sim: torch.Tensor
    end_step: torch.Tensor
    dmax: torch.Tensor
    quantile: torch.Tensor
    threshold: torch.Tensor
    mixed_masks: torch.Tensor
    network_calls: int = 0
    health: torch.Tensor | None = None
    health_threshold: float | None = None
    divergence: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None

    def cpu(self, network_calls: int | None = None) -> SegmentationResult:
        """A copy on the CPU with float32 maps (and ``network_calls`` set when given)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        moved = {k: v.cpu() for k, v in values.items() if isinstance(v, torch.Tensor)}
        moved["maps"] = moved["maps"].float()
        calls = self.network_calls if network_calls is None else network_calls
        return SegmentationResult(**{**values, **moved, "network_calls": calls})


def decide_slices(
    result: ForwardProcessResult,
    calibration: Thresholds,
    *,
    setup: str = "mixed",
    variant: str = "aggregated",
    min_area: int | None = None,
) -> SegmentationResult:
    """Masks and maps from one forward process (ALGORITHM.md section 5).

    Health decision from ``calibration.thr_01``; anomaly map from the per-channel aggregated maps
    (``variant="aggregated"``, eq. 20) or the SAM at t_e only (``variant="last"``); mask =
    ``map >= thr`` with the dynamic threshold from ``calibration.D``; 8-connected components of area <=
    ``min_area`` removed (:func:`keep_components` keeping ``min_area + 1`` pixels and more). In the ``"mixed"`` setup a slice predicted healthy gets an all-zero mask;
    in the ``"unhealthy"`` setup the mask is kept whatever the classification.

    Args:
        result: forward-process result for ONE guidance strength (G = 1; use ``result.select(g)``),
            normally the calibrated ``calibration.w``.
        calibration: provides ``thr_01`` and ``D`` (one value per map channel).
        setup: ``"mixed"`` or ``"unhealthy"``.
        variant: ``"aggregated"`` or ``"last"``.
        min_area: largest component area removed; None uses :func:`min_component_area` of S.

    Returns:
        A :class:`SegmentationResult`.
    """
    if result.guidance_scales.shape[0] != 1:
        raise ValueError(
            f"result must hold one guidance strength (G = 1), got G = {result.guidance_scales.shape[0]}; "
            "use result.select(g)"
        )
    if setup not in SETUPS:
        raise ValueError(f"setup={setup!r} must be one of {SETUPS}")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} must be one of {VARIANTS}")
    per_channel = (result.aggregated_map if variant == "aggregated" else result.last_map)[0]
    dmax = result.dmax[0]
    sim = health_similarity(result.mse_h[0], result.mse_u[0])
    unhealthy = predict_unhealthy(sim, calibration.thr_01)
    maps = anomaly_map(per_channel)
    quantile, threshold = dynamic_threshold(per_channel, dmax, calibration.D)
    masks = maps >= threshold[:, None, None]
    area = min_component_area(maps.shape[-1]) if min_area is None else min_area
    masks = keep_components(masks, area + 1, unit="voxels", planar=True)
    mixed = mixed_setup_masks(masks, unhealthy)
    return SegmentationResult(
        maps=maps,
        masks=mixed if setup == "mixed" else masks,
        predicted_unhealthy=unhealthy,
        sim=sim,
        end_step=result.end_step[0],
        dmax=dmax,
        quantile=quantile,
        threshold=threshold,
        mixed_masks=mixed,
        health=1.0 - sim,
        health_threshold=1.0 - float(calibration.thr_01),
        divergence=result.divergence[0].mean(dim=-1),
        timesteps=result.timesteps,
    )


def paper_decision(result: ForwardProcessResult, volume, calibration: Thresholds, section, setup: str, *, variant: str) -> SegmentationResult:
    """The :class:`~anofpdm_monai.methods.Decision` hook of the paper's variants (reads no section, no volume inputs)."""
    return decide_slices(result, calibration, setup=setup, variant=variant)


register_decision(Decision("aggregated", functools.partial(paper_decision, variant="aggregated")))
register_decision(Decision("last", functools.partial(paper_decision, variant="last")))
for _encoding in ENCODINGS:
    register(AnoFPDMMethod(f"anofpdm-{_encoding}", f"the paper's AnoFPDM, {_encoding.upper()} encoding, per-slice decisions on the aggregated map",
                           encoding=_encoding, variant="aggregated"))  # fmt: skip
    register(AnoFPDMMethod(f"anofpdm-{_encoding}-last", f"as anofpdm-{_encoding} on the sub-anomaly map at t_e only",
                           encoding=_encoding, variant="last"))  # fmt: skip
