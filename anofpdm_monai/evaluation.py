"""Cohort evaluation (ALGORITHM.md section 7): per-slice and per-case tables and the Table-1 summary.

Each case is evaluated once and its outputs saved as ``RESULTS/cases/<case>.npz`` (written
atomically, the marker for ``--continue``); the tables and the summary are merged from those
files, so an interrupted or sharded run gives the same tables as one uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from anofpdm_monai.baselines import (
    apply_threshold,
    best_threshold_dice,
    ddib_reconstruction,
    lesion_polarity,
    tune_pixel_threshold,
)
from anofpdm_monai.data import PreprocessedStore
from anofpdm_monai.inferers import ANOFPDM_METHODS, SliceInferer, VolumeInferer, write_segmentation
from anofpdm_monai.io import (
    InputError,
    atomic_save_dataframe,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_case_id,
    json_text,
)
from anofpdm_monai.methods import REGISTRY
from anofpdm_monai.metrics import (
    PooledAUPRC,
    brain_foreground,
    dice_iou_per_slice,
    merge_auprc,
    summarise_slices,
    summary_markdown,
    volume_dice,
)
from anofpdm_monai.model import calibration_path, load_calibration
from anofpdm_monai.networks import HEALTHY, UNHEALTHY
from anofpdm_monai.readers import LESION_LABELS, brain_mask_file, detect_layout, read_cases
from anofpdm_monai.scoring import read_mask
from anofpdm_monai.segmentation import mixed_setup_masks
from anofpdm_monai.transforms import CaseGeometry, slices_to_volume

BASELINES = tuple(name for name, method in REGISTRY.items() if method.kind != "anofpdm")
ALL_METHODS = tuple(REGISTRY)


def supported_methods(model_dir: str | Path) -> list[str]:
    """Every registered method the model folder's calibrations can run (the volume family only where calibrated)."""
    methods = []
    for name, method in REGISTRY.items():
        if method.kind == "anofpdm":
            if not calibration_path(model_dir, method.encoding).is_file():
                continue
            if method.variant == "volume" and load_calibration(model_dir, method.encoding).volume is None:
                continue
        methods.append(name)
    return methods


@dataclass
class EvalCase:
    """One test case as the model sees it: slices (N, C, S, S), masks (N, S, S), and where it came from.

    ``whole_volume`` is False once :func:`select_slices` dropped any of its slices (``--max-slices``):
    its 3-D DICE is then not computed (a subset of slices says nothing about the volume).
    """

    case_id: str
    images: torch.Tensor
    masks: torch.Tensor
    slice_indices: np.ndarray
    geometry: CaseGeometry | None = None
    label_path: Path | None = None
    voxel_mm: tuple[float, float, float] | None = None
    whole_volume: bool = True


class Cohort:
    """The cases of a preprocessed store split, or of a raw cohort preprocessed with the model's chain."""

    def __init__(self, source: str | Path, inferer: VolumeInferer, split: str = "test") -> None:
        self.source = Path(source)
        self.inferer = inferer
        if (self.source / "manifest.csv").is_file():
            self.store: PreprocessedStore | None = PreprocessedStore(self.source)
            cfg, model_cfg = self.store.config, inferer.config.preprocess
            if cfg.channel_names != model_cfg.channel_names or cfg.image_size != model_cfg.image_size:
                raise InputError(
                    f"{self.source}: store channels {cfg.channel_names} at {cfg.image_size}px do not fit the model "
                    f"({model_cfg.channel_names} at {model_cfg.image_size}px)"
                )
            rows = self.store.rows(split)
            if rows.empty:
                raise InputError(f"{self.source}: split={split!r} holds no slices of this store; choose 'train', 'val' or 'test'", arguments="split")
            self.case_ids = sorted(rows["patient"].unique().tolist())
            self.rows = rows
        else:
            layout = detect_layout(self.source)
            if layout is None:
                raise InputError(f"{self.source}: neither a preprocessed store nor a known raw cohort layout")
            self.store = None
            self.allowed_labels = LESION_LABELS.get(layout)
            self.records = {r.case_id: r for r in read_cases(self.source, layout)}
            self.case_ids = sorted(self.records)

    def load(self, case_id: str) -> EvalCase:
        if self.store is not None:
            rows = self.rows[self.rows["patient"] == case_id]
            images, masks, _ = self.store.load_slices(rows)
            voxel_mm = self.store.case_meta(case_id).get("slice_voxel_mm")  # absent in stores made before it was recorded
            return EvalCase(case_id, images, masks, rows["slice"].to_numpy(), voxel_mm=None if voxel_mm is None else tuple(voxel_mm))
        record = self.records[case_id]
        if record.label is None:
            raise InputError(f"{case_id}: no lesion file; evaluation needs ground truth")
        case = self.inferer.preprocess(list(record.channels.values()), record.label, self.allowed_labels, brain_mask_file(record))
        return EvalCase(case_id, case.images, case.masks, case.geometry.slice_indices, case.geometry, record.label, case.geometry.slice_voxel_mm)


def select_slices(case: EvalCase, keep: np.ndarray | None) -> EvalCase:
    """Restrict a case to the slice indices in ``keep`` (``--max-slices``); None keeps all."""
    if keep is None:
        return case
    sel = np.isin(case.slice_indices, keep)
    return dataclasses.replace(case, images=case.images[sel], masks=case.masks[sel], slice_indices=case.slice_indices[sel],
                               whole_volume=case.whole_volume and bool(sel.all()))  # fmt: skip


class CohortEvaluator:
    """Evaluate methods on cases and merge the results.

    Args:
        inferer: a :class:`VolumeInferer` of the model (its network, schedule and chain are reused).
        methods: names from :data:`ALL_METHODS`.
        results_dir: output folder.
        ddib_threshold: map threshold of the ``ddib`` baseline (tuned with pixel labels on validation).
        ddib_depth: encoding depth of the ``ddib`` baseline.
        outputs_dir: where to also write, for raw-cohort cases, the first AnoFPDM method's mask and map
            NIfTI files on the input grid and a PNG overlay (None writes none).
    """

    def __init__(
        self,
        inferer: VolumeInferer,
        methods: Sequence[str],
        results_dir: str | Path,
        *,
        ddib_threshold: float | None = None,
        ddib_depth: int = 400,
        outputs_dir: str | Path | None = None,
    ) -> None:
        unknown = [m for m in methods if m not in ALL_METHODS]
        if unknown:
            raise InputError(f"methods: unknown {unknown}; choose from {list(ALL_METHODS)}", arguments="methods")
        self.inferer = inferer
        self.methods = list(methods)
        self.results_dir = Path(results_dir)
        self.ddib_threshold = ddib_threshold
        self.ddib_depth = ddib_depth
        self.model, self.settings = inferer.model, inferer.settings
        self.polarity = lesion_polarity(self.model.config.preprocess.map_channels)  # the oracle threshold's direction
        self.slice_inferers = {}
        for encoding in sorted({ANOFPDM_METHODS[m][0] for m in self.methods if m in ANOFPDM_METHODS}):
            variants = [ANOFPDM_METHODS[m][1] for m in self.methods if m in ANOFPDM_METHODS and ANOFPDM_METHODS[m][0] == encoding]
            self.slice_inferers[encoding] = SliceInferer.from_model(
                self.model, self.settings, encoding=encoding, variants=variants, setup="unhealthy"
            )
        self.outputs_dir = None if outputs_dir is None else Path(outputs_dir)

    def case_file(self, case_id: str) -> Path:
        return self.results_dir / "cases" / f"{check_case_id(case_id, self.results_dir)}.npz"

    def ddib_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, int]:
        """DDIB reconstruction maps (N, S, S) in batches, and calls per slice.

        The baseline runs at the DDIM calibration's w and stride (or the run's ``stride``) on the same network.
        """
        maps, calls = [], 0
        calibration = self.model.calibration("ddim")
        stride = self.settings.stride or calibration.stride
        predict_eps = self.model.noise_predictor(self.settings.precision)
        for start in range(0, images.shape[0], self.settings.batch_size):
            x0 = images[start : start + self.settings.batch_size].to(self.model.device)
            result = ddib_reconstruction(
                predict_eps, x0, self.model.alphas_cumprod.to(x0.device), depth=self.ddib_depth, w=calibration.w,
                stride=stride, map_channels=calibration.map_channel_indices,
            )  # fmt: skip
            maps.append(result.maps.float().cpu())
            calls = result.network_calls
        return torch.cat(maps), calls

    def evaluate_case(self, case: EvalCase) -> Path:
        """Run every method on one case and save its arrays and per-method facts to ``cases/<id>.npz``."""
        arrays: dict[str, np.ndarray] = {
            "truth": case.masks.numpy().astype(bool),
            "foreground": brain_foreground(case.images).numpy().astype(bool),
            "intensity": case.images[:, list(self.model.config.preprocess.map_channel_indices)].mean(dim=1).numpy().astype(np.float32),
            "slice_indices": case.slice_indices,
            "whole_volume": np.array(case.whole_volume),
        }
        if case.voxel_mm is not None:
            arrays["voxel_mm"] = np.asarray(case.voxel_mm, dtype=np.float64)  # volumes in ml (the report)
        facts: dict[str, dict] = {"threshold": {"direction": self.polarity}} if "threshold" in self.methods else {}
        for encoding, inferer in self.slice_inferers.items():
            start = time.perf_counter()
            outputs = inferer(case.images, case.case_id, case.slice_indices, case.voxel_mm)
            seconds = time.perf_counter() - start
            for method, (enc, variant) in ANOFPDM_METHODS.items():
                if method not in self.methods or enc != encoding:
                    continue
                out = outputs[variant]
                arrays[f"{method}/maps"] = out.maps.numpy().astype(np.float32)
                arrays[f"{method}/masks"] = out.masks.numpy()
                arrays[f"{method}/mixed_masks"] = out.mixed_masks.numpy()
                arrays[f"{method}/pred"] = out.predicted_unhealthy.numpy()
                arrays[f"{method}/sim"] = out.sim.numpy()
                arrays[f"{method}/t_e"] = out.end_step.float().mean(dim=1).numpy()
                arrays[f"{method}/quantile"] = out.quantile.float().mean(dim=1).numpy()
                arrays[f"{method}/threshold"] = out.threshold.numpy()
                # the curves of the report: health score against its threshold, d(t) against t
                arrays[f"{method}/health"] = out.health.numpy().astype(np.float32)
                arrays[f"{method}/health_threshold"] = np.float64(out.health_threshold)
                arrays[f"{method}/divergence"] = out.divergence.numpy().astype(np.float32)
                arrays[f"{method}/timesteps"] = out.timesteps.numpy()
                facts[method] = {"seconds": seconds, "calls": out.network_calls}
        if "ddib" in self.methods and self.ddib_threshold is not None:
            start = time.perf_counter()
            maps, calls = self.ddib_maps(case.images)
            arrays["ddib/maps"] = maps.numpy()
            arrays["ddib/masks"] = (maps >= self.ddib_threshold).numpy()
            facts["ddib"] = {"seconds": time.perf_counter() - start, "calls": calls}
        self.write_outputs(case, arrays)
        native = self.native_dice(case, arrays)
        for method, value in native.items():
            facts[method]["dice_3d_native"] = value
        buffer = io.BytesIO()
        np.savez_compressed(buffer, facts=np.array(json_text(facts, indent=None)), **arrays)
        return atomic_write_bytes(self.case_file(case.case_id), buffer.getvalue())

    def write_outputs(self, case: EvalCase, arrays: dict[str, np.ndarray]) -> None:
        """Write mask, map and overlay of the first AnoFPDM method (raw cohorts, when ``outputs_dir`` is set).

        The mask is the mixed-setup one, as ``segment`` writes it (same writer, same files).
        """
        method = next((m for m in self.methods if m in ANOFPDM_METHODS), None)
        if self.outputs_dir is None or case.geometry is None or method is None:
            return
        from anofpdm_monai.visualize import save_overlay

        masks = torch.from_numpy(arrays[f"{method}/mixed_masks"])
        maps = torch.from_numpy(arrays[f"{method}/maps"])

        def png(path: Path) -> Path:
            return save_overlay(case.images, maps, masks, path, truth=case.masks, slice_indices=case.slice_indices.tolist())

        mask = slices_to_volume(masks.float(), case.geometry, "mask")
        anomaly = slices_to_volume(maps, case.geometry, "map")
        write_segmentation(self.outputs_dir, case.case_id, case.geometry.reference, mask, anomaly, png)

    def native_dice(self, case: EvalCase, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        """3-D DICE on the input's own grid (raw cohorts only: needs the geometry and the lesion file).

        Of each method's output masks (the mixed-setup ones, as ``segment`` and :meth:`write_outputs`
        write them) against the lesion file binarised (> 0): the reading and the DICE of ``anofpdm
        score`` (:func:`~anofpdm_monai.scoring.read_mask`, :func:`~anofpdm_monai.metrics.volume_dice`).
        """
        if case.geometry is None or case.label_path is None:
            return {}
        truth, _ = read_mask(case.label_path)
        out = {}
        for method in self.methods:
            key = f"{method}/mixed_masks" if f"{method}/mixed_masks" in arrays else f"{method}/masks"
            if key in arrays:
                mask = slices_to_volume(torch.from_numpy(arrays[key]).float(), case.geometry, "mask")
                out[method] = volume_dice(mask.astype(bool), truth)
        return out


def load_case_results(path: Path) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "facts"}
        facts = json.loads(str(data["facts"]))
    return arrays, facts


def merge_results(results_dir: str | Path, case_ids: Sequence[str], methods: Sequence[str]) -> dict[str, dict]:
    """Build ``slices.csv``, ``cases.csv``, ``summary.json`` and ``summary.md`` from the per-case files."""
    results_dir = Path(results_dir)
    loaded = {c: load_case_results(results_dir / "cases" / f"{c}.npz") for c in case_ids}
    requested = list(methods)
    methods = [m for m in methods if any(f"{m}/maps" in a for a, _ in loaded.values()) or m == "threshold"]
    oracle = None
    if "threshold" in methods:
        fg = np.concatenate([a["foreground"].ravel() for a, _ in loaded.values()])
        values = np.concatenate([a["intensity"].ravel() for a, _ in loaded.values()])[fg]
        truth = np.concatenate([a["truth"].ravel() for a, _ in loaded.values()])[fg]
        oracle = best_threshold_dice(values, truth, direction=threshold_direction(loaded)) if truth.any() else None
        if oracle is None:  # no lesion voxel: the row is kept, empty, with the reason (see undefined_reasons)
            methods.remove("threshold")
    slice_rows, case_rows = [], []
    pooled = {m: (PooledAUPRC(), PooledAUPRC()) for m in methods}
    for case_id, (arrays, facts) in loaded.items():
        truth, fg = arrays["truth"], arrays["foreground"]
        whole = bool(arrays["whole_volume"]) if "whole_volume" in arrays else False  # files that do not say: partial
        labels = truth.reshape(len(truth), -1).any(1)
        for method in methods:
            if method == "threshold":
                maps = arrays["intensity"] if oracle.direction == "high" else -arrays["intensity"]
                masks = apply_threshold(arrays["intensity"], oracle.threshold, oracle.direction) & fg
            else:
                maps, masks = arrays[f"{method}/maps"], arrays[f"{method}/masks"]
            pred = arrays.get(f"{method}/pred")
            mixed_masks = masks if pred is None else arrays.get(f"{method}/mixed_masks", mixed_setup_masks(masks, pred))
            dice, iou = dice_iou_per_slice(masks, truth)
            mixed_dice, mixed_iou = dice_iou_per_slice(mixed_masks, truth)
            fact = facts.get(method, {})
            n = len(truth)
            for i in range(n):
                slice_rows.append({
                    "case": case_id, "slice": int(arrays["slice_indices"][i]), "method": method,
                    "label": UNHEALTHY if labels[i] else HEALTHY,
                    "pred_label": (UNHEALTHY if pred[i] else HEALTHY) if pred is not None else np.nan,
                    "dice": dice[i], "iou": iou[i], "mixed_dice": mixed_dice[i], "mixed_iou": mixed_iou[i], "lesion_pixels": int(truth[i].sum()), "pred_pixels": int(masks[i].sum()),
                    "sim": float(arrays[f"{method}/sim"][i]) if f"{method}/sim" in arrays else np.nan,
                    "t_e": float(arrays[f"{method}/t_e"][i]) if f"{method}/t_e" in arrays else np.nan,
                    "quantile": float(arrays[f"{method}/quantile"][i]) if f"{method}/quantile" in arrays else np.nan,
                    "threshold": float(arrays[f"{method}/threshold"][i]) if f"{method}/threshold" in arrays else (
                        oracle.threshold if method == "threshold" else np.nan),
                    "network_calls": fact.get("calls", 0), "seconds": fact.get("seconds", 0.0) / max(n, 1),
                    "uses_pixel_labels": REGISTRY[method].uses_pixel_labels,
                })  # fmt: skip
            pooled[method][0].update(maps, truth, fg)
            pooled[method][1].update(maps[labels], truth[labels], fg[labels])
            case_rows.append({
                "case": case_id, "method": method, "dice_3d": volume_dice(mixed_masks, truth) if whole else np.nan,
                "whole_volume": whole,
                "dice_3d_native": fact.get("dice_3d_native", np.nan),
                "lesion_pixels": int(truth.sum()), "pred_pixels": int(mixed_masks.sum()), "slices": n,
                "seconds": fact.get("seconds", 0.0),
            })  # fmt: skip
    slices = pd.DataFrame(slice_rows)
    atomic_save_dataframe(slices, results_dir / "slices.csv")
    atomic_save_dataframe(pd.DataFrame(case_rows), results_dir / "cases.csv")
    rows = summarise_slices(slices)
    for method, (mixed, unhealthy) in pooled.items():
        rows = merge_auprc(rows, method, mixed=mixed.compute(), unhealthy=unhealthy.compute())
    cases = pd.DataFrame(case_rows)
    for method in rows:
        rows[method]["case_dice_3d"] = float(cases.loc[cases["method"] == method, "dice_3d"].mean())
    if oracle is not None:
        rows["threshold"]["oracle_threshold"] = float(oracle.threshold)
        rows["threshold"]["oracle_direction"] = oracle.direction
    elif "threshold" in requested:
        rows["threshold"] = empty_threshold_row(rows, sum(len(a["truth"]) for a, _ in loaded.values()))
    for method, row in rows.items():
        row["undefined"] = undefined_reasons(row)
    atomic_write_json(results_dir / "summary.json", rows)
    atomic_write_text(results_dir / "summary.md", summary_markdown(rows) + undefined_note(rows))
    return rows


def threshold_direction(loaded: dict[str, tuple[dict, dict]]) -> str:
    """The oracle threshold's direction the evaluator recorded from the map channels' sequences (see
    :func:`~anofpdm_monai.baselines.lesion_polarity`); "best" for case files that record none or disagree."""
    found = {facts.get("threshold", {}).get("direction", "best") for _, facts in loaded.values()}
    return found.pop() if len(found) == 1 and found <= {"high", "low", "best"} else "best"


# Why a summary metric can be undefined (written as null in summary.json).
NO_UNHEALTHY = "no unhealthy slice in the evaluated slices (no lesion pixel), so there is nothing to segment"
UNDEFINED_REASONS = {
    "unhealthy_dice": NO_UNHEALTHY,
    "unhealthy_iou": NO_UNHEALTHY,
    "unhealthy_auprc": NO_UNHEALTHY,
    "mixed_auprc": "no lesion pixel in the evaluated slices: average precision needs at least one positive pixel",
    "accuracy": "the method makes no slice-level health decision",
    "precision": "the method makes no slice-level health decision",
    "recall": "the method makes no slice-level health decision",
    "oracle_threshold": "no lesion voxel in the cohort: the oracle intensity threshold is chosen on lesion voxels",
    "case_dice_3d": "no case was evaluated whole (only sampled slices were): a 3-D DICE needs every slice of the case",
}


def empty_threshold_row(rows: dict[str, dict], n_slices: int) -> dict:
    """The ``threshold`` row of a cohort without lesion voxels: every metric undefined (kept, not dropped)."""
    keys = next(iter(rows.values())).keys() if rows else ["mixed_dice", "mixed_iou", "unhealthy_dice", "unhealthy_iou"]
    row = {k: math.nan for k in keys}
    row.update(uses_pixel_labels=True, n_slices=n_slices, n_unhealthy=0, oracle_threshold=math.nan, oracle_direction=None)
    return row


def undefined_reasons(row: dict) -> dict[str, str]:
    """``{metric: why}`` for every metric of ``row`` that is NaN or None (written as null)."""
    no_oracle = "oracle_threshold" in row and row.get("oracle_direction") is None  # the empty threshold row
    reasons = {}
    for key, value in row.items():
        if key not in ("undefined", "oracle_direction") and (value is None or (isinstance(value, float) and math.isnan(value))):
            reasons[key] = UNDEFINED_REASONS["oracle_threshold" if no_oracle else key] if no_oracle or key in UNDEFINED_REASONS else (
                "not computable for these slices")
    return reasons


def undefined_note(rows: dict[str, dict]) -> str:
    """Footnote lines for summary.md: which metrics print as '–' and why."""
    keys_of: dict[tuple[str, str], list[str]] = {}  # (method, reason) -> metrics
    for method, row in rows.items():
        for key, reason in row.get("undefined", {}).items():
            keys_of.setdefault((method, reason), []).append(key)
    methods_of: dict[tuple[str, tuple[str, ...]], list[str]] = {}  # (reason, metrics) -> methods
    for (method, reason), keys in keys_of.items():
        methods_of.setdefault((reason, tuple(keys)), []).append(method)
    if not methods_of:
        return ""
    lines = [f"- {', '.join(keys)} ({', '.join(methods)}): {reason}" for (reason, keys), methods in methods_of.items()]
    return "\n– undefined (null in summary.json):\n" + "\n".join(lines) + "\n"


def tune_ddib_threshold(evaluator: CohortEvaluator, store: PreprocessedStore, max_slices: int, seed: int) -> float:
    """The ``ddib`` baseline's map threshold, tuned on validation slices WITH pixel labels (as such methods are)."""
    rows = store.sample_rows("val", max_slices, seed, "to tune the ddib threshold (or evaluate without ddib)")
    images, masks, _ = store.load_slices(rows)
    maps, _ = evaluator.ddib_maps(images)
    return tune_pixel_threshold(maps, masks, brain_foreground(images))
