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
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from anofpdm_monai.baselines import apply_threshold, best_threshold_dice, lesion_polarity
from anofpdm_monai.data import MANIFEST_FILE, PreprocessedStore
from anofpdm_monai.distributed import resolve_parts, shard
from anofpdm_monai.forward_process import visited_timesteps
from anofpdm_monai.inferers import ForwardProcessInferer, VolumeInferer, slice_seeds, write_segmentation
from anofpdm_monai.io import (
    InputError,
    atomic_save_dataframe,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_case_id,
    json_text,
)
from anofpdm_monai.logs import get_logger, log_to_file
from anofpdm_monai.methods import (
    AnoFPDMMethod,
    ComponentMissing,
    MethodContext,
    ReconstructionMethod,
    ThresholdMethod,
    all_methods,
    get_method,
)
from anofpdm_monai.metrics import (
    PooledAUPRC,
    brain_foreground,
    dice_iou_per_slice,
    merge_auprc,
    summarise_slices,
    summary_markdown,
    volume_dice,
)
from anofpdm_monai.model import AnoFPDMModel, InferenceSettings, available_methods
from anofpdm_monai.networks import HEALTHY, UNHEALTHY, time_call
from anofpdm_monai.outputs import case_record, check_segment_outputs, continuation_record, finish_part, finished, lock_folder, start_part
from anofpdm_monai.provenance import check_continuation, inference_settings, run_record
from anofpdm_monai.readers import LESION_LABELS, brain_mask_file, detect_layout, read_cases
from anofpdm_monai.scoring import LesionMatch, lesion_detection_summary, match_lesions, read_mask
from anofpdm_monai.segmentation import mixed_setup_masks
from anofpdm_monai.transforms import CaseGeometry, slices_to_volume
from anofpdm_monai.tuning import (
    DEFAULT_TUNING_SLICES,
    TUNING_FOLDER,
    TuningResult,
    cache_key,
    cached_tuning,
    method_maps,
    save_tuning,
    tune,
    validation_sample,
)


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
        if (self.source / MANIFEST_FILE).is_file():
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
        methods: registered method names (:func:`anofpdm_monai.methods.all_methods`).
        results_dir: output folder.
        tuned: each reconstruction method's tuning (:mod:`anofpdm_monai.tuning`); a reconstruction method
            without one gets no outputs.
        contexts: each reconstruction method's :class:`~anofpdm_monai.methods.MethodContext` (its
            components loaded); built here when not given.
        outputs_dir: where to also write, for raw-cohort cases, the first AnoFPDM method's mask and map
            NIfTI files on the input grid and a PNG overlay (None writes none).
    """

    def __init__(
        self,
        inferer: VolumeInferer,
        methods: Sequence[str],
        results_dir: str | Path,
        *,
        tuned: Mapping[str, TuningResult] | None = None,
        contexts: Mapping[str, MethodContext] | None = None,
        outputs_dir: str | Path | None = None,
    ) -> None:
        registry = all_methods()
        unknown = [m for m in methods if m not in registry]
        if unknown:
            raise InputError(f"methods: unknown {unknown}; choose from {list(registry)}", arguments="methods")
        self.inferer = inferer
        self.methods = list(methods)
        self.entries = {m: registry[m] for m in self.methods}
        self.results_dir = Path(results_dir)
        self.tuned = dict(tuned or {})
        self.model, self.settings = inferer.model, inferer.settings
        self.polarity = lesion_polarity(self.model.config.preprocess.map_channels)  # the oracle threshold's direction
        anofpdm = {m: e for m, e in self.entries.items() if isinstance(e, AnoFPDMMethod)}
        self.slice_inferers = {}
        for encoding in sorted({e.encoding for e in anofpdm.values()}):
            variants = [e.variant for e in anofpdm.values() if e.encoding == encoding]
            self.slice_inferers[encoding] = ForwardProcessInferer.from_model(
                self.model, self.settings, encoding=encoding, variants=variants, setup="unhealthy"
            )
        self.contexts = dict(contexts or {})
        for name, entry in self.entries.items():
            if isinstance(entry, ReconstructionMethod) and name not in self.contexts:
                self.contexts[name] = MethodContext(self.model, self.settings, entry.load_components(self.model, self.model.device))
        self.outputs_dir = None if outputs_dir is None else Path(outputs_dir)

    def case_file(self, case_id: str) -> Path:
        return self.results_dir / "cases" / f"{check_case_id(case_id, self.results_dir)}.npz"

    def case_record_file(self, case_id: str) -> Path:
        """``RESULTS/cases/CASE.json``: the settings a finished case was made with (beside its ``CASE.npz``, written last)."""
        return self.case_file(case_id).with_suffix(".json")

    def reconstruction_arrays(self, name: str, case: EvalCase) -> tuple[dict[str, np.ndarray], dict]:
        """A reconstruction method's arrays of one case: maps and masks of the unhealthy setup, the mixed setup's
        masks (and maps, when its tuned hyperparameters differ), with its seconds and calls per slice."""
        method, tuned = self.entries[name], self.tuned[name].setups
        start = time.perf_counter()
        seeds = slice_seeds(self.settings.seed, case.case_id, case.slice_indices)
        foreground = brain_foreground(case.images)
        maps, calls = method_maps(method, self.contexts[name], case.images, seeds, tuned["unhealthy"].params)
        arrays = {f"{name}/maps": maps.numpy(), f"{name}/masks": ((maps >= tuned["unhealthy"].threshold) & foreground).numpy()}
        mixed_maps = maps
        if tuned["mixed"].params != tuned["unhealthy"].params:
            mixed_maps, mixed_calls = method_maps(method, self.contexts[name], case.images, seeds, tuned["mixed"].params)
            arrays[f"{name}/mixed_maps"] = mixed_maps.numpy()
            calls += mixed_calls
        arrays[f"{name}/mixed_masks"] = ((mixed_maps >= tuned["mixed"].threshold) & foreground).numpy()
        facts = {"seconds": time.perf_counter() - start, "calls": calls, "params": {k: v.params for k, v in tuned.items()}}
        return arrays, facts

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
        facts: dict[str, dict] = {m: {"direction": self.polarity} for m, e in self.entries.items() if isinstance(e, ThresholdMethod)}
        input_masks: dict[str, np.ndarray] = {}  # the mixed masks on the input grid (raw cohorts), as segment writes them
        for encoding, inferer in self.slice_inferers.items():
            start = time.perf_counter()
            outputs = inferer(case.images, case.case_id, case.slice_indices, case.voxel_mm)
            seconds = time.perf_counter() - start
            for method, entry in self.entries.items():
                if not isinstance(entry, AnoFPDMMethod) or entry.encoding != encoding:
                    continue
                out = outputs[entry.variant]
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
                if case.geometry is not None:
                    input_masks[method] = inferer.input_grid_mask(entry.variant, out, case.geometry, "mixed")
        for method, entry in self.entries.items():
            if isinstance(entry, ReconstructionMethod) and method in self.tuned:
                more, facts[method] = self.reconstruction_arrays(method, case)
                arrays.update(more)
        self.write_outputs(case, arrays, input_masks)
        for method, scores in self.native_scores(case, arrays, input_masks).items():
            facts[method].update(scores)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, facts=np.array(json_text(facts, indent=None)), **arrays)
        return atomic_write_bytes(self.case_file(case.case_id), buffer.getvalue())

    def write_outputs(self, case: EvalCase, arrays: dict[str, np.ndarray], input_masks: dict[str, np.ndarray]) -> None:
        """Write mask, map and overlay of the first AnoFPDM method (raw cohorts, when ``outputs_dir`` is set).

        The mask is the mixed-setup one on the input grid (``input_masks``, from
        :meth:`~anofpdm_monai.inferers.ForwardProcessInferer.input_grid_mask`), as ``segment`` writes it
        (same writer, same files).
        """
        method = next((m for m, e in self.entries.items() if isinstance(e, AnoFPDMMethod)), None)
        if self.outputs_dir is None or case.geometry is None or method is None:
            return
        from anofpdm_monai.visualize import save_overlay

        masks = torch.from_numpy(arrays[f"{method}/mixed_masks"])
        maps = torch.from_numpy(arrays[f"{method}/maps"])

        def png(path: Path) -> Path:
            return save_overlay(case.images, maps, masks, path, truth=case.masks, slice_indices=case.slice_indices.tolist())

        anomaly = slices_to_volume(maps, case.geometry, "map")
        write_segmentation(self.outputs_dir, case.case_id, case.geometry.reference, input_masks[method], anomaly, png)

    def native_scores(self, case: EvalCase, arrays: dict[str, np.ndarray], input_masks: dict[str, np.ndarray]) -> dict[str, dict]:
        """Scores on the input's own grid (raw cohorts only: needs the geometry and the lesion file).

        Of each method's output mask (the mixed-setup one, as ``segment`` and :meth:`write_outputs` write
        it) against the lesion file binarised (> 0), read as ``anofpdm score`` reads it
        (:func:`~anofpdm_monai.scoring.read_mask`): ``dice_3d_native``
        (:func:`~anofpdm_monai.metrics.volume_dice`) and, for a case evaluated whole, ``lesions``
        (:func:`~anofpdm_monai.scoring.match_lesions`, as a dict) for the lesion-wise summary.
        """
        if case.geometry is None or case.label_path is None:
            return {}
        truth, label_image = read_mask(case.label_path)
        out = {}
        for method in self.methods:
            key = f"{method}/mixed_masks" if f"{method}/mixed_masks" in arrays else f"{method}/masks"
            if method in input_masks:
                mask = input_masks[method].astype(bool)
            elif key in arrays:  # the baselines' slice masks
                mask = slices_to_volume(torch.from_numpy(arrays[key]).float(), case.geometry, "mask").astype(bool)
            else:
                continue
            out[method] = {"dice_3d_native": volume_dice(mask, truth)}
            if case.whole_volume:
                out[method]["lesions"] = match_lesions(mask, truth, label_image.affine).to_dict()
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
    registry = all_methods()
    oracles = [m for m in methods if isinstance(registry.get(m), ThresholdMethod)]  # computed here, on every case's pixels
    methods = [m for m in methods if any(f"{m}/maps" in a for a, _ in loaded.values()) or m in oracles]
    oracle = None
    if oracles:
        fg = np.concatenate([a["foreground"].ravel() for a, _ in loaded.values()])
        values = np.concatenate([a["intensity"].ravel() for a, _ in loaded.values()])[fg]
        truth = np.concatenate([a["truth"].ravel() for a, _ in loaded.values()])[fg]
        oracle = best_threshold_dice(values, truth, direction=threshold_direction(loaded, oracles[0])) if truth.any() else None
        if oracle is None:  # no lesion voxel: the rows are kept, empty, with the reason (see undefined_reasons)
            methods = [m for m in methods if m not in oracles]
    slice_rows, case_rows = [], []
    pooled = {m: (PooledAUPRC(), PooledAUPRC()) for m in methods}
    for case_id, (arrays, facts) in loaded.items():
        truth, fg = arrays["truth"], arrays["foreground"]
        whole = bool(arrays["whole_volume"]) if "whole_volume" in arrays else False  # files that do not say: partial
        labels = truth.reshape(len(truth), -1).any(1)
        for method in methods:
            if method in oracles:
                maps = arrays["intensity"] if oracle.direction == "high" else -arrays["intensity"]
                masks = apply_threshold(arrays["intensity"], oracle.threshold, oracle.direction) & fg
            else:
                maps, masks = arrays[f"{method}/maps"], arrays[f"{method}/masks"]
            mixed_maps = arrays.get(f"{method}/mixed_maps", maps)  # a method tuned per setup may map each its own way
            pred = arrays.get(f"{method}/pred")
            if f"{method}/mixed_masks" in arrays:
                mixed_masks = arrays[f"{method}/mixed_masks"]
            else:
                mixed_masks = masks if pred is None else mixed_setup_masks(masks, pred)
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
                        oracle.threshold if method in oracles else np.nan),
                    "network_calls": fact.get("calls", 0), "seconds": fact.get("seconds", 0.0) / max(n, 1),
                    "uses_pixel_labels": registry[method].uses_pixel_labels if method in registry else True,
                })  # fmt: skip
            pooled[method][0].update(mixed_maps, truth, fg)
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
    for method in oracles:
        if oracle is not None:
            rows[method]["oracle_threshold"] = float(oracle.threshold)
            rows[method]["oracle_direction"] = oracle.direction
        else:
            rows[method] = empty_threshold_row(rows, sum(len(a["truth"]) for a, _ in loaded.values()))
    for method, row in rows.items():
        matches = [facts[method]["lesions"] for _, facts in loaded.values() if "lesions" in facts.get(method, {})]
        if matches and len(matches) == len(loaded):  # every case scored lesion by lesion on its input grid
            row["lesion_detection"] = lesion_detection_summary([LesionMatch.from_dict(m) for m in matches])
        row["undefined"] = undefined_reasons(row)
    atomic_write_json(results_dir / "summary.json", rows)
    atomic_write_text(results_dir / "summary.md", summary_markdown(rows) + undefined_note(rows))
    return rows


def threshold_direction(loaded: dict[str, tuple[dict, dict]], method: str) -> str:
    """The oracle threshold's direction the evaluator recorded from the map channels' sequences (see
    :func:`~anofpdm_monai.baselines.lesion_polarity`); "best" for case files that record none or disagree."""
    found = {facts.get(method, {}).get("direction", "best") for _, facts in loaded.values()}
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
    """The oracle threshold's row of a cohort without lesion voxels: every metric undefined (kept, not dropped)."""
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


# --------------------------------------------------------------------------------------------
# The cohort loop of ``anofpdm evaluate`` (and ``anofpdm demo``)
# --------------------------------------------------------------------------------------------

# Settings that change a case's file (cases/<id>.npz); resume reuses files only when these and the model match.
CONTINUATION_KEYS = ("input", "split", "methods", "max_slices", "seed", "steps", "stride", "precision", "calibrations",
                     "tune", "tune_slices", "val_data")  # fmt: skip


@dataclass(frozen=True)
class EvaluationSettings:
    """What one evaluation run chooses besides the inference settings.

    Attributes:
        methods: registered method names; None: every AnoFPDM method the model folder can run and the oracle threshold
            (:func:`~anofpdm_monai.model.available_methods`; the reconstruction baselines, which tune on pixel labels
            and cost many network calls per slice, run when named);
            ``("all",)``: every registered method, each one the folder cannot run skipped with one line saying why.
        split: the store split to evaluate (stores only).
        max_slices: evaluate a seeded subset of this many slices (stores only); None: every slice.
        val_data: a store whose ``val`` split tunes the pixel-label baselines; None: the evaluated store's own.
        tune: ``{method: {hyperparameter: candidates}}`` replacing those of the methods' default grids.
        tune_slices: validation slices (a seeded sample) the baselines are tuned on.
        resume: reuse the case files of an earlier run with the same model and settings (``--continue``).
        num_parts, part_id: evaluate only part ``part_id`` of the cohort's round-robin parts.
        parts_from: where the part comes from: ``args`` (``num_parts``, ``part_id``), ``torchrun`` (one part per
            rank) or ``slurm`` (one per array task); see :func:`~anofpdm_monai.distributed.resolve_parts`.
        report: also write the cohort report ``RESULTS/report/index.html``.
    """

    methods: tuple[str, ...] | None = None
    split: str = "test"
    max_slices: int | None = None
    val_data: str | Path | None = None
    tune: Mapping[str, Mapping[str, Sequence]] = dataclasses.field(default_factory=dict)
    tune_slices: int = DEFAULT_TUNING_SLICES
    resume: bool = False
    num_parts: int = 1
    part_id: int = 0
    parts_from: str = "args"
    report: bool = False


@dataclass
class EvaluationOutcome:
    """What :func:`evaluate_cohort` did.

    Attributes:
        results_dir: the results folder.
        methods: the methods run (requested ones that could not run are in ``skipped``).
        skipped: ``{method: why}``, one line each.
        expected: the cases of the run (all parts).
        done: the cases with a case file.
        failed: ``{case: error}`` of this process's failed cases.
        summary: the Table-1 rows (``summary.json``), or None while other parts are unfinished (the last part to
            finish writes the tables).
        tuning: each tuned method's :class:`~anofpdm_monai.tuning.TuningResult`.
    """

    results_dir: Path
    methods: list[str]
    skipped: dict[str, str]
    expected: list[str]
    done: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, Exception] = dataclasses.field(default_factory=dict)
    summary: dict | None = None
    tuning: dict[str, TuningResult] = dataclasses.field(default_factory=dict)


# A run's seconds per second of its network calls, for the plan's estimate: loading, decisions and writing on top of
# the network (docs/evaluate.md gives the ratio measured; each run's last line shows the time taken against the plan).
PLAN_OVERHEAD = 1.5


@dataclass
class RunPlan:
    """What an evaluate run will do, said in one line before its cases start, with an estimate of how long.

    Attributes:
        cases: the cases this process evaluates.
        slices: their slices (None for a raw cohort: known once each case is preprocessed).
        methods: the methods that run.
        inputs_per_slice: network inputs per slice of the AnoFPDM forward processes (2 ceil(N / k) per encoding).
        seconds_per_input: one network input's seconds, timed on this machine before the run.
        not_estimated: methods whose cost is not known ahead (the reconstruction baselines: their calls depend on
            their tuned hyperparameters); the estimate after the first case includes them.
    """

    cases: int
    slices: int | None
    methods: list[str]
    inputs_per_slice: int
    seconds_per_input: float
    not_estimated: list[str]

    @classmethod
    def measure(cls, evaluator: CohortEvaluator, cases: int, slices: int | None) -> RunPlan:
        """The plan of ``evaluator`` on ``cases`` cases, the network timed with one call (after a warm-up one) of the
        run's batch shape (2 x batch size inputs)."""
        inferers = list(evaluator.slice_inferers.values())
        inputs = sum(2 * len(visited_timesteps(i.steps, i.stride)) for i in inferers)
        seconds = 0.0
        if inferers:
            net = evaluator.model.config.network
            shape = (2 * evaluator.settings.batch_size, net.in_channels, net.image_size, net.image_size)
            time_call(inferers[0].predict_eps, shape, evaluator.model.device)  # warm-up
            seconds = time_call(inferers[0].predict_eps, shape, evaluator.model.device) / shape[0]
        not_estimated = [m for m, e in evaluator.entries.items() if isinstance(e, ReconstructionMethod)]
        return cls(cases, slices, list(evaluator.methods), inputs, seconds, not_estimated)

    @property
    def estimate(self) -> float | None:
        """Seconds the run should take (without the methods in ``not_estimated``); None when the slices are unknown."""
        if self.slices is None:
            return None
        return PLAN_OVERHEAD * self.slices * self.inputs_per_slice * self.seconds_per_input

    def line(self) -> str:
        slices = "slices counted as each is preprocessed" if self.slices is None else f"{self.slices} slices"
        text = f"plan: {self.cases} case(s), {slices}; methods {', '.join(self.methods)}"
        if self.inputs_per_slice:
            text += f"; {self.inputs_per_slice} network inputs per slice at {self.seconds_per_input * 1000:.1f} ms each (timed now)"
        if self.estimate is not None:
            text += f"; estimated {duration(self.estimate)}"
            if self.not_estimated:
                text += f" plus {', '.join(self.not_estimated)}"
        if self.cases > 1:
            text += "; re-estimated after the first case"
        return text


def duration(seconds: float) -> str:
    """``seconds`` as people read it: ``42 s``, ``3.5 min``, ``1.2 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def slice_subset(cohort: Cohort, max_slices: int | None, seed: int) -> dict[str, np.ndarray] | None:
    """A fixed, seeded subset of at most ``max_slices`` slices over the cohort (stores only)."""
    if max_slices is None:
        return None
    if cohort.store is None:
        raise InputError("max_slices needs a preprocessed store as the input (raw cohorts are evaluated whole)", arguments="max_slices")
    rows = cohort.rows
    if len(rows) > max_slices:
        rows = rows.sample(n=max_slices, random_state=seed)
    return {p: g["slice"].to_numpy() for p, g in rows.groupby("patient")}


def tune_methods(
    model: AnoFPDMModel,
    settings: InferenceSettings,
    contexts: Mapping[str, MethodContext],
    evaluation: EvaluationSettings,
    source: str | Path | None,
    results_dir: Path,
    progress: bool = True,
) -> tuple[dict[str, TuningResult], dict[str, str]]:
    """Tune every reconstruction method of ``contexts`` on ``source``'s validation slices, cached per method in
    ``RESULTS/tuning/NAME.json`` (reused only when tuned with the same weights, components, data, grid and sample);
    ``progress``: a progress bar over each method's tuning.

    Returns:
        ``(tuned, skipped)``: the tunings, and ``{method: why}`` for those that could not be tuned.
    """
    log = get_logger()
    tuned, skipped = {}, {}
    if not contexts:
        return tuned, skipped
    if source is None:
        for name in contexts:
            skipped[name] = f"{name} skipped: its threshold is tuned on validation pixel labels; give val_data (a store with a val split)"
        return tuned, skipped
    store, sample = PreprocessedStore(source), None
    for name, context in contexts.items():
        method = get_method(name)
        grid = method.tuning_grid(context, evaluation.tune.get(name))
        key = cache_key(method, context, grid, str(Path(source).resolve()), evaluation.tune_slices, settings.seed)
        path = results_dir / TUNING_FOLDER / f"{name}.json"
        result = cached_tuning(path, key)
        if result is None:
            if sample is None:
                images, masks, patients, slices = validation_sample(store, evaluation.tune_slices, settings.seed)
                seeds = [slice_seeds(settings.seed, p, [s])[0] for p, s in zip(patients, slices)]
                sample = images, masks, seeds
            points = int(np.prod([len(v) for v in grid.values()]))
            log.info(f"{name}: tuning {points} grid point(s) of {sorted(grid)} on {len(sample[0])} validation slices (pixel labels)")
            try:
                result = tune(method, context, *sample, grid, progress=progress)
            except InputError as err:
                skipped[name] = f"{name} skipped: {err}"
                continue
            save_tuning(path, key, result)
        tuned[name] = result
    return tuned, skipped


def make_results_folder(results_dir: str | Path) -> Path:
    """Create ``RESULTS/cases/``; an InputError naming ``results_dir`` when it cannot be written."""
    results = Path(results_dir)
    try:
        (results / "cases").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{results}: cannot create the results folder ({err.strerror}); choose a writable results_dir", arguments="results_dir") from err
    return results


def evaluate_cohort(
    model: AnoFPDMModel,
    source: str | Path,
    results_dir: str | Path,
    settings: InferenceSettings | None = None,
    evaluation: EvaluationSettings | None = None,
    *,
    outputs_dir: str | Path | None = None,
    record: Callable[[dict], dict] | None = None,
    on_error: Callable[[str, Exception], None] | None = None,
    progress: bool = True,
) -> EvaluationOutcome:
    """Evaluate a cohort: every method on every case, per-case files, then the tables and the Table-1 summary.

    The cohort loop of ``anofpdm evaluate`` (the shape of :func:`~anofpdm_monai.api.segment_records`):
    methods that cannot run are skipped with one line each (a missing component, no validation data to
    tune on); reconstruction methods are tuned first (:func:`tune_methods`); a case that fails is
    reported to ``on_error`` and the others go on; with ``evaluation.resume`` finished cases are kept
    (only from a run with the same model and settings, each case's recorded in ``cases/CASE.json``); the
    results folder is made once the model and the input were checked, and one run writes it at a time
    (``RESULTS/anofpdm.lock``; the parts of a sharded run together). Each part of a sharded run (``torchrun``
    ranks, SLURM array tasks, ``num_parts``) evaluates its cases, keeps its own ``run.part-K-of-N.json`` and
    ``evaluate.part-K-of-N.log``, and the last part to finish writes the tables and ``run.json``
    (:func:`~anofpdm_monai.outputs.finish_part`; no process group is needed).

    Args:
        model: the loaded model.
        source: a preprocessed store (its ``evaluation.split``) or a raw cohort folder with lesion files.
        results_dir: the results folder (``cases/``, ``slices.csv``, ``cases.csv``, ``summary.json``/``.md``, ``run.json``).
        settings: N, k, batch size, seed, precision (``settings.method`` is not used).
        evaluation: methods, split, sample, tuning, resume, parts.
        outputs_dir: also write the first AnoFPDM method's mask and map NIfTI files of raw-cohort cases there.
        record: ``(resolved settings) -> run record`` (the CLI adds its flags); default: the library's record.
        on_error: called with ``(case id, error)`` for each failed case; default: logs it.
        progress: a progress bar over the cases.

    Raises:
        InputError: the results folder cannot be written or another run holds it, a method is unknown, the
            settings do not fit the results folder's earlier run or one of its cases (resume), ``outputs_dir``
            would overwrite an input, or no case could be evaluated.
    """
    from tqdm.auto import tqdm

    settings = settings or InferenceSettings()
    evaluation = evaluation or EvaluationSettings()
    results = Path(results_dir)
    log = get_logger()
    num_parts, part_id = resolve_parts(evaluation.num_parts, evaluation.part_id, parts_from=evaluation.parts_from)
    part = (part_id, num_parts)
    registry = all_methods()
    if evaluation.methods == ("all",):  # every registered method: those the folder cannot run are skipped with one line each
        requested = list(registry)
    else:
        # default: the label-free methods and the oracle threshold; the costly pixel-label baselines run when named (or all)
        default = available_methods(model.folder, kinds=("anofpdm", "threshold"))
        requested = list(default if evaluation.methods is None else evaluation.methods)
    unknown = [m for m in requested if m not in registry]
    if unknown:
        raise InputError(f"methods: unknown {unknown}; choose from {list(registry)}", arguments="methods")
    with warnings.catch_warnings():  # the input is checked before the results folder exists; the inferer's warnings
        warnings.simplefilter("ignore")  # (e.g. settings other than the calibration's) come below, into its log too
        cohort = Cohort(source, VolumeInferer(model, settings), evaluation.split)
    if outputs_dir is not None and cohort.store is None:
        check_segment_outputs(list(cohort.records.values()), outputs_dir, argument="outputs_dir")
    make_results_folder(results)  # once the model and the input were checked: a refused run leaves no folder behind
    lock_folder(results, "evaluate", part)
    log_to_file(results, "evaluate", part)
    inferer = cohort.inferer = VolumeInferer(model, settings)
    contexts, skipped = {}, {}
    for name in requested:
        method = registry[name]
        if isinstance(method, ReconstructionMethod):
            try:
                contexts[name] = MethodContext(model, settings, method.load_components(model, model.device))
            except ComponentMissing as err:
                skipped[name] = str(err)
    val_source = evaluation.val_data or (source if cohort.store is not None else None)
    tuned, not_tuned = tune_methods(model, settings, contexts, evaluation, val_source, results, progress)
    skipped.update(not_tuned)
    for line in skipped.values():
        log.warning(line)
    methods = [m for m in requested if m not in skipped]
    evaluator = CohortEvaluator(inferer, methods, results, tuned=tuned, contexts=contexts, outputs_dir=outputs_dir)
    resolved = resolved_settings(evaluator, source, evaluation, requested, tuned)
    run = record(resolved) if record is not None else run_record("evaluate", None, resolved, model.folder)
    keep = slice_subset(cohort, evaluation.max_slices, settings.seed)
    # cases that max_slices leaves without a slice are not part of the run (they would never get a file)
    expected = [c for c in cohort.case_ids if keep is None or len(keep.get(c, ())) > 0]
    mine = shard(expected, num_parts, part_id)
    if evaluation.resume and any((results / "cases").glob("*.npz")):
        # finished cases are reused only from the same run (this part's record, or the merged run.json)
        check_continuation(results, run, CONTINUATION_KEYS, continuation_record(results, part))
        for case_id in mine:  # and each only if it was made with these settings (cases/CASE.json)
            finished(evaluator.case_record_file(case_id), run, CONTINUATION_KEYS, evaluator.case_file(case_id))
    start_part(results, run, part, CONTINUATION_KEYS)  # run.json, or run.part-K-of-N.json for one part
    outcome = EvaluationOutcome(results, methods, skipped, expected, tuning=tuned)
    report_error = on_error or (lambda case_id, err: log.error(f"{case_id}: {err}"))
    todo = [c for c in mine if not (evaluation.resume and finished(evaluator.case_record_file(c), run, CONTINUATION_KEYS, evaluator.case_file(c)))]
    plan = RunPlan.measure(evaluator, len(todo), None if cohort.store is None else planned_slices(cohort, todo, keep))
    log.info(plan.line())
    started, first_done = time.perf_counter(), False
    desc = f"evaluate {part_id + 1}/{num_parts}" if num_parts > 1 else "evaluate"
    for case_id in tqdm(todo, desc=desc, unit="case", disable=not progress):
        try:
            case = select_slices(cohort.load(case_id), None if keep is None else keep[case_id])
            if len(case.slice_indices) == 0:
                continue
            with case_record(evaluator.case_record_file(case_id), run):  # cases/CASE.json: the settings, written last
                evaluator.evaluate_case(case)
        except (InputError, OSError) as err:
            outcome.failed[case_id] = err
            report_error(case_id, err)
            continue
        if not first_done and len(todo) > 1:
            first_done, seconds = True, time.perf_counter() - started
            log.info(f"the first case took {duration(seconds)}: about {duration(seconds * (len(todo) - 1))} for the other {len(todo) - 1}")
    if todo:
        took = time.perf_counter() - started
        log.info(f"{len(todo)} case(s) evaluated in {duration(took)}" + (f" (planned {duration(plan.estimate)})" if plan.estimate else ""))

    def merge() -> None:  # by the last part to finish (or the whole run)
        outcome.done = [c for c in expected if evaluator.case_file(c).is_file()]
        if not outcome.done:
            raise InputError(f"{source}: no case could be evaluated")
        outcome.summary = merge_results(results, outcome.done, methods)
        if evaluation.report:
            from anofpdm_monai.report import write_report

            log.info(f"report: {write_report(results, model_dir=model.folder)}")

    if not finish_part(results, run, part, merge, counts={"cases": len(mine), "failed": len(outcome.failed)}):
        outcome.done = [c for c in expected if evaluator.case_file(c).is_file()]
        log.info(f"{len(outcome.done)} of {len(expected)} cases done; the summary is written when every part has finished")
    return outcome


def planned_slices(cohort: Cohort, case_ids: Sequence[str], keep: Mapping[str, np.ndarray] | None) -> int:
    """The slices of a store's ``case_ids`` the run evaluates (``keep``: the max_slices subset, None: all)."""
    if keep is not None:
        return int(sum(len(keep.get(c, ())) for c in case_ids))
    return int(cohort.rows["patient"].isin(list(case_ids)).sum())


def resolved_settings(evaluator: CohortEvaluator, source: str | Path, evaluation: EvaluationSettings, methods: list[str],
                      tuned: Mapping[str, TuningResult]) -> dict:  # fmt: skip
    """What the run resolved, for run.json: paths, methods, device, each encoding's N, k, w, thr_01, D, and the tunings."""
    calibrations = {encoding: inference_settings(inferer) for encoding, inferer in evaluator.slice_inferers.items()}
    precisions = {c["precision"] for c in calibrations.values()} or {inference_settings(evaluator.inferer.slice_inferer)["precision"]}
    settings = evaluator.settings
    return {
        "input": Path(source).resolve(), "model": evaluator.model.folder, "methods": list(methods), "split": evaluation.split,
        "max_slices": evaluation.max_slices, "seed": settings.seed, "steps": settings.steps, "stride": settings.stride,
        "batch_size": settings.batch_size, "device": str(evaluator.model.device), "precision": precisions.pop(),
        "calibrations": calibrations, "val_data": None if evaluation.val_data is None else Path(evaluation.val_data).resolve(),
        "tune": {k: {p: list(v) for p, v in g.items()} for k, g in evaluation.tune.items()}, "tune_slices": evaluation.tune_slices,
        "tuning": {name: {setup: dataclasses.asdict(t) for setup, t in result.setups.items()} for name, result in tuned.items()},
    }  # fmt: skip
