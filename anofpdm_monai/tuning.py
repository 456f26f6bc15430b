"""Pixel-label tuning of reconstruction methods (:class:`~anofpdm_monai.methods.ReconstructionMethod`).

Every point of a method's hyperparameter grid is run on the same validation slices; with each
point's maps, the map threshold of highest MEAN PER-SLICE DICE (the Table-1 metric: an empty mask on
an empty slice counts 1) is found (:func:`~anofpdm_monai.reconstruction.tune_on_grid`), once for each setup:

* ``mixed``: over all sampled validation slices (a mask on a healthy slice is a false positive);
* ``unhealthy``: over the sampled slices with lesion pixels only.

The point (ties: the first in grid order) and threshold of highest DICE are kept per setup. The
result is cached in ``RESULTS/tuning/NAME.json`` keyed by what it depends on (the weights' and the
components' sha256, the data, the grid, the sample, stride and precision), and recorded in
``run.json``. Methods so tuned are marked with a dagger in the summary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from anofpdm_monai.io import InputError, atomic_write_text, file_sha256
from anofpdm_monai.methods import COMPONENTS_FOLDER, SETUPS, MethodContext, ReconstructionMethod, grid_points
from anofpdm_monai.metrics import brain_foreground
from anofpdm_monai.reconstruction import tune_on_grid

TUNING_FOLDER = "tuning"
DEFAULT_TUNING_SLICES = 200


@dataclass
class Tuned:
    """One setup's choice: the hyperparameters, the map threshold (mask = map >= threshold) and the DICE reached."""

    params: dict[str, Any]
    threshold: float
    dice: float


@dataclass
class TuningResult:
    """A reconstruction method's tuning.

    Attributes:
        setups: ``{"mixed": Tuned, "unhealthy": Tuned}``.
        grid: every grid point with each setup's best threshold and DICE.
        n_slices, n_unhealthy: the validation slices it was tuned on, and how many had lesion pixels.
    """

    setups: dict[str, Tuned]
    grid: list[dict[str, Any]] = field(default_factory=list)
    n_slices: int = 0
    n_unhealthy: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TuningResult:
        return cls(**{**data, "setups": {k: Tuned(**v) for k, v in data["setups"].items()}})


def method_maps(
    method: ReconstructionMethod, context: MethodContext, images: torch.Tensor, seeds: Sequence[int], params: Mapping[str, Any],
    bar: Any = None,
) -> tuple[torch.Tensor, int]:
    """A method's maps of (N, C, S, S) slices in batches of the run's batch size.

    ``bar``: a progress bar advanced by one per batch (None: none).

    Returns:
        ``(maps, calls)``: (N, S, S) float32 maps on the CPU and the network calls per slice.
    """
    batch = context.settings.batch_size
    maps, calls = [], 0
    for start in range(0, images.shape[0], batch):
        x0 = images[start : start + batch].to(context.device)
        out = method.maps(context, x0, list(seeds[start : start + batch]), dict(params))
        if tuple(out.maps.shape) != (x0.shape[0], *x0.shape[2:]):
            raise ValueError(f"{method.name}: maps has shape {tuple(out.maps.shape)}; it must be (B, S, S) = {(x0.shape[0], *x0.shape[2:])}")
        maps.append(out.maps.detach().float().cpu())
        calls = out.network_calls
        if bar is not None:
            bar.update(1)
    return torch.cat(maps), calls


def tune(
    method: ReconstructionMethod,
    context: MethodContext,
    images: torch.Tensor,
    masks: torch.Tensor,
    seeds: Sequence[int],
    grid: Mapping[str, Sequence],
    progress: bool = True,
) -> TuningResult:
    """Tune ``method`` on validation slices with pixel labels, for both setups (see the module docstring).

    Args:
        method: the method.
        context: the model, settings and loaded components.
        images: (V, C, S, S) validation slices in [-1, 1].
        masks: (V, S, S) bool lesion masks (pixel labels).
        seeds: (V,) the slices' seeds (:func:`~anofpdm_monai.inferers.slice_seeds`).
        grid: ``{hyperparameter: candidates}`` (:meth:`ReconstructionMethod.tuning_grid`).
        progress: a progress bar over the grid points' batches of slices.

    Raises:
        InputError: the slices hold no lesion pixel (nothing to tune a threshold on).
    """
    masks = masks.bool()
    unhealthy = masks.flatten(1).any(dim=1)
    if not bool(unhealthy.any()):
        raise InputError(f"{method.name}: the validation slices hold no lesion pixel; tune on a split with lesions (val_data)", arguments="val_data")
    points = grid_points(grid)
    batches = -(-len(images) // context.settings.batch_size)
    with tqdm(total=len(points) * batches, desc=f"tune {method.name}", unit="batch", disable=not progress) as bar:
        found = tune_on_grid(lambda params: method_maps(method, context, images, seeds, params, bar)[0], points,
                             masks.numpy(), brain_foreground(images).bool().numpy(), SETUPS)  # fmt: skip
    best = {setup: Tuned(dict(found[setup]["params"]), float(found[setup]["threshold"]), float(found[setup]["dice"])) for setup in SETUPS}
    return TuningResult(best, found["grid"], int(len(masks)), int(unhealthy.sum()))


def components_sha256(method: ReconstructionMethod, model_folder: str | Path) -> dict[str, str]:
    """sha256 of every file of each of the method's components (``MODEL/baselines/NAME/``), by relative path."""
    out = {}
    for component in method.components:
        folder = Path(model_folder) / COMPONENTS_FOLDER / component.name
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            out[str(path.relative_to(folder.parent))] = file_sha256(path)
    return out


def cache_key(method: ReconstructionMethod, context: MethodContext, grid: Mapping[str, Sequence], data: str, n_slices: int, seed: int) -> dict:
    """What a tuning depends on (a cached tuning is reused only when all of it matches)."""
    return json.loads(json.dumps({
        "method": method.name, "model_sha256": context.model.sha256, "components_sha256": components_sha256(method, context.model.folder),
        "grid": {k: list(v) for k, v in grid.items()}, "tuned_on": str(data), "slices": n_slices, "seed": seed,
        "stride": context.stride, "precision": context.settings.precision, "batch_size": context.settings.batch_size,
    }))  # fmt: skip


def cached_tuning(path: Path, key: dict) -> TuningResult | None:
    """The tuning cached in ``path`` if it was made with ``key``; None otherwise (missing, stale or unreadable)."""
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
        return TuningResult.from_dict(cached["result"]) if cached.get("key") == key else None
    except (ValueError, KeyError, TypeError):
        return None


def save_tuning(path: Path, key: dict, result: TuningResult) -> None:
    atomic_write_text(path, json.dumps({"key": key, "result": result.to_dict(), "uses_pixel_labels": True}, indent=2) + "\n")


def parse_tune_options(options: Sequence[str]) -> dict[str, dict[str, list]]:
    """``["ddib.depth=200,400", "ddib.w=1"]`` -> ``{"ddib": {"depth": [200, 400], "w": [1]}}`` (numbers parsed as JSON).

    Raises:
        InputError: an option is not ``NAME.PARAM=v1,v2``.
    """
    out: dict[str, dict[str, list]] = {}
    for option in options:
        target, sep, values = option.partition("=")
        name, dot, param = target.partition(".")
        if not (sep and dot and name and param and values):
            raise InputError(f"tune={option!r}: give METHOD.PARAM=v1,v2, e.g. ddib.depth=200,400", arguments="tune")
        out.setdefault(name, {})[param] = [_value(v.strip()) for v in values.split(",") if v.strip()]
    return out


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def validation_sample(store: Any, n_slices: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str], np.ndarray]:
    """A seeded sample of at most ``n_slices`` validation slices WITH their masks: ``(images, masks, patients, slices)``."""
    rows = store.sample_rows("val", n_slices, seed, "to tune the pixel-label baselines (or evaluate without them)")
    images, masks, _ = store.load_slices(rows)
    return images, masks, rows["patient"].tolist(), rows["slice"].to_numpy()
