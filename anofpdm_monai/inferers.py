"""Inferers: AnoFPDM on batches of slices, and on whole patient volumes (MONAI ``Inferer`` style).

:class:`ForwardProcessInferer` runs the forward-process engine and the per-slice decisions over slices in
batches; :class:`VolumeInferer` wraps it with the model folder's preprocessing chain and its
inverse, so that a patient's NIfTI files go in and a mask and an anomaly map on the input's own
grid come out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import Inferer
from tqdm.auto import tqdm

from anofpdm_monai.calibration import Calibration
from anofpdm_monai.config import PreprocessConfig
from anofpdm_monai.forward_process import ForwardProcessResult, run_forward_process
from anofpdm_monai.io import InputError, check_case_id, save_like, voxel_volume_mm3
from anofpdm_monai.methods import Decision, get_decision
from anofpdm_monai.outputs import case_record, segment_outputs
from anofpdm_monai.model import DEFAULT_BATCH_SIZE, AnoFPDMModel, InferenceSettings, calibration_path
from anofpdm_monai.segmentation import SegmentationResult, VolumeInputs, keep_components
from anofpdm_monai.transforms import CaseGeometry, PreprocessedCase, preprocess_with, slices_to_volume

def decision_section(calibration: Calibration, decision: Decision, source: str | Path):
    """The typed calibration section a decision reads (None when it reads none); an InputError saying how
    to add it when the calibration lacks it."""
    if decision.section is None:
        return None
    section = calibration.section(decision.section.name)
    if section is None:
        raise InputError(
            f"{source}: this calibration has no {decision.section.name!r} section (it was made before it or without it); "
            f"{decision.section.missing}"
        )
    return section


def check_budget(steps: int, stride: int, timesteps: int, chosen: bool = True) -> None:
    """Refuse a step budget N beyond the model's T training timesteps, and (when ``chosen`` by the user) a stride k
    that leaves fewer than two visited steps, where the forward process has nothing to compare (one line each)."""
    if not 1 <= steps <= timesteps:
        raise InputError(f"steps={steps}: the model was trained with {timesteps} diffusion timesteps, so the step budget "
                         f"lies in [1, {timesteps}]", arguments="steps")  # fmt: skip
    if chosen and len(range(0, steps, stride)) < 2:
        raise InputError(
            f"stride={stride} with steps={steps} visits only t = 0 (the visited steps are 0, k, 2k, ... below N); "
            "give a stride below half the steps", arguments=("stride", "steps"),
        )


def slice_seeds(seed: int, case_id: str, slice_indices: Sequence[int]) -> list[int]:
    """One engine seed per slice, from (seed, case id, slice index).

    A slice's random numbers, and so its outputs, do not depend on the batch size, on which other
    slices were run (``--max-slices``) or on the order of the cases.
    """
    case_key = int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "little")
    return [int(np.random.SeedSequence([seed, case_key, int(i)]).generate_state(1, np.uint64)[0]) for i in slice_indices]


class ForwardProcessInferer(Inferer):
    """AnoFPDM on one volume's slices: the forward process in batches, then the decisions once on the volume.

    The forward process streams per batch (memory stays flat in N); its per-slice statistics are
    joined and every decision (health, t_e, aggregation, threshold, post-processing, mixed setup)
    runs once on the whole volume.

    Args:
        predict_eps: noise predictor ``(x (N, C, S, S), t (N,), labels (N,)) -> (N, C, S, S)``.
        alphas_cumprod: (T,) the training schedule.
        calibration: w*, thr_01, D and the calibrated N, k and encoding (and the sections the
            variants' decisions read).
        variants: registered decision variants (:func:`anofpdm_monai.methods.get_decision`) to produce
            from the same forward process.
        encoding: ``ddim`` or ``ddpm``; default the calibration's.
        steps: forward-step budget N; default the calibration's.
        stride: stride k; default the calibration's.
        setup: ``mixed`` (each decision's own mixed rule, e.g. the paper's: predicted-healthy slices get
            empty masks) or ``unhealthy`` (masks kept whatever the health decision).
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
        self.predict_eps = predict_eps
        self.alphas_cumprod = alphas_cumprod
        self.calibration = calibration
        self.variants = tuple(variants)
        self.decisions = {v: get_decision(v) for v in self.variants}
        self.sections = {v: decision_section(calibration, d, calibration_source) for v, d in self.decisions.items()}
        self.encoding = encoding or calibration.encoding
        self.steps = steps or calibration.steps
        self.stride = stride or calibration.stride
        check_budget(self.steps, self.stride, int(alphas_cumprod.shape[0]), chosen=steps is not None or stride is not None)
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

    @classmethod
    def from_model(
        cls,
        model: AnoFPDMModel,
        settings: InferenceSettings,
        *,
        encoding: str | None = None,
        variants: Sequence[str] | None = None,
        setup: str = "mixed",
        progress: bool = False,
    ) -> ForwardProcessInferer:
        """The inferer of a loaded model with ``settings``.

        ``encoding`` and ``variants`` default to those of ``settings.method``; give them to run several
        variants of one encoding from one forward process (as ``evaluate`` does).
        """
        encoding = encoding or settings.encoding
        calibration = model.calibration(encoding)
        return cls(
            model.noise_predictor(settings.precision, compile=settings.compile),
            model.alphas_cumprod,
            calibration,
            variants=variants or (settings.variant,),
            encoding=encoding,
            steps=settings.steps,
            stride=settings.stride,
            setup=setup,
            batch_size=settings.batch_size,
            seed=settings.seed,
            device=model.device,
            progress=progress,
            calibration_source=calibration_path(model.folder, calibration.encoding),
        )

    def forward_process(
        self, inputs: torch.Tensor, case_id: str = "", slice_indices: Sequence[int] | None = None, progress: bool | None = None
    ) -> ForwardProcessResult:
        """The forward process of (N, C, S, S) slices at w*, in batches, joined along the slices (G = 1).

        ``progress`` (default: the inferer's setting) shows a bar over the batches.
        """
        indices = range(inputs.shape[0]) if slice_indices is None else slice_indices
        seeds = slice_seeds(self.seed, case_id, indices)
        parts = []
        starts = range(0, inputs.shape[0], self.batch_size)
        for start in tqdm(starts, desc="slices", unit="batch", disable=not (self.progress if progress is None else progress), leave=False):
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
        decided = self.decisions[variant].decide(result, volume, self.calibration, self.sections[variant], self.setup)
        return decided.cpu(network_calls=result.network_calls)

    def input_grid_mask(self, variant: str, slices: SegmentationResult, geometry: CaseGeometry, setup: str = "mixed") -> np.ndarray:
        """One variant's mask on the case's input grid: the one place a decision's mask leaves the slices.

        A decision with an ``input_mask`` hook (the volume family) decides there from the upsampled map;
        the others' slice masks (``slices.mixed_masks`` in the mixed setup, ``slices.masks`` in this
        inferer's own setup) go back through the inverse of the chain
        (:func:`~anofpdm_monai.transforms.slices_to_volume`).

        Args:
            variant: one of this inferer's variants.
            slices: its per-slice outputs on the case ((B, S, S) maps and masks, (B,) health).
            geometry: the case's :class:`~anofpdm_monai.transforms.CaseGeometry`.
            setup: ``"mixed"`` or this inferer's own setup.

        Returns:
            (X, Y, Z) uint8 0/1 on the input grid.
        """
        decision = self.decisions[variant]
        if decision.input_mask is not None:
            return decision.input_mask(slices, geometry, self.sections[variant], setup)
        if setup not in ("mixed", self.setup):
            raise ValueError(f"setup={setup!r}: this inferer decides 'mixed' and {self.setup!r} masks only")
        masks = slices.mixed_masks if setup == "mixed" else slices.masks
        return slices_to_volume(masks.float(), geometry, "mask")

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        case_id: str = "",
        slice_indices: Sequence[int] | None = None,
        voxel_mm: Sequence[float] = (1.0, 1.0, 1.0),
        progress: bool | None = None,
    ) -> dict[str, SegmentationResult]:
        """Run on one volume's (N, C, S, S) slices in [-1, 1]; returns one result per variant.

        Args:
            inputs: the slices, in slice order.
            case_id: the case's id (seeds, with the slice indices, the per-slice random numbers).
            slice_indices: (N,) axial index of each slice (default 0 .. N-1).
            voxel_mm: voxel size of the stacked slices (for decisions that size lesions in mm^3).
            progress: a bar over the batches (default: the inferer's setting).
        """
        result = self.forward_process(inputs, case_id, slice_indices, progress)
        needs_volume = any(d.needs_volume for d in self.decisions.values())
        volume = VolumeInputs.from_slices(inputs, slice_indices, voxel_mm) if needs_volume else None
        return {v: self.decide(result, v, volume) for v in self.variants}


SAVE_ANOMALY = ("none", "masked", "full")


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
        return float(self.mask.sum()) * voxel_volume_mm3(self.case.geometry.input_affine) / 1000.0

    def anomaly_to_save(self, save_anomaly: str = "masked") -> np.ndarray | None:
        """The map as written: ``masked`` zero outside the brain (compresses ~4x), ``full`` as is, ``none`` nothing."""
        if save_anomaly not in SAVE_ANOMALY:
            raise ValueError(f"save_anomaly={save_anomaly!r}: choose one of {', '.join(SAVE_ANOMALY)}")
        if save_anomaly == "none":
            return None
        return self.anomaly if save_anomaly == "full" else np.where(self.brain(), self.anomaly, 0).astype(np.float32)

    def brain(self) -> np.ndarray:
        """(X, Y, Z) bool, the input's brain: the chain's brain mask, or for a case preprocessed without one
        its nonzero voxels (read from the first channel file when asked: only the masked map needs it)."""
        if self.case.geometry.brain is not None:
            return self.case.geometry.brain
        reference = np.asarray(nib.load(str(self.case.geometry.reference)).dataobj)
        return (reference != 0).reshape(self.mask.shape)


class VolumeInferer(Inferer):
    """Patient NIfTI files in, mask and anomaly map on the input's own grid out.

    Args:
        model: a loaded :class:`AnoFPDMModel`, a model folder or a bundled model's name (``"bundled"``).
        settings: method, N, k, batch size, seed, precision, 3-D post-processing (default: the defaults).
        device: ``auto``, ``cpu`` or ``cuda``; used only when ``model`` is a folder or name.
        progress: show a progress bar over each case's slice batches.
        **overrides: fields of :class:`InferenceSettings` replacing those of ``settings``
            (``VolumeInferer("bundled", method="anofpdm-ddim-volume")``).
    """

    def __init__(
        self,
        model: AnoFPDMModel | str | Path = "bundled",
        settings: InferenceSettings | None = None,
        *,
        device: str = "auto",
        progress: bool = False,
        **overrides,
    ) -> None:
        super().__init__()
        self.settings = settings_with(settings, overrides)
        self.model = model if isinstance(model, AnoFPDMModel) else AnoFPDMModel.from_folder(model, device)
        self.slice_inferer = ForwardProcessInferer.from_model(self.model, self.settings, progress=progress)

    @property
    def config(self):
        return self.model.config

    @property
    def model_dir(self) -> Path:
        return self.model.folder

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def preprocess_config(self) -> PreprocessConfig:
        """The model's preprocessing chain, with this run's brain mask (``settings.brain_mask``) when it sets one."""
        config = self.config.preprocess
        if self.settings.brain_mask is None:
            return config
        return dataclasses.replace(config, brain_mask=self.settings.brain_mask)

    def preprocess(
        self,
        channel_paths: Sequence[str | Path],
        label_path: str | Path | None = None,
        allowed_labels: Sequence[int] | None = None,
        brain_mask_path: str | Path | None = None,
    ) -> PreprocessedCase:
        """Apply the model's own preprocessing chain (the one its store was built with).

        ``allowed_labels``: the lesion labels the layout defines (e.g. BraTS 1, 2, 4); other values are refused.
        ``brain_mask_path``: the case's brain mask file (read under brain mask ``files``).
        """
        return preprocess_case(self.preprocess_config, channel_paths, label_path, allowed_labels, brain_mask_path, self.model_dir)

    def __call__(self, inputs: Sequence[str | Path], label: str | Path | None = None, case_id: str = "") -> VolumeResult:  # type: ignore[override]
        """Segment one case given its channel files (in the model's channel order); ``case_id`` seeds its slices."""
        start = time.perf_counter()
        result = self.run_case(self.preprocess(inputs, label), case_id)
        result.seconds = time.perf_counter() - start
        return result

    def run_case(self, case: PreprocessedCase, case_id: str = "", progress: bool | None = None) -> VolumeResult:
        """Segment one preprocessed case; ``progress`` (default: the inferer's) shows a bar over its slice batches."""
        start = time.perf_counter()
        geometry = case.geometry
        outputs = self.slice_inferer(case.images, case_id, geometry.slice_indices, geometry.slice_voxel_mm, progress=progress)
        return self.to_volume(case, outputs[self.settings.variant], time.perf_counter() - start)

    def to_volume(self, case: PreprocessedCase, slices: SegmentationResult, seconds: float = 0.0) -> VolumeResult:
        """Map one case's per-slice outputs back onto its input grid (3-D post-processing included)."""
        mask = self.slice_inferer.input_grid_mask(self.settings.variant, slices, case.geometry, self.slice_inferer.setup)
        if self.settings.keep_3d_components > 0:
            mask = keep_components(mask, self.settings.keep_3d_components, unit="voxels")
        anomaly = slices_to_volume(slices.maps, case.geometry, "map")
        return VolumeResult(case, slices, mask, anomaly, seconds)

    @staticmethod
    def write(result: VolumeResult, out_dir: str | Path, case_id: str, save_png: bool = False, save_anomaly: str = "masked",
              record: Mapping | None = None) -> list[Path]:
        """Write ``CASE.nii.gz`` (uint8 mask) and, unless ``save_anomaly="none"``, ``CASE_anomaly.nii.gz`` on the input grid
        (and ``record`` as ``CASE.json``, last: see :func:`write_segmentation`)."""
        png = None
        if save_png:
            from anofpdm_monai.visualize import save_overlay

            def png(path: Path) -> Path:
                return save_overlay(result.case.images, result.slices.maps, result.slices.masks, path,
                                    slice_indices=list(result.case.geometry.slice_indices))  # fmt: skip
        return write_segmentation(out_dir, case_id, result.case.geometry.reference, result.mask, result.anomaly_to_save(save_anomaly), png,
                                  record)


def preprocess_case(
    config: PreprocessConfig,
    channel_paths: Sequence[str | Path],
    label_path: str | Path | None = None,
    allowed_labels: Sequence[int] | None = None,
    brain_mask_path: str | Path | None = None,
    model_dir: str | Path = "the model",
) -> PreprocessedCase:
    """One case through a model's preprocessing chain ``config``, its channel files checked against the chain's
    channels first (a module-level function: ``segment``'s loader processes run it).

    Raises:
        InputError: the case has another number of channel files than the chain (naming the first file, or
            ``model_dir`` when none is given), or a file cannot be read.
    """
    expected = config.channel_names
    if len(channel_paths) != len(expected):
        first = Path(channel_paths[0]) if channel_paths else model_dir
        raise InputError(
            f"{first}: the case has {len(channel_paths)} channel file(s) but the model takes {len(expected)} "
            f"({', '.join(expected)}); give one file per channel in that order"
        )
    return preprocess_with(config, channel_paths, label_path, allowed_labels, brain_mask_path)


def settings_with(settings: InferenceSettings | None, overrides: dict) -> InferenceSettings:
    """``settings`` (default: the defaults) with the fields in ``overrides`` replaced."""
    fields = {f.name for f in dataclasses.fields(InferenceSettings)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown inference setting(s) {unknown}; choose from {sorted(fields)}")
    return dataclasses.replace(settings or InferenceSettings(), **overrides)


def write_segmentation(
    out_dir: str | Path,
    case_id: str,
    reference: str | Path,
    mask: np.ndarray,
    anomaly: np.ndarray | None,
    png: Callable[[Path], Path] | None = None,
    record: Mapping | None = None,
) -> list[Path]:
    """Write one case's outputs on the grid of ``reference``, each atomically; a failure leaves none behind.

    Args:
        out_dir: output folder.
        case_id: names the files ``CASE.nii.gz`` (mask), ``CASE_anomaly.nii.gz`` (map), ``CASE.png``, ``CASE.json``.
        reference: a NIfTI file of the input whose header (affine, qform/sform) the outputs copy.
        mask: (X, Y, Z) 0/1 mask, written as uint8.
        anomaly: (X, Y, Z) map written as float32, or None to write no map.
        png: writes the overlay PNG at the path it is given (None: no PNG).
        record: the case's settings record (:func:`anofpdm_monai.outputs.settings_record`), written as
            ``CASE.json`` after the other files; None writes none.

    The mask is written after the map, and the settings record last: with a record, its presence marks the
    case as finished (``segment --continue``).
    """
    check_case_id(case_id, out_dir)
    paths = segment_outputs(out_dir, case_id)
    header_source = nib.load(str(reference))
    written: list[Path] = []
    try:
        with case_record(paths["record"], record):
            if anomaly is not None:
                written.append(save_like(anomaly, header_source, paths["anomaly"], np.float32))
            if png is not None:
                written.append(png(paths["png"]))
            written.append(save_like(mask, header_source, paths["mask"], np.uint8))
    except BaseException:
        for path in written:  # a failed case leaves no partial outputs behind
            path.unlink(missing_ok=True)
        raise
    return written if record is None else [*written, paths["record"]]
