"""The model shipped with the package: the ``tiny`` preset trained on a phantom BraTS-layout cohort.

See docs/bundled_model.md for the commands and seeds that reproduce it.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_NAME = "tiny_brats_phantom"


def bundled_model_dir() -> Path:
    """Folder of the bundled model (config.json, model.pt, calibration.json)."""
    path = Path(__file__).resolve().parent / BUNDLED_NAME
    if not (path / "model.pt").is_file():
        raise FileNotFoundError(f"{path}: the bundled model is missing from this installation; reinstall anofpdm_monai")
    return path


def resolve_model_dir(model: str | Path) -> Path:
    """A model folder from a path, or ``"bundled"`` for the model shipped inside the package."""
    return bundled_model_dir() if str(model) == "bundled" else Path(model)
