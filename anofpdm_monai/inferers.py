"""Inferers: AnoFPDM on batches of slices, and on whole patient volumes (MONAI ``Inferer`` style).

:class:`SliceInferer` runs the forward-process engine and the per-slice decisions over slices in
batches; :class:`VolumeInferer` wraps it with the model folder's preprocessing chain and its
inverse, so that a patient's NIfTI files go in and a mask and an anomaly map on the input's own
grid come out.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import Inferer
from scipy import ndimage
from tqdm.auto import tqdm

from anofpdm_monai.bundled import resolve_model_dir
from anofpdm_monai.calibration import Calibration
from anofpdm_monai.forward_process import ForwardProcessResult, run_forward_process
from anofpdm_monai.io import InputError, check_case_id, save_like
from anofpdm_monai.methods import anofpdm_methods
from anofpdm_monai.networks import NoisePredictor, build_scheduler, load_model_folder, resolve_device, use_bf16
from anofpdm_monai.segmentation import SegmentationResult, segment
from anofpdm_monai.transforms import PreprocessedCase, preprocess_with, slices_to_volume
from anofpdm_monai.volume_mode import VolumeCalibration, VolumeInputs, volume_segment

# Slices per forward process. Each network call sees 2 x this many inputs; 8 slices (16 inputs of
# 64 x 64) was the fastest per slice on 2 CPU cores (10.5 ms per input against 26 ms at 200 inputs,
# where activations overflow the caches). Raise it on a GPU.
DEFAULT_BATCH_SIZE = 8

# method name -> (encoding, decision variant), from the registry (anofpdm_monai.methods)
ANOFPDM_METHODS = anofpdm_methods()
VARIANTS = ("aggregated", "last", "volume")


def calibration_path(model_dir: str | Path, encoding: str) -> Path:
    """``calibration.json`` for DDIM (the default), ``calibration_ddpm.json`` for DDPM."""
    return Path(model_dir) / ("calibration.json" if encoding == "ddim" else f"calibration_{encoding}.json")


def load_calibration(model_dir: str | Path, encoding: str) -> Calibration:
    """The calibration of ``encoding``; falls back to the DDIM one with a warning."""
    path = calibration_path(model_dir, encoding)
    if not path.is_file() and encoding != "ddim" and calibration_path(model_dir, "ddim").is_file():
        warnings.warn(f"{path} not found; using the DDIM calibration for {encoding} (run anofpdm calibrate --encoding {encoding})")
        path = calibration_path(model_dir, "ddim")
    return Calibration.load(path)


def check_calibration_fits(calibration: Calibration, config, model_dir: str | Path, encoding: str) -> None:
    """The calibration must describe this model's map channels: one D per map channel, indices within the inputs."""
    maps = config.preprocess.map_channels
    path = calibration_path(model_dir, encoding)
    fix = "rerun `anofpdm calibrate -m MODEL_DIR -d PREP` to recreate it"
    if len(calibration.D) != len(maps):
        raise InputError(
            f"{path}: D holds {len(calibration.D)} value(s) but config.json has {len(maps)} map channel(s) "
            f"({', '.join(maps)}); {fix}"
        )
    if any(i >= config.network.in_channels for i in calibration.map_channel_indices):
        raise InputError(
            f"{path}: map_channel_indices {calibration.map_channel_indices} point beyond the model's "
            f"{config.network.in_channels} input channels (config.json); {fix}"
        )


def volume_calibration(calibration: Calibration, source: str | Path) -> VolumeCalibration:
    """The volume family's part of a calibration; an InputError saying how to add it when it is missing."""
    if calibration.volume is None:
        raise InputError(
            f"{source}: this calibration has no volume-mode decisions (it was made before them or without them); "
            f"recalibrate with volume mode on (anofpdm calibrate ... --encoding {calibration.encoding}) to use the -volume methods"
        )
    try:
        return VolumeCalibration.from_dict(calibration.volume)
    except (TypeError, ValueError) as err:
        raise InputError(f"{source}: the 'volume' section is not valid ({err}); recalibrate") from None


def slice_seeds(seed: int, case_id: str, slice_indices: Sequence[int]) -> list[int]:
    """One engine seed per slice, from (seed, case id, slice index).

    A slice's random numbers, and so its outputs, do not depend on the batch size, on which other
    slices were run (``--max-slices``) or on the order of the cases.
    """
    case_key = int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "little")
    return [int(np.random.SeedSequence([seed, case_key, int(i)]).generate_state(1, np.uint64)[0]) for i in slice_indices]


class SliceInferer(Inferer):
    """AnoFPDM on one volume's slices: the forward process in batches, then the decisions once on the volume.

    The forward process streams per batch (memory stays flat in N); its per-slice statistics are
    joined and every decision (health, t_e, aggregation, threshold, post-processing, mixed setup)
    runs once on the whole volume.

    Args:
        predict_eps: noise predictor ``(x (N, C, S, S), t (N,), labels (N,)) -> (N, C, S, S)``.
        alphas_cumprod: (T,) the training schedule.
        calibration: w*, thr_01, D and the calibrated N, k and encoding (and the volume family's
            decisions when ``"volume"`` is among the variants).
        variants: decision variants to produce from the same forward process (:data:`VARIANTS`).
        encoding: ``ddim`` or ``ddpm``; default the calibration's.
        steps: forward-step budget N; default the calibration's.
        stride: stride k; default the calibration's.
        setup: ``mixed`` (predicted-healthy slices get empty masks, or for the volume family
            unanchored components are dropped) or ``unhealthy``.
        batch_size: slices per forward process (each network call sees 2 x batch_size inputs).
        seed: with the case id and slice index, seeds each slice's generator (:func:`slice_seeds`).
        device: where the network runs.
    """

    def __init__(
        self,
        predict_eps,
        alphas_cumprod: torch.Tensor,
        calibration: Calibration,
        *,
        variants: Sequence[str] = ("aggregated",),
        encoding: str | None = None,
        steps: int | None = None,
        stride: int | None = None,
        setup: str = "mixed",
        batch_size: int = DEFAULT_BATCH_SIZE,
        seed: int = 0,
        device: torch.device | str = "cpu",
        progress: bool = False,
        calibration_source: str | Path = "calibration.json",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"variants {unknown} unknown; choose from {VARIANTS}")
        self.predict_eps = predict_eps
        self.alphas_cumprod = alphas_cumprod
        self.calibration = calibration
        self.variants = tuple(variants)
        self.volume_calibration = volume_calibration(calibration, calibration_source) if "volume" in self.variants else None
        self.encoding = encoding or calibration.encoding
        self.steps = steps or calibration.steps
        self.stride = stride or calibration.stride
        if (self.steps, self.stride, self.encoding) != (calibration.steps, calibration.stride, calibration.encoding):
            warnings.warn(
                f"inference uses N={self.steps}, k={self.stride}, {self.encoding} but the calibration was made with "
                f"N={calibration.steps}, k={calibration.stride}, {calibration.encoding}; thr_01 and D may not transfer"
            )
        self.setup = setup
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.progress = progress

    def forward_process(self, inputs: torch.Tensor, case_id: str = "", slice_indices: Sequence[int] | None = None) -> ForwardProcessResult:
        """The forward process of (N, C, S, S) slices at w*, in batches, joined along the slices (G = 1)."""
        indices = range(inputs.shape[0]) if slice_indices is None else slice_indices
        seeds = slice_seeds(self.seed, case_id, indices)
        parts = []
        starts = range(0, inputs.shape[0], self.batch_size)
        for start in tqdm(starts, desc="slices", unit="batch", disable=not self.progress, leave=False):
            x0 = inputs[start : start + self.batch_size].to(self.device)
            generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds[start : start + self.batch_size]]
            parts.append(
                run_forward_process(
                    self.predict_eps,
                    x0,
                    self.alphas_cumprod.to(self.device),
                    guidance_scales=[self.calibration.w],
                    steps=self.steps,
                    stride=self.stride,
                    encoding=self.encoding,
                    map_channels=self.calibration.map_channel_indices,
                    include_end_step=self.calibration.include_end_step,
                    inversion=self.calibration.inversion,
                    generator=generators,
                )
            )
        return ForwardProcessResult.concatenate(parts)

    def decide(self, result: ForwardProcessResult, variant: str, volume: VolumeInputs | None = None) -> SegmentationResult:
        """The decisions of one variant on a whole volume's forward process (on the CPU)."""
        if variant == "volume":
            if volume is None:
                raise ValueError("the volume variant needs the volume's VolumeInputs")
            decided = volume_segment(result, volume, self.volume_calibration, setup=self.setup)
        else:
            decided = segment(result, self.calibration, setup=self.setup, variant=variant)
        return decided.cpu(network_calls=result.network_calls)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        case_id: str = "",
        slice_indices: Sequence[int] | None = None,
        voxel_mm: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> dict[str, SegmentationResult]:
        """Run on one volume's (N, C, S, S) slices in [-1, 1]; returns one result per variant.

        Args:
            inputs: the slices, in slice order.
            case_id: the case's id (seeds, with the slice indices, the per-slice random numbers).
            slice_indices: (N,) axial index of each slice (default 0 .. N-1).
            voxel_mm: voxel size of the stacked slices (the volume family's sizes are in mm^3).
        """
        result = self.forward_process(inputs, case_id, slice_indices)
        volume = VolumeInputs.from_slices(inputs, slice_indices, voxel_mm) if "volume" in self.variants else None
        return {v: self.decide(result, v, volume) for v in self.variants}


@dataclass
class VolumeResult:
    """One patient's outputs.

    Attributes:
        case: the preprocessed case (slices, masks if a lesion file was given, geometry).
        slices: per-slice outputs for the brain slices.
        mask: (X, Y, Z) uint8 mask on the input grid.
        anomaly: (X, Y, Z) float32 anomaly map on the input grid.
        seconds: wall time of preprocessing and inference.
    """

    case: PreprocessedCase
    slices: SegmentationResult
    mask: np.ndarray
    anomaly: np.ndarray
    seconds: float

    @property
    def lesion_ml(self) -> float:
        zooms = np.abs(np.linalg.det(self.case.geometry.input_affine[:3, :3]))
        return float(self.mask.sum() * zooms / 1000.0)


class VolumeInferer(Inferer):
    """Patient NIfTI files in, mask and anomaly map on the input's own grid out.

    Args:
        model_dir: a trained model folder (config.json, model.pt, calibration.json), or "bundled".
        method: one of ``anofpdm-ddim`` (default), ``anofpdm-ddpm``, ``anofpdm-ddim-last``, ``anofpdm-ddpm-last``.
        steps, stride: override the calibrated N and k.
        batch_size: slices per forward process; bounds peak memory.
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: engine seed.
        precision: ``auto`` (bf16 where the device computes it natively, else fp32), ``fp32`` or ``bf16``.
        keep_3d_components: remove 3-D connected components of the volume mask smaller than this (voxels); 0 keeps all.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        method: str = "anofpdm-ddim",
        steps: int | None = None,
        stride: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str = "auto",
        seed: int = 0,
        precision: str = "auto",
        keep_3d_components: int = 0,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if method not in ANOFPDM_METHODS:
            raise ValueError(f"--method {method!r}: choose one of {sorted(ANOFPDM_METHODS)}")
        self.model_dir = resolve_model_dir(model_dir)
        self.method = method
        encoding, variant = ANOFPDM_METHODS[method]
        self.device = resolve_device(device)
        network, self.config = load_model_folder(self.model_dir, self.device)
        calibration = load_calibration(self.model_dir, encoding)
        check_calibration_fits(calibration, self.config, self.model_dir, encoding)
        self.slice_inferer = SliceInferer(
            NoisePredictor(network, autocast=use_bf16(precision, self.device)),
            build_scheduler(self.config.diffusion).alphas_cumprod,
            calibration,
            variants=(variant,),
            encoding=encoding,
            steps=steps,
            stride=stride,
            batch_size=batch_size,
            seed=seed,
            device=self.device,
            progress=progress,
        )
        self.variant = variant
        self.steps_override, self.stride_override = steps, stride  # None: each calibration's own N and k
        self.keep_3d_components = keep_3d_components

    def preprocess(
        self,
        channel_paths: Sequence[str | Path],
        label_path: str | Path | None = None,
        allowed_labels: Sequence[int] | None = None,
    ) -> PreprocessedCase:
        """Apply the model's own preprocessing chain (the one its store was built with).

        ``allowed_labels``: the lesion labels the layout defines (e.g. BraTS 1, 2, 4); other values are refused.
        """
        expected = self.config.preprocess.channel_names
        if len(channel_paths) != len(expected):
            first = Path(channel_paths[0]) if channel_paths else self.model_dir
            raise InputError(
                f"{first}: the case has {len(channel_paths)} channel file(s) but the model takes {len(expected)} "
                f"({', '.join(expected)}); give one file per channel in that order"
            )
        return preprocess_with(self.config.preprocess, channel_paths, label_path, allowed_labels)

    def __call__(self, inputs: Sequence[str | Path], label: str | Path | None = None, case_id: str = "") -> VolumeResult:  # type: ignore[override]
        """Segment one case given its channel files (in the model's channel order); ``case_id`` seeds its slices."""
        start = time.perf_counter()
        case = self.preprocess(inputs, label)
        outputs = self.slice_inferer(case.images, case_id, case.geometry.slice_indices, case.geometry.slice_voxel_mm)[self.variant]
        mask = slices_to_volume(outputs.masks.float(), case.geometry, "mask")
        if self.keep_3d_components > 0:
            mask = remove_small_3d_components(mask, self.keep_3d_components)
        anomaly = slices_to_volume(outputs.maps, case.geometry, "map")
        return VolumeResult(case, outputs, mask, anomaly, time.perf_counter() - start)

    @staticmethod
    def write(result: VolumeResult, out_dir: str | Path, case_id: str, save_png: bool = False) -> list[Path]:
        """Write ``CASE.nii.gz`` (uint8 mask) and ``CASE_anomaly.nii.gz`` (float32) on the input grid, atomically."""
        import nibabel as nib

        check_case_id(case_id, out_dir)
        out_dir = Path(out_dir)
        reference = nib.load(str(result.case.geometry.reference))
        written: list[Path] = []
        try:
            written.append(save_like(result.anomaly, reference, out_dir / f"{case_id}_anomaly.nii.gz", np.float32))
            if save_png:
                from anofpdm_monai.visualize import save_overlay

                png = out_dir / f"{case_id}.png"
                written.append(save_overlay(result.case.images, result.slices.maps, result.slices.masks, png,
                                            slice_indices=list(result.case.geometry.slice_indices)))  # fmt: skip
            # The mask is written last: its presence marks the case as finished (for --continue).
            written.append(save_like(result.mask, reference, out_dir / f"{case_id}.nii.gz", np.uint8))
        except BaseException:
            for path in written:  # a failed case leaves no partial outputs behind
                path.unlink(missing_ok=True)
            raise
        return written


def remove_small_3d_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop 26-connected components of a (X, Y, Z) mask with fewer than ``min_voxels`` voxels."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels].astype(mask.dtype)
