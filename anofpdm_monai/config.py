"""Settings dataclasses with a JSON round trip.

A trained model is a folder; its ``config.json`` holds a :class:`ModelConfig`, which
nests the network, diffusion and preprocessing settings. Everything inference needs
to reproduce the training-time chain is read from there, nothing is hard-coded per
dataset.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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

    def __post_init__(self) -> None:
        self.channel_names = tuple(self.channel_names)
        self.map_channels = tuple(self.map_channels)
        missing = [m for m in self.map_channels if m not in self.channel_names]
        if missing:
            raise ValueError(f"map_channels {missing} are not among channel_names {self.channel_names}")

    @property
    def map_channel_indices(self) -> tuple[int, ...]:
        return tuple(self.channel_names.index(m) for m in self.map_channels)


@dataclass
class ModelConfig:
    """Everything saved as ``config.json`` beside the weights of a trained model."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(
            network=NetworkConfig(**data["network"]),
            diffusion=DiffusionConfig(**data["diffusion"]),
            preprocess=PreprocessConfig(**data["preprocess"]),
        )

    def save(self, path: str | Path) -> None:
        from anofpdm_monai.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no model config; a model folder holds config.json beside model.pt")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a valid anofpdm model config ({err})") from err


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
