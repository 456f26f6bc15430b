"""Calibration on the validation split with image-level labels only (ALGORITHM.md section 6).

For every candidate guidance strength w the health threshold ``thr_01(w)`` and its accuracy are
chosen; the selected ``w*`` is the largest w within 99 % of the best accuracy so far; ``D[m]`` is the
largest ``dmax[m]`` of the unhealthy validation slices at ``w*``. One forward process per batch of
validation slices evaluates the whole w grid (see :func:`anofpdm_monai.forward_process.run_forward_process`).

Optionally (the project's extension, off by default) several forward-step budgets N are candidates
too: the statistics of a budget N' < N are those of the first visited steps of a run with budget N
(the noised trajectory does not depend on N), so one run with the largest budget evaluates them all.
Each budget gets its own w* by the rule above, and the budget whose accuracy at its w* is highest is
kept (ties go to the larger budget). Image-level labels only, as for w. (With DDPM encoding the
candidates share the largest budget's noise draws, so a smaller budget sees other random numbers
than a run with that budget alone would: statistically the same, not bit-identical.)
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from anofpdm_monai.forward_process import ENCODINGS, INVERSIONS, run_forward_process, visited_timesteps
from anofpdm_monai.guidance import EpsPredictor
from anofpdm_monai.io import InputError, atomic_write_bytes, check_schema_version, json_text
from anofpdm_monai.methods import calibration_sections
from anofpdm_monai.networks import HEALTHY, UNHEALTHY
from anofpdm_monai.segmentation import health_similarity

THRESHOLD_QUANTILES = np.linspace(0.005, 0.095, 100)
ACCURACY_FRACTION = 0.99
PRECISIONS_RUN = ("fp32", "bf16")  # what --precision auto resolves to
CURVES_PER_CLASS = 3
SCHEMA_VERSION = 3
"""Version of ``calibration.json``: 1 (no ``schema_version`` key) had no sections registry; 2 adds the key;
3 records how the volume family's minimum lesion size was chosen (``size_rule``, ``fp_rate``, ...)."""


def migrate(data: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """A ``calibration.json`` object of any older version as the current one (the one place files are migrated).

    The paper's fields have not changed between versions; each registered section that the file holds is
    migrated by its own hook (:attr:`anofpdm_monai.methods.CalibrationSection.migrate`, given the file's version).

    Raises:
        InputError: the file is of a newer version than this release reads (the message names both).
    """
    version = check_schema_version(data, SCHEMA_VERSION, source)
    if version < SCHEMA_VERSION:
        for name, entry in calibration_sections().items():
            if entry.migrate is not None and isinstance(data.get(name), dict):
                data[name] = entry.migrate(dict(data[name]), version)
    data["schema_version"] = SCHEMA_VERSION
    return data


@dataclass
class Calibration:
    """Calibrated settings of a trained model, saved as ``calibration.json`` beside the weights.

    Attributes:
        w: selected guidance strength w*.
        thr_01: health threshold at w* (a slice is unhealthy iff sim <= thr_01).
        D: per map channel, the largest dmax over unhealthy validation slices at w*.
        steps: forward-step budget N used (the selected one when several were candidates).
        stride: visited-step stride k used.
        encoding: ``"ddim"`` or ``"ddpm"``.
        map_channels: map channel names if known, else their indices.
        map_channel_indices: indices of the map channels into the input channels.
        w_grid: candidate strengths, ascending.
        accuracy: validation accuracy per candidate w, at the budget ``steps``.
        thresholds: thr_01 per candidate w, at the budget ``steps``.
        steps_grid: candidate budgets N, ascending (``[steps]`` when only one was given).
        accuracy_by_steps: validation accuracy per candidate budget (rows) and w (columns).
        n_val: number of validation slices.
        n_val_healthy: of which labelled healthy.
        n_val_unhealthy: of which labelled unhealthy.
        include_end_step: aggregated-map convention used (see the forward-process engine).
        inversion: DDIM inversion variant used (``"reference"`` or ``"monai"``).
        precision: network precision the calibration ran at (``"fp32"`` or ``"bf16"``), or None when
            unknown (calibrations made before it was recorded, or a predictor that does not say).
        sections: the decision families' own calibrations at the same N, k and w, typed, by their
            key in the file (:func:`anofpdm_monai.methods.calibration_sections`; e.g. ``"volume"``:
            :class:`anofpdm_monai.volume_mode.VolumeCalibration`); a family whose section is absent
            cannot run (the paper family needs none). Read with :meth:`section`.
        schema_version: the file format's version (:data:`SCHEMA_VERSION`); files without one are version 1.
    """

    w: float
    thr_01: float
    D: list[float]
    steps: int
    stride: int
    encoding: str
    map_channels: list[str | int]
    map_channel_indices: list[int]
    w_grid: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    steps_grid: list[int] = field(default_factory=list)
    accuracy_by_steps: list[list[float]] = field(default_factory=list)
    n_val: int = 0
    n_val_healthy: int = 0
    n_val_unhealthy: int = 0
    include_end_step: bool = True
    inversion: str = "reference"
    precision: str | None = None
    sections: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def section(self, name: str) -> Any | None:
        """The typed calibration section ``name`` (e.g. ``"volume"``), or None when the calibration has none."""
        return self.sections.get(name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``calibration.json``: the fields, each section under its own key."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sections"}
        data = json.loads(json.dumps(data))  # plain copies of the lists
        data.update({name: section.to_dict() for name, section in self.sections.items()})
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path = "calibration.json") -> Calibration:
        """A calibration from the object :meth:`to_dict` writes (older versions migrated, see :func:`migrate`).

        Raises:
            InputError: a newer schema version, an unknown or missing field or an invalid section (naming ``source``).
        """
        fix = "rerun `anofpdm calibrate -m MODEL_DIR -d PREP` to recreate it"
        data = migrate(dict(data), source)
        registered = calibration_sections()
        fields = {f.name for f in dataclasses.fields(cls) if f.name != "sections"}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        unknown, missing = sorted(set(data) - fields - set(registered)), sorted(required - set(data))
        if unknown or missing:
            detail = f"unknown field(s) {unknown}" if unknown else f"missing field(s) {missing}"
            raise InputError(f"{source}: not a valid anofpdm calibration: {detail}; {fix}")
        sections = {}
        for name, entry in registered.items():
            if data.get(name) is not None:
                try:
                    sections[name] = entry.type.from_dict(data[name])
                except (TypeError, ValueError) as err:
                    raise InputError(f"{source}: the {name!r} section is not valid ({err}); {entry.missing}") from None
        return cls(**{k: v for k, v in data.items() if k in fields}, sections=sections)

    def check(self) -> None:
        """Check every field's type, range and finiteness; a ValueError starts with the field's name."""
        from anofpdm_monai.config import check_bool, check_float, check_int

        check_float("w", self.w, 0.0, 1000.0)
        check_float("thr_01", self.thr_01, 0.0, 1.0)  # health similarity is a cosine of non-negative errors
        check_int("steps", self.steps, 1, 100_000)
        check_int("stride", self.stride, 1, 100_000)
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding = {self.encoding!r}: must be one of {list(ENCODINGS)}")
        if self.inversion not in INVERSIONS:
            raise ValueError(f"inversion = {self.inversion!r}: must be one of {list(INVERSIONS)}")
        if self.precision not in (None, *PRECISIONS_RUN):
            raise ValueError(f"precision = {self.precision!r}: must be one of {list(PRECISIONS_RUN)} or null")
        check_bool("include_end_step", self.include_end_step)
        if not isinstance(self.map_channel_indices, list) or not self.map_channel_indices:
            raise ValueError(f"map_channel_indices = {self.map_channel_indices!r}: must be a non-empty list of channel indices")
        for i, index in enumerate(self.map_channel_indices):
            check_int(f"map_channel_indices[{i}]", index, 0, 63)
        if not isinstance(self.D, list):
            raise ValueError(f"D = {self.D!r}: must be a list of positive numbers, one per map channel")
        if len(self.D) != len(self.map_channel_indices):
            raise ValueError(
                f"D = {self.D!r}: holds {len(self.D)} value(s) but there are {len(self.map_channel_indices)} map channels "
                f"(map_channel_indices {self.map_channel_indices})"
            )
        for i, d in enumerate(self.D):
            check_float(f"D[{i}]", d, 0.0, 1e6, low_open=True)
        if not isinstance(self.map_channels, list) or len(self.map_channels) != len(self.map_channel_indices):
            raise ValueError(f"map_channels = {self.map_channels!r}: must name the {len(self.map_channel_indices)} map channels")
        for name in ("w_grid", "accuracy", "thresholds", "steps_grid", "accuracy_by_steps"):
            if not isinstance(getattr(self, name), list):
                raise ValueError(f"{name} = {getattr(self, name)!r}: must be a list")
        for name in ("n_val", "n_val_healthy", "n_val_unhealthy"):
            check_int(name, getattr(self, name), 0)

    def save(self, path: str | Path) -> None:
        """Write the calibration as JSON, atomically (temporary file, then rename)."""
        atomic_write_bytes(path, json_text(self.to_dict()).encode())  # strict JSON: NaN is written as null

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration written by :meth:`save`.

        Raises:
            FileNotFoundError: if ``path`` does not exist (the message says how to create it).
            ValueError: if the file is not a valid calibration.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no calibration; run `anofpdm calibrate -m MODEL_DIR -d PREP` to create it"
            )
        from anofpdm_monai.io import InputError, read_json

        fix = "rerun `anofpdm calibrate -m MODEL_DIR -d PREP` to recreate it"
        data = read_json(path, f"not a valid anofpdm calibration; {fix}")
        if not isinstance(data, dict):
            raise InputError(f"{path}: not a valid anofpdm calibration: holds a {type(data).__name__}, not an object; {fix}")
        calibration = cls.from_dict(data, path)
        try:
            calibration.check()
        except ValueError as err:
            raise InputError(f"{path}: not a valid anofpdm calibration: {err}; {fix}") from err
        return calibration


@dataclass
class DivergenceCurve:
    """The divergence curve of one validation slice at w*, for the calibration plot.

    Attributes:
        index: position of the slice in the validation set.
        label: image-level label (HEALTHY or UNHEALTHY).
        timesteps: (K,) visited timesteps (up to the largest candidate budget).
        divergence: (K, M) divergence d per visited step and map channel.
        end_step: (M,) end step t_e per map channel at the selected budget, as a timestep.
    """

    index: int
    label: int
    timesteps: list[int]
    divergence: list[list[float]]
    end_step: list[int]


def select_threshold_01(sim_healthy: Sequence[float], sim_unhealthy: Sequence[float]) -> tuple[float, float]:
    """Health threshold of ALGORITHM.md section 6.

    Candidates are the quantiles q in ``linspace(0.005, 0.095, 100)`` of the healthy similarities;
    the chosen one minimises ``#(unhealthy with sim > thr) + #(healthy with sim < thr)``, ties going
    to the first (smallest q). The accuracy uses the decision rule "unhealthy iff sim <= thr".

    Args:
        sim_healthy: (V_h,) similarities of slices labelled healthy.
        sim_unhealthy: (V_u,) similarities of slices labelled unhealthy.

    Returns:
        ``(thr_01, accuracy)``.
    """
    healthy = np.asarray(sim_healthy, dtype=np.float64).ravel()
    unhealthy = np.asarray(sim_unhealthy, dtype=np.float64).ravel()
    _check_both_classes(healthy.size, unhealthy.size)
    candidates = np.quantile(healthy, THRESHOLD_QUANTILES)
    errors = (unhealthy[None, :] > candidates[:, None]).sum(1) + (healthy[None, :] < candidates[:, None]).sum(1)
    thr = float(candidates[int(np.argmin(errors))])
    correct = (healthy > thr).sum() + (unhealthy <= thr).sum()
    return thr, float(correct / (healthy.size + unhealthy.size))


def select_guidance(w_grid: Sequence[float], accuracies: Sequence[float]) -> float:
    """Selected guidance strength of ALGORITHM.md section 6.

    The largest w whose accuracy is at least 99 % of the best accuracy among all candidates up to
    and including it (candidates taken in ascending w; an unsorted grid is sorted with its accuracies).

    Args:
        w_grid: (G,) candidate strengths, distinct.
        accuracies: (G,) accuracy per candidate.

    Returns:
        w*.
    """
    if len(w_grid) == 0:
        raise ValueError("w_grid is empty: give at least one guidance strength")
    if len(w_grid) != len(accuracies):
        raise ValueError(f"w_grid ({len(w_grid)} values) and accuracies ({len(accuracies)}) must have the same length")
    if len(set(float(w) for w in w_grid)) != len(w_grid):
        raise ValueError(f"w_grid {list(w_grid)} holds duplicates")
    selected = None
    best = -math.inf
    for w, acc in sorted(zip(map(float, w_grid), map(float, accuracies))):
        best = max(best, acc)
        if acc >= ACCURACY_FRACTION * best:
            selected = w
    return selected


def select_budget(steps_grid: Sequence[int], accuracies: Sequence[float]) -> int:
    """Selected forward-step budget: the one whose accuracy (each at its own w*) is highest; ties to the larger.

    Args:
        steps_grid: (B,) candidate budgets N, distinct.
        accuracies: (B,) validation accuracy of each budget at its selected w.

    Returns:
        N*.
    """
    if len(steps_grid) == 0 or len(steps_grid) != len(accuracies):
        raise ValueError(f"steps_grid {list(steps_grid)} and accuracies {list(accuracies)} must be non-empty and of equal length")
    best = max(float(a) for a in accuracies)
    return max(int(n) for n, a in zip(steps_grid, accuracies) if float(a) == best)


def _check_both_classes(n_healthy: int, n_unhealthy: int) -> None:
    """Raise a ValueError naming the missing class of validation slices."""
    missing = [name for name, n in (("healthy", n_healthy), ("unhealthy", n_unhealthy)) if n == 0]
    if missing:
        raise InputError(
            f"the validation set has no {' and no '.join(missing)} slices; calibration needs both classes "
            "(give more validation slices, n_val)",
            arguments="n_val",
        )


def _check_calibration_inputs(
    slices: torch.Tensor, labels: torch.Tensor, w_grid: Sequence[float], steps_grid: Sequence[int], batch_size: int
) -> None:
    """Raise a ValueError naming the first invalid input of :func:`calibrate`."""
    if len(steps_grid) == 0:
        raise ValueError("steps is empty: give at least one forward-step budget N")
    if len(set(steps_grid)) != len(steps_grid):
        raise ValueError(f"steps {list(steps_grid)} holds duplicates")
    if len(w_grid) == 0:
        raise ValueError("w_grid is empty: give at least one guidance strength")
    if len(set(float(w) for w in w_grid)) != len(w_grid):
        raise ValueError(f"w_grid {list(w_grid)} holds duplicates")
    if slices.ndim != 4:
        raise ValueError(f"slices must have shape (V, C, S, S), got {tuple(slices.shape)}")
    if labels.shape != (slices.shape[0],):
        raise ValueError(f"labels must have shape ({slices.shape[0]},) (one per slice), got {tuple(labels.shape)}")
    if not bool(((labels == HEALTHY) | (labels == UNHEALTHY)).all()):
        raise ValueError(f"labels must be HEALTHY ({HEALTHY}) or UNHEALTHY ({UNHEALTHY})")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    _check_both_classes(int((labels == HEALTHY).sum()), int((labels == UNHEALTHY).sum()))


def predictor_precision(predict_eps: EpsPredictor) -> str | None:
    """``"bf16"`` or ``"fp32"`` for a :class:`~anofpdm_monai.networks.NoisePredictor` (its ``autocast``), else None."""
    autocast = getattr(predict_eps, "autocast", None)
    return None if autocast is None else ("bf16" if autocast else "fp32")


def calibrate(
    predict_eps: EpsPredictor,
    alphas_cumprod: torch.Tensor,
    slices: torch.Tensor,
    labels: torch.Tensor,
    *,
    w_grid: Sequence[float],
    steps: int | Sequence[int] = 600,
    stride: int = 1,
    encoding: str = "ddim",
    map_channels: Sequence[int] = (0,),
    map_channel_names: Sequence[str] | None = None,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    include_end_step: bool = True,
    inversion: str = "reference",
) -> tuple[Calibration, list[DivergenceCurve]]:
    """Calibrate w*, thr_01 and D (and optionally N) on validation slices (ALGORITHM.md section 6).

    Runs the forward-process engine once per batch with the whole ``w_grid`` and the largest budget,
    collecting per w and slice the error and divergence curves; similarity and dmax for every
    candidate budget are computed from their first visited steps.

    Args:
        predict_eps: noise predictor ``(x (N, C, S, S), t (N,), labels (N,)) -> (N, C, S, S)``.
        alphas_cumprod: (T,) the training schedule's cumulative alpha products.
        slices: (V, C, S, S) validation slices in [-1, 1].
        labels: (V,) image-level labels, HEALTHY or UNHEALTHY; both must occur.
        w_grid: candidate guidance strengths (sorted ascending internally).
        steps: forward-step budget N (the paper: 600), or several candidate budgets to select from
            with :func:`select_budget`.
        stride: visited-step stride k.
        encoding: ``"ddim"`` or ``"ddpm"``.
        map_channels: map channel indices in [0, C).
        map_channel_names: their names, stored in the calibration if given.
        batch_size: slices per forward process.
        generator: random source on the compute device.
        device: where to run (default: ``slices.device``).
        progress: show a progress bar over batches.
        include_end_step: aggregated-map convention (see the engine).
        inversion: DDIM inversion variant (see the engine).

    Returns:
        ``(calibration, curves)``: the :class:`Calibration` and the divergence curves at w* of up to
        three healthy and three unhealthy slices (the first of each class).
    """
    labels = torch.as_tensor(labels).long().cpu()
    budgets = sorted(int(n) for n in ([steps] if isinstance(steps, int) else steps))
    _check_calibration_inputs(slices, labels, w_grid, budgets, batch_size)
    if map_channel_names is not None and len(map_channel_names) != len(map_channels):
        raise ValueError(
            f"map_channel_names {list(map_channel_names)} must name each of the map channels {list(map_channels)}"
        )
    grid = sorted(float(w) for w in w_grid)
    device = slices.device if device is None else torch.device(device)

    mse_h, mse_u, divergence = [], [], []
    starts = range(0, slices.shape[0], batch_size)
    for start in tqdm(starts, desc="calibration", disable=not progress):
        batch = slices[start : start + batch_size].to(device)
        result = run_forward_process(
            predict_eps, batch, alphas_cumprod, guidance_scales=grid, steps=budgets[-1], stride=stride,
            encoding=encoding, map_channels=map_channels, include_end_step=include_end_step,
            inversion=inversion, generator=generator,
        )  # fmt: skip
        mse_h.append(result.mse_h.cpu())  # (G, b, K, M)
        mse_u.append(result.mse_u.cpu())
        divergence.append(result.divergence.cpu())
    mse_h, mse_u, divergence = (torch.cat(curves, dim=1) for curves in (mse_h, mse_u, divergence))
    _check_finite_statistics(mse_h, mse_u, divergence)

    healthy, unhealthy = labels == HEALTHY, labels == UNHEALTHY
    per_budget = []
    for budget in budgets:
        k = len(visited_timesteps(budget, stride))
        sim = health_similarity(mse_h[:, :, :k], mse_u[:, :, :k])  # (G, V)
        selections = [select_threshold_01(s[healthy].numpy(), s[unhealthy].numpy()) for s in sim]
        accuracy = [acc for _, acc in selections]
        w_star = select_guidance(grid, accuracy)
        per_budget.append({"k": k, "selections": selections, "accuracy": accuracy, "w": w_star})
    steps_star = select_budget(budgets, [p["accuracy"][grid.index(p["w"])] for p in per_budget])
    chosen = per_budget[budgets.index(steps_star)]
    g, k = grid.index(chosen["w"]), chosen["k"]
    dmax = divergence[g, :, :k].amax(dim=1)  # (V, M)
    calibration = Calibration(
        w=chosen["w"],
        thr_01=chosen["selections"][g][0],
        D=_positive_divergence(dmax[unhealthy].amax(dim=0)).tolist(),
        steps=steps_star,
        stride=stride,
        encoding=encoding,
        map_channels=list(map_channel_names) if map_channel_names is not None else [int(m) for m in map_channels],
        map_channel_indices=[int(m) for m in map_channels],
        w_grid=grid,
        accuracy=chosen["accuracy"],
        thresholds=[thr for thr, _ in chosen["selections"]],
        steps_grid=budgets,
        accuracy_by_steps=[p["accuracy"] for p in per_budget],
        n_val=int(labels.numel()),
        n_val_healthy=int(healthy.sum()),
        n_val_unhealthy=int(unhealthy.sum()),
        include_end_step=include_end_step,
        inversion=inversion,
        precision=predictor_precision(predict_eps),
    )
    timesteps = visited_timesteps(budgets[-1], stride)
    curves = [_divergence_curve(i, int(labels[i]), timesteps, divergence[g, i], k) for i in _curve_indices(labels)]
    return calibration, curves


def _check_finite_statistics(mse_h: torch.Tensor, mse_u: torch.Tensor, divergence: torch.Tensor) -> None:
    """Refuse a calibration whose errors or divergences (each (G, V, K, M)) are NaN or infinite.

    They come from the network's noise predictions, so a non-finite value means a broken model (NaN or
    overflowing weights), and thr_01 and D computed from them would be meaningless (thr_01 null).
    """
    for name, values in (("healthy-condition errors", mse_h), ("unhealthy-condition errors", mse_u), ("divergences", divergence)):
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            slices = int(bad.flatten(2).any(dim=2).any(dim=0).sum())
            raise ValueError(
                f"calibration: the {name} of {slices} of {values.shape[1]} validation slices are NaN or infinite: the "
                "network's noise predictions are not finite (diverged or overflowing weights); retrain the model with "
                "a lower learning rate before calibrating"
            )


def _positive_divergence(d: torch.Tensor) -> torch.Tensor:
    """D per map channel, floored at the smallest normal float32 with a warning.

    D = 0 means no unhealthy validation slice showed any divergence (an untrained or collapsed model);
    the dynamic threshold divides by D, so it is floored, which puts every slice at the 0.90 quantile.
    """
    tiny = torch.finfo(torch.float32).tiny
    if bool((d <= tiny).any()):
        warnings.warn(f"calibration: D = {d.tolist()} has zero entries (no divergence on unhealthy slices); floored to {tiny:.3g}")
    return d.clamp_min(tiny)


def _curve_indices(labels: torch.Tensor) -> list[int]:
    """Indices of the first CURVES_PER_CLASS validation slices of each class, ascending."""
    first = [torch.nonzero(labels == label).flatten()[:CURVES_PER_CLASS] for label in (HEALTHY, UNHEALTHY)]
    return sorted(torch.cat(first).tolist())


def _divergence_curve(index: int, label: int, timesteps: list[int], divergence: torch.Tensor, k: int) -> DivergenceCurve:
    """Curve of one slice: ``divergence`` (K, M) over all ``timesteps``; t_e taken among the first ``k`` steps."""
    end = divergence[:k].argmax(dim=0)
    return DivergenceCurve(
        index=index,
        label=label,
        timesteps=list(timesteps),
        divergence=divergence.tolist(),
        end_step=[timesteps[int(i)] for i in end],
    )


def plot_calibration(calibration: Calibration, curves: Sequence[DivergenceCurve], path: str | Path) -> None:
    """Write a PNG: accuracy against w (one line per candidate budget N) with w* marked (left);
    divergence curves with t_e and the selected budget N* marked (right).

    The right panel shows, per kept slice, d(t) averaged over map channels, healthy in blue and
    unhealthy in red, with each map channel's end step t_e marked on the curve.

    Args:
        calibration: result of :func:`calibrate`.
        curves: the curves returned by :func:`calibrate`.
        path: output PNG path (written atomically).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    if len(calibration.steps_grid) > 1:
        for budget, accuracy in zip(calibration.steps_grid, calibration.accuracy_by_steps):
            style = "o-" if budget == calibration.steps else ".:"
            left.plot(calibration.w_grid, accuracy, style, label=f"N = {budget}")
    else:
        left.plot(calibration.w_grid, calibration.accuracy, "o-", color="black")
    left.axvline(calibration.w, color="green", linestyle="--", label=f"w* = {calibration.w:g}, N* = {calibration.steps}")
    left.set_xlabel("guidance strength w")
    left.set_ylabel("validation accuracy (health)")
    left.legend()
    colours = {HEALTHY: "tab:blue", UNHEALTHY: "tab:red"}
    names = {HEALTHY: "healthy", UNHEALTHY: "unhealthy"}
    labelled = set()
    for curve in curves:
        mean_d = np.asarray(curve.divergence, dtype=np.float64).mean(axis=1)
        timesteps = np.asarray(curve.timesteps)
        name = names[curve.label] if curve.label not in labelled else None
        labelled.add(curve.label)
        right.plot(timesteps, mean_d, color=colours[curve.label], label=name)
        marks = np.searchsorted(timesteps, curve.end_step)
        right.plot(timesteps[marks], mean_d[marks], "x", color=colours[curve.label], markersize=8)
    if curves and curves[0].timesteps[-1] >= calibration.steps:
        right.axvline(calibration.steps, color="green", linestyle="--", label=f"N* = {calibration.steps}")
    right.set_xlabel("timestep t")
    right.set_ylabel("divergence d (mean over map channels)")
    right.set_title("d(t) at w* (x: end step t_e)")
    if curves:
        right.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
