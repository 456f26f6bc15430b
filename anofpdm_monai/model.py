"""A loaded model and the settings of one inference run (the shape of nnU-Net's predictor / diffusers' pipelines).

:class:`AnoFPDMModel` is a model folder read once: the network (EMA weights), the noise schedule,
``config.json``, the training settings when the folder has them, and the calibration of each
encoding. :class:`InferenceSettings` is everything a run may choose. The inferers
(:mod:`anofpdm_monai.inferers`) are built from the two::

    model = AnoFPDMModel.from_folder("bundled")            # or a trained model folder
    inferer = VolumeInferer(model, InferenceSettings(method="anofpdm-ddim-volume"))
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anofpdm_monai.bundled import resolve_model_dir
from anofpdm_monai.calibration import Calibration
from anofpdm_monai.config import BRAIN_MASK_MODES, TRAINING_SETTINGS_FILE, ModelConfig
from anofpdm_monai.io import InputError, file_sha256, read_json
from anofpdm_monai.methods import COMPONENTS_FOLDER, KINDS, AnoFPDMMethod, ReconstructionMethod, all_methods, anofpdm_methods
from anofpdm_monai.networks import PRECISIONS, NoisePredictor, build_scheduler, fastest_execution, load_model_folder, resolve_device

# Slices per forward process. Each network call sees 2 x this many inputs; 8 slices (16 inputs of
# 64 x 64) was the fastest per slice on 2 CPU cores (10.5 ms per input against 26 ms at 200 inputs,
# where activations overflow the caches). Raise it on a GPU.
DEFAULT_BATCH_SIZE = 8
# a GPU's batch: slices whose network call needs at most this share of the free memory (the rest: the forward
# process's per-slice state, the loader's case, other processes), between DEFAULT_BATCH_SIZE and MAX_GPU_BATCH_SIZE
GPU_MEMORY_SHARE = 0.5
MAX_GPU_BATCH_SIZE = 256


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


def check_calibration_fits(calibration: Calibration, config: ModelConfig, path: str | Path) -> None:
    """The calibration must describe this model's map channels: one D per map channel, indices within the inputs."""
    maps = config.preprocess.map_channels
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


def available_methods(model_dir: str | Path, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """The registered methods of ``kinds`` (:data:`anofpdm_monai.methods.KINDS`) a model folder can run, in registry order.

    An AnoFPDM method needs its encoding's calibration file and, when its decision reads a calibration
    section, that section in it; a reconstruction method needs its components in ``MODEL/baselines/``.
    """
    found = []
    for name, method in all_methods().items():
        if method.kind not in kinds:
            continue
        if isinstance(method, AnoFPDMMethod):
            if not calibration_path(model_dir, method.encoding).is_file():
                continue
            section = method.decision.section
            if section is not None and load_calibration(model_dir, method.encoding).section(section.name) is None:
                continue
        if isinstance(method, ReconstructionMethod):
            if any(not (Path(model_dir) / COMPONENTS_FOLDER / c.name).is_dir() for c in method.components):
                continue
        found.append(name)
    return found


PREFERRED_METHODS = ("anofpdm-ddim-volume", "anofpdm-ddim")
"""What ``segment`` runs when no method is named, in order of preference (:func:`default_method`)."""


def default_method(model_dir: str | Path) -> str:
    """The method ``segment`` runs when none is named: the volume family (``anofpdm-ddim-volume``, the better one on
    lesions the project never drew; docs/segment.md, *Two families*) where the model's calibration has its section,
    else the paper's ``anofpdm-ddim``."""
    found = available_methods(resolve_model_dir(model_dir))
    return next((m for m in PREFERRED_METHODS if m in found), PREFERRED_METHODS[-1])


def gpu_batch_size(free_bytes: float, bytes_per_slice: float) -> int:
    """Slices per forward process whose network call takes at most :data:`GPU_MEMORY_SHARE` of ``free_bytes``, given
    one slice's peak bytes in a call (its guided and unguided inputs and activations); clamped to
    [:data:`DEFAULT_BATCH_SIZE`, :data:`MAX_GPU_BATCH_SIZE`]."""
    fits = int(GPU_MEMORY_SHARE * free_bytes // max(bytes_per_slice, 1.0))
    return max(DEFAULT_BATCH_SIZE, min(MAX_GPU_BATCH_SIZE, fits))


@dataclass(frozen=True)
class InferenceSettings:
    """What one inference run chooses; everything else comes from the model folder.

    A bad value raises :class:`InputError` (a ``ValueError``) naming the argument.

    Attributes:
        method: an AnoFPDM method of the registry (:mod:`anofpdm_monai.methods`), e.g. ``anofpdm-ddim``.
        steps: forward-step budget N; None takes the calibration's.
        stride: stride k; None takes the calibration's.
        batch_size: slices per forward process (each network call sees 2 x this many inputs); bounds memory.
        seed: with the case id and slice index, seeds each slice's random numbers.
        precision: ``auto`` (fp32 or bf16, whichever the network runs faster in on this machine: timed once
            and cached, :func:`~anofpdm_monai.networks.fastest_execution`), ``fp32`` or ``bf16``.
        compile: run the network through ``torch.compile`` (pays over a cohort, not one case).
        keep_3d_components: drop 3-D components of the volume mask smaller than this many voxels; 0 keeps all.
        brain_mask: how the chain finds the brain in this run's inputs (``nonzero``, ``template``, ``files``;
            ``anofpdm_monai.transforms.BrainMaskd``); None keeps the model folder's (docs/data.md).
    """

    method: str = "anofpdm-ddim"
    steps: int | None = None
    stride: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    precision: str = "auto"
    keep_3d_components: int = 0
    brain_mask: str | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        methods = anofpdm_methods()
        if self.method not in methods:
            raise InputError(f"method={self.method!r}: choose one of {sorted(methods)}", arguments="method")
        for name, low in (("steps", 1), ("stride", 1), ("batch_size", 1), ("keep_3d_components", 0), ("seed", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise InputError(f"{name}={value!r}: give a whole number >= {low}", arguments=name)
        if self.precision not in PRECISIONS:
            raise InputError(f"precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}", arguments="precision")
        if self.brain_mask is not None and self.brain_mask not in BRAIN_MASK_MODES:
            raise InputError(f"brain_mask={self.brain_mask!r}: choose one of {', '.join(BRAIN_MASK_MODES)}", arguments="brain_mask")
        if not isinstance(self.compile, bool):
            raise InputError(f"compile={self.compile!r}: give True or False", arguments="compile")

    @property
    def encoding(self) -> str:
        """``ddim`` or ``ddpm``, from the method."""
        return anofpdm_methods()[self.method].encoding

    @property
    def variant(self) -> str:
        """The registered decision variant of the method (e.g. ``aggregated``, ``last``, ``volume``)."""
        return anofpdm_methods()[self.method].variant

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class AnoFPDMModel:
    """A trained model folder, loaded once for inference.

    Args:
        folder: the model folder (``config.json``, ``model.pt``, ``calibration*.json``).
        network: the noise-predicting UNet in eval mode, on ``device``.
        config: the folder's ``config.json``.
        device: where the network runs.

    Attributes:
        training: the training settings (``training.json`` beside ``config.json``), or None for
            folders written before they were recorded.
        alphas_cumprod: (T,) the training schedule's cumulative alphas, on the CPU.
    """

    def __init__(self, folder: str | Path, network: torch.nn.Module, config: ModelConfig, device: torch.device) -> None:
        self.folder = Path(folder)
        self.network = network
        self.config = config
        self.device = torch.device(device)
        self.alphas_cumprod = build_scheduler(config.diffusion).alphas_cumprod
        training_file = self.folder / TRAINING_SETTINGS_FILE
        self.training = read_json(training_file, "not valid JSON; delete it or retrain") if training_file.is_file() else None
        self._calibrations: dict[str, Calibration] = {}
        self._sha256: str | None = None

    @classmethod
    def from_folder(
        cls,
        model: str | Path = "bundled",
        device: str | torch.device = "auto",
        *,
        network: torch.nn.Module | None = None,
        config: ModelConfig | None = None,
    ) -> AnoFPDMModel:
        """Load a model folder, or a bundled model by name (``"bundled"``, ``"bundled-atlas"``).

        Args:
            model: a folder path or a bundled model's name.
            device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N`` or a torch device.
            network, config: built elsewhere (a MONAI bundle's ``inference.json`` names the network's
                arguments) instead of from the folder's ``config.json``; the folder's weights are loaded into it.
        """
        folder = resolve_model_dir(model)
        device = device if isinstance(device, torch.device) else resolve_device(device)
        network, config = load_model_folder(folder, device, network=network, config=config)
        return cls(folder, network, config, device)

    def calibration(self, encoding: str) -> Calibration:
        """The calibration of ``encoding`` (read once), checked against this model's map channels."""
        if encoding not in self._calibrations:
            calibration = load_calibration(self.folder, encoding)
            check_calibration_fits(calibration, self.config, calibration_path(self.folder, calibration.encoding))
            self._calibrations[encoding] = calibration
        return self._calibrations[encoding]

    def noise_predictor(self, precision: str = "auto", compile: bool = False) -> NoisePredictor:
        """The network as ``eps(x_t, t, labels)`` at ``precision``, in the fastest layout for this machine
        (timed on calls of 2 x DEFAULT_BATCH_SIZE slices; see :class:`InferenceSettings`)."""
        net = self.config.network
        shape = (2 * DEFAULT_BATCH_SIZE, net.in_channels, net.image_size, net.image_size)
        run_precision, layout = fastest_execution(self.network, self.device, precision, shape)
        return NoisePredictor(self.network, autocast=run_precision == "bf16", channels_last=layout == "channels_last", compile=compile)

    def default_batch_size(self) -> int:
        """Slices per forward process when none is given: :data:`DEFAULT_BATCH_SIZE` on a CPU (the fastest per slice
        on 2 cores); on a GPU as many as :func:`gpu_batch_size` fits in its free memory, from the peak memory of
        one fp32 network call of 4 slices measured here."""
        if self.device.type != "cuda":
            return DEFAULT_BATCH_SIZE
        from anofpdm_monai.networks import time_call

        probe, net = 4, self.config.network
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        time_call(NoisePredictor(self.network), (2 * probe, net.in_channels, net.image_size, net.image_size), self.device)
        per_slice = (torch.cuda.max_memory_allocated(self.device) - before) / probe
        free, _total = torch.cuda.mem_get_info(self.device)
        return gpu_batch_size(free, per_slice)

    @property
    def sha256(self) -> str:
        """Hex digest of ``model.pt`` (identifies the weights in run records and caches)."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.folder / "model.pt")
        return self._sha256
