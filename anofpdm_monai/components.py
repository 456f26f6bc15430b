"""The comparison systems' components inside a model folder: ``MODEL/baselines/NAME/``.

A component is a network the AnoFPDM model does not have, trained by ``anofpdm train --recipe NAME``
(:data:`anofpdm_monai.training.RECIPES`): AnoDDPM's unconditional DDPMs (``anoddpm-gaussian``,
``anoddpm-simplex``) and the guidance classifier (``classifier``). Its folder holds the usual
``config.json``, ``model.pt`` (EMA weights), ``training.json`` and ``component.json`` (the recipe).
:func:`load_component` reads one; a missing component raises an InputError naming the command that makes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from anofpdm_monai.config import ModelConfig
from anofpdm_monai.io import InputError, safe_torch_load
from anofpdm_monai.methods import COMPONENTS_FOLDER
from anofpdm_monai.networks import NoisePredictor, build_classifier, build_network, load_weights, use_bf16
from anofpdm_monai.provenance import file_sha256
from anofpdm_monai.training import RECIPES, Recipe, saved_recipe_name

BASELINES_DIR = COMPONENTS_FOLDER


def component_dir(model_dir: str | Path, name: str) -> Path:
    """Where the component ``name`` of the model in ``model_dir`` lives."""
    return Path(model_dir) / BASELINES_DIR / name


def training_command(model_dir: str | Path, name: str) -> str:
    """The command that trains the component ``name`` into its place (docs/training.md)."""
    if RECIPES[name].network == "unet":  # each a whole command (tests/test_imports.py: no flag outside one)
        return f"anofpdm train --recipe {name} -d STORE -o {component_dir(model_dir, name)} --init-from {model_dir}"
    return f"anofpdm train --recipe {name} -d STORE -o {component_dir(model_dir, name)}"


@dataclass
class LoadedComponent:
    """A loaded component.

    Attributes:
        name: the recipe it was trained with (``anoddpm-gaussian``, ``anoddpm-simplex``, ``classifier``).
        folder: its folder.
        recipe: the :class:`~anofpdm_monai.training.Recipe`.
        network: in eval mode: the UNet ``(x_t, timesteps, class_labels) -> eps`` or the classifier
            ``(x_t (N, C, S, S), timesteps (N,)) -> (N, 2)`` logits.
        config: its ``config.json``.
        sha256: hex digest of its ``model.pt`` (the tuning cache's key).
    """

    name: str
    folder: Path
    recipe: Recipe
    network: torch.nn.Module
    config: ModelConfig
    sha256: str

    def noise_predictor(self, precision: str = "auto") -> NoisePredictor:
        """A UNet component as ``eps(x_t, t, labels)`` (feed it the null label: it is unconditional)."""
        if self.recipe.network != "unet":
            raise TypeError(f"{self.folder}: the {self.name} component is not a noise predictor")
        device = next(self.network.parameters()).device
        return NoisePredictor(self.network, autocast=use_bf16(precision, device))


def load_component(model_dir: str | Path, name: str, main_config: ModelConfig, device: torch.device | str = "cpu") -> LoadedComponent:
    """Load the component ``name`` of the model in ``model_dir``.

    Args:
        main_config: the main model's config: the component must have been trained on the same
            preprocessing chain (slice size, channels, crop), or its maps would not line up.

    Raises:
        InputError: the component is missing (the message names the command that trains it), was trained
            with another recipe, on another chain, or its weights do not fit.
    """
    if name not in RECIPES or not RECIPES[name].is_component:
        raise ValueError(f"{name!r} is not a component recipe; choose one of {[r for r in RECIPES if RECIPES[r].is_component]}")
    folder = component_dir(model_dir, name)
    if not (folder / "model.pt").is_file() or not (folder / "config.json").is_file():
        raise InputError(f"{folder}: no {name} component in this model folder; train it with `{training_command(model_dir, name)}`")
    found = saved_recipe_name(folder)
    if found != name:
        raise InputError(f"{folder}: holds a model trained with recipe {found!r}, not {name!r}; retrain it with "
                         f"`{training_command(model_dir, name)}`")  # fmt: skip
    config = ModelConfig.load(folder / "config.json")
    if config.preprocess != main_config.preprocess or config.diffusion != main_config.diffusion:
        raise InputError(
            f"{folder / 'config.json'}: the component was trained on another preprocessing chain or noise schedule than "
            f"the model in {model_dir}; retrain it on the model's store with `{training_command(model_dir, name)}`"
        )
    recipe = RECIPES[name]
    network = (build_classifier if recipe.network == "classifier" else build_network)(config.network)
    load_weights(network, safe_torch_load(folder / "model.pt"), folder / "model.pt", config.network)
    network = network.to(device).eval()
    network.requires_grad_(False)
    return LoadedComponent(name, folder, recipe, network, config, file_sha256(folder / "model.pt"))
