"""The models shipped with the package, each the ``tiny`` preset trained on a phantom cohort.

* ``bundled``: BraTS layout (FLAIR, T1, T1ce, T2), folder ``tiny_brats_phantom/``;
* ``bundled-atlas``: ATLAS v2.0 layout (T1w only), folder ``tiny_atlas_phantom/``.

See docs/bundled_model.md for the commands and seeds that reproduce them.
"""

from __future__ import annotations

from pathlib import Path

from anofpdm_monai.io import InputError

# name accepted by -m / --model -> folder beside this file
BUNDLED_MODELS = {"bundled": "tiny_brats_phantom", "bundled-atlas": "tiny_atlas_phantom"}


def bundled_model_dir(name: str = "bundled") -> Path:
    """Folder (config.json, model.pt, calibration.json) of the bundled model ``name`` (a key of :data:`BUNDLED_MODELS`)."""
    if name not in BUNDLED_MODELS:
        raise InputError(f"{name}: no bundled model of this name; choose one of {', '.join(BUNDLED_MODELS)} or give a model folder")
    path = Path(__file__).resolve().parent / BUNDLED_MODELS[name]
    if not (path / "model.pt").is_file():
        raise InputError(
            f"{path}: the bundled model '{name}' is missing from this installation; reinstall anofpdm_monai, "
            "or give a model folder you trained (docs/bundled_model.md)"
        )
    return path


def resolve_model_dir(model: str | Path) -> Path:
    """A model folder from a path, or a bundled model's name (``"bundled"``, ``"bundled-atlas"``)."""
    return bundled_model_dir(str(model)) if str(model) in BUNDLED_MODELS else Path(model)
