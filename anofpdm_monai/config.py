"""Settings dataclasses with a JSON round trip.

A trained model is a folder; its ``config.json`` holds a :class:`ModelConfig`, which
nests the network, diffusion and preprocessing settings. Everything inference needs
to reproduce the training-time chain is read from there, nothing is hard-coded per
dataset.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Slice side S: small enough that one slice batch fits in memory (a 100000-pixel side would need ~160 GB).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024
# How the chain finds the brain (transforms.BrainMaskd), and each layout's default: the way its dataset ships.
BRAIN_MASK_MODES = ("nonzero", "template", "files")
BRAIN_MASK_DEFAULTS = {"brats": "nonzero", "atlas": "template"}
# The noise schedules MONAI's DDPMScheduler knows.
SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` if it is an integer in [low, high]; else a ValueError that starts with ``name``."""
    span = f"in [{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} = {value!r}: must be an integer {span}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} = {value!r}: must be an integer {span}")
    return value


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False) -> float:
    """``value`` as a float if it is a finite number in [low, high] (``(low, high]`` with ``low_open``)."""
    lo = "(" if low_open else "["
    span = f" in {lo}{low}, {high}]" if low is not None and high is not None else (f" {'>' if low_open else '>='} {low}" if low is not None else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} = {value!r}: must be a number{span}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} = {value!r}: must be a finite number{span}")
    if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
        raise ValueError(f"{name} = {value!r}: must be a number{span}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} = {value!r}: must be true or false")
    return value


def check_names(name: str, value: Any) -> tuple[str, ...]:
    """A non-empty sequence of distinct, non-empty strings, as a tuple."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} = {value!r}: must be a non-empty list of names")
    if not all(isinstance(v, str) and v for v in value) or len(set(value)) != len(value):
        raise ValueError(f"{name} = {list(value)!r}: must hold distinct, non-empty names")
    return tuple(value)


def check_register_to(path: Any, name: str = "register_to") -> None:
    """The registration template must be a readable NIfTI image (only its header is read)."""
    if path is None:
        return
    if not isinstance(path, str) or not path:
        raise ValueError(f"{name} = {path!r}: must be the path of a template NIfTI image, or null for no registration")
    if not Path(path).is_file():
        raise ValueError(f"{name} = {path!r}: file not found; give the template NIfTI image the model was preprocessed with")
    import nibabel as nib

    try:
        shape = nib.load(path).shape
    except Exception as err:  # nibabel's ImageFileError and friends
        raise ValueError(f"{name} = {path!r}: not a NIfTI image ({type(err).__name__}); give a .nii or .nii.gz template") from err
    if len(shape) < 3:
        raise ValueError(f"{name} = {path!r}: the template is {len(shape)}-D; give a 3-D template")


@dataclass
class NetworkConfig:
    """Arguments of MONAI's ``DiffusionModelUNet`` (2-D, three class embeddings).

    Attributes:
        preset: name of the preset the settings came from (``tiny`` or ``paper``).
        image_size: S, the side of the square slices the network is trained on.
        in_channels: C, the number of MR sequences stacked as channels.
        channels: feature width per resolution level.
        attention_levels: whether each level has self-attention.
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head.
        norm_num_groups: groups of GroupNorm; must divide every width.
    """

    preset: str = "tiny"
    image_size: int = 64
    in_channels: int = 4
    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 16

    def __post_init__(self) -> None:
        check_int("image_size", self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        check_int("in_channels", self.in_channels, 1, 64)
        if isinstance(self.channels, (str, int)) or not self.channels:
            raise ValueError(f"channels = {self.channels!r}: must be a non-empty list of positive widths")
        for i, width in enumerate(self.channels):
            check_int(f"channels[{i}]", width, 1, 8192)
        if isinstance(self.attention_levels, (str, bool)) or not all(isinstance(a, bool) for a in self.attention_levels):
            raise ValueError(f"attention_levels = {self.attention_levels!r}: must be a list of true/false, one per width")
        check_int("num_res_blocks", self.num_res_blocks, 1, 16)
        check_int("num_head_channels", self.num_head_channels, 1, 8192)
        check_int("norm_num_groups", self.norm_num_groups, 1, 8192)
        self.channels = tuple(int(c) for c in self.channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        if len(self.channels) != len(self.attention_levels):
            raise ValueError(
                f"channels {self.channels} and attention_levels {self.attention_levels} must have the same length"
            )
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every width in {self.channels}")
        if self.image_size % (2 ** (len(self.channels) - 1)):
            raise ValueError(
                f"image_size={self.image_size} must be divisible by 2**{len(self.channels) - 1} (one halving per level)"
            )


@dataclass
class DiffusionConfig:
    """DDPM noise schedule (ALGORITHM.md section 2): linear betas over T steps."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    schedule: str = "linear_beta"

    def __post_init__(self) -> None:
        check_int("num_train_timesteps", self.num_train_timesteps, 1, 100_000)
        check_float("beta_start", self.beta_start, 0.0, 1.0, low_open=True)
        check_float("beta_end", self.beta_end, 0.0, 1.0, low_open=True)
        if self.beta_start > self.beta_end:
            raise ValueError(f"beta_start = {self.beta_start!r}: must not exceed beta_end = {self.beta_end!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule = {self.schedule!r}: must be one of {list(SCHEDULES)}")


@dataclass
class PreprocessConfig:
    """How raw volumes became slices (ALGORITHM.md section 1); inference repeats it.

    Attributes:
        image_size: S, slices are resized to S x S.
        channel_names: sequence names in channel order, e.g. ``("flair", "t1", "t1ce", "t2")``.
        map_channels: names of the channels the anomaly map is computed on.
        percentile: per-volume, per-channel normalisation percentile of the non-zero voxels.
        min_brain_fraction: a slice is a brain slice if at least this fraction of its pixels is non-zero.
        register_to: path of the registration template, or None for no registration.
        dataset: the layout the store was built from (informational).
        crop_foreground: crop each volume's axial planes to the brain's bounding box (plus
            ``crop_margin_mm``) and pad it to a square field in mm before resizing to S, so the
            pixels are spent on the brain and the anatomy keeps its aspect. False is the paper's
            chain (the whole plane resized to S x S); model folders saved before this option
            existed load with False and keep their chain.
        crop_margin_mm: margin around the brain's bounding box, in mm.
        brain_mask: how the chain finds the brain (``anofpdm_monai.transforms.BrainMaskd``):
            ``nonzero`` (skull-stripped data), ``template`` (the MNI152 brain mask fitted by affine
            registration; whole heads such as ATLAS v2.0) or ``files`` (a mask file per case). None
            takes the layout's default (:data:`BRAIN_MASK_DEFAULTS`: ``atlas`` template, every other
            layout nonzero); it is resolved on construction, so config.json files written before this
            field existed load with their layout's default (docs/data.md).
    """

    image_size: int = 64
    channel_names: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
    map_channels: tuple[str, ...] = ("flair", "t2")
    percentile: float = 99.0
    min_brain_fraction: float = 0.05
    register_to: str | None = None
    dataset: str = "brats"
    crop_foreground: bool = False
    crop_margin_mm: float = 5.0
    brain_mask: str | None = None

    def __post_init__(self) -> None:
        check_int("image_size", self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        self.channel_names = check_names("channel_names", self.channel_names)
        self.map_channels = check_names("map_channels", self.map_channels)
        check_float("percentile", self.percentile, 0.0, 100.0, low_open=True)
        check_float("min_brain_fraction", self.min_brain_fraction, 0.0, 1.0)
        if self.register_to is not None and (not isinstance(self.register_to, str) or not self.register_to):
            raise ValueError(f"register_to = {self.register_to!r}: must be the path of a template NIfTI image, or null")
        if not isinstance(self.dataset, str):
            raise ValueError(f"dataset = {self.dataset!r}: must be a layout name such as 'brats'")
        check_bool("crop_foreground", self.crop_foreground)
        check_float("crop_margin_mm", self.crop_margin_mm, 0.0, 1000.0)
        if self.brain_mask is None:
            self.brain_mask = BRAIN_MASK_DEFAULTS.get(self.dataset, "nonzero")
        if self.brain_mask not in BRAIN_MASK_MODES:
            raise ValueError(f"brain_mask = {self.brain_mask!r}: choose one of {', '.join(BRAIN_MASK_MODES)}")
        missing = [m for m in self.map_channels if m not in self.channel_names]
        if missing:
            raise ValueError(f"map_channels {missing} are not among channel_names {self.channel_names}")

    @property
    def map_channel_indices(self) -> tuple[int, ...]:
        return tuple(self.channel_names.index(m) for m in self.map_channels)


TRAINING_SETTINGS_FILE = "training.json"
"""The training settings and steps done, beside ``config.json`` (written by training, read by the model)."""
CONFIG_SCHEMA_VERSION = 2
"""Version of ``config.json``: 1 had no ``schema_version`` key (same sections); 2 writes it."""


@dataclass
class ModelConfig:
    """Everything saved as ``config.json`` beside the weights of a trained model."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def to_dict(self) -> dict[str, Any]:
        """The object of ``config.json``: the three sections and the file's ``schema_version``."""
        return {**dataclasses.asdict(self), "schema_version": CONFIG_SCHEMA_VERSION}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build and check every section; a ValueError names the field as ``section.field``.

        ``schema_version`` is not checked here (:meth:`load` does, naming the file)."""
        if not isinstance(data, dict):
            raise ValueError(f"holds a {type(data).__name__}, not an object with network, diffusion and preprocess")
        sections = {}
        for name, section in (("network", NetworkConfig), ("diffusion", DiffusionConfig), ("preprocess", PreprocessConfig)):
            sections[name] = build_section(section, data.get(name), name)
        return cls(**sections)

    def save(self, path: str | Path) -> None:
        from anofpdm_monai.io import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no model config; a model folder holds config.json beside model.pt")
        from anofpdm_monai.io import InputError, check_schema_version, read_json

        data = read_json(path, "not a valid anofpdm model config: use the config.json saved with these weights")
        if isinstance(data, dict):
            check_schema_version(data, CONFIG_SCHEMA_VERSION, path)  # version 1 (no key) reads as version 2
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(
                f"{path}: not a valid anofpdm model config: {err}; fix that field, or use the config.json saved with these weights"
            ) from err


def build_section(section: type, data: Any, name: str) -> Any:
    """``section(**data)``, with unknown or missing fields and bad values reported as ``name.field``."""
    if data is None:
        raise ValueError(f"{name}: section missing")
    if not isinstance(data, dict):
        raise ValueError(f"{name}: must be an object, found {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(section)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{name}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    try:
        return section(**data)
    except (TypeError, ValueError) as err:
        text = str(err)
        field_name = text.split(" ")[0].split("=")[0].split("[")[0]
        raise ValueError(f"{name}.{text}" if field_name in known else f"{name}: {text}") from err


PRESETS: dict[str, dict[str, Any]] = {
    # ~1.1M parameters (C = 4); trains to a useful model in about an hour on 2 CPU cores.
    "tiny": dict(
        image_size=64,
        channels=(32, 64, 64),
        attention_levels=(False, False, True),
        num_res_blocks=1,
        num_head_channels=32,
        norm_num_groups=16,
    ),
    # About the reference implementation's size (Che et al.): width 128, multipliers (1, 1, 2, 3, 4),
    # attention at 1/4, 1/8 and 1/16 of a 128 x 128 input.
    "paper": dict(
        image_size=128,
        channels=(128, 128, 256, 384, 512),
        attention_levels=(False, False, True, True, True),
        num_res_blocks=2,
        num_head_channels=64,
        norm_num_groups=32,
    ),
}


def network_preset(name: str, in_channels: int) -> NetworkConfig:
    """Return the :class:`NetworkConfig` of preset ``name`` for ``in_channels`` input sequences."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return NetworkConfig(preset=name, in_channels=in_channels, **PRESETS[name])
