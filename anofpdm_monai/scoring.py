"""Scoring saved masks against label files on their own voxel grid (``anofpdm score``).

The analogue of nnU-Net's ``evaluate_folder``: predictions ``PRED_DIR/CASE.nii.gz`` (from
``anofpdm segment``, ``anofpdm evaluate`` or any other tool) are paired with the label files of a
cohort and scored per case. Every mask is binarised (voxels > 0 are lesion), whatever its data
type. Definitions (docs/score.md says the same):

* **DICE**: :func:`anofpdm_monai.metrics.volume_dice` over all voxels, the function ``anofpdm
  evaluate`` uses for its native-grid ``dice_3d_native``; 1 when both masks are empty.
* **HD95** (mm): MONAI's symmetric 95th-percentile Hausdorff distance between the surface voxels
  of the two masks, with the voxel spacing of the affine: the larger of the 95th percentiles of
  prediction-to-label and label-to-prediction distances. 0 when both masks are empty; undefined
  (NaN in the CSV, null in JSON) when exactly one is empty.
* **Lesion-wise detection**: 26-connected components of label and prediction. A true lesion is
  detected (TP) when it shares a voxel with a predicted component, else missed (FN); a predicted
  component that shares no voxel with any true lesion is a false positive (FP). Lesion-wise
  F1 = TP / (TP + (FN + FP) / 2); 1 when there is neither a true lesion nor a predicted component.
* **Volumes** in ml: voxel count times the voxel volume ``|det(affine[:3, :3])|``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from anofpdm_monai.io import (
    InputError,
    InputWarning,
    atomic_save_dataframe,
    atomic_write_json,
    check_case_id,
    check_label_values,
    load_nifti,
)
from anofpdm_monai.metrics import volume_dice
from anofpdm_monai.readers import detect_layout, read_cases

AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference between the affine entries of a prediction and its label (mm) still taken as one grid."""

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ANOMALY_SUFFIX = "_anomaly"  # anofpdm's anomaly maps beside the masks: not predictions

CASE_COLUMNS = ("case", "dice", "hd95_mm", "true_lesions", "pred_lesions", "tp", "fn", "fp", "lesion_f1",
                "true_ml", "pred_ml", "prediction_missing", "prediction", "label")  # fmt: skip
"""Columns of ``per_case.csv``, in order."""

UNDEFINED_HD95 = "exactly one of prediction and label is empty: no surface distance exists"


@dataclass(frozen=True)
class MaskPair:
    """One case to score: its label file and its prediction file (None: missing, scored as empty)."""

    case_id: str
    prediction: Path | None
    label: Path


@dataclass(frozen=True)
class LesionCounts:
    """Lesion-wise detection of one case (26-connected components)."""

    true_lesions: int
    pred_lesions: int
    tp: int
    fn: int
    fp: int

    @property
    def f1(self) -> float:
        """TP / (TP + (FN + FP) / 2); 1.0 when there is no true lesion and no predicted component."""
        return lesion_f1(self.tp, self.fn, self.fp)


# ---------------------------------------------------------------------------
# Reading masks
# ---------------------------------------------------------------------------


def read_mask(path: str | Path, label: bool = False) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A mask NIfTI of any integer or float type, binarised.

    Args:
        path: ``.nii`` or ``.nii.gz`` file (3-D, or 4-D with a last axis of length 1).

    Returns:
        ``(mask, image)``: (X, Y, Z) bool, True where the voxel value is > 0, and the nibabel image
        (header and affine).

    Raises:
        InputError: the file is missing, unreadable, not 3-D, or holds NaN or infinite voxels; with ``label``,
            values that are negative or not whole numbers (a probability map).
    """
    with warnings.catch_warnings():  # an all-lesion mask is constant: fine for a mask, unlike an image
        warnings.simplefilter("ignore", InputWarning)
        data, image = load_nifti(path)
    if label:  # a label holds whole non-negative numbers, as preprocess demands (a prediction may be any map)
        check_label_values(path, data)
    return data > 0, image


def check_same_grid(prediction: Path, pred_image: nib.Nifti1Image, label: Path, label_image: nib.Nifti1Image) -> None:
    """Refuse a prediction that is not on its label's voxel grid (shape, and affine within :data:`AFFINE_TOLERANCE_MM`)."""
    pred_shape, label_shape = tuple(pred_image.shape[:3]), tuple(label_image.shape[:3])
    fix = "write the prediction on the label's grid (anofpdm segment keeps its input's grid) or resample it first"
    if pred_shape != label_shape:
        raise InputError(f"{prediction}: shape {pred_shape} differs from its label {label} {label_shape}; {fix}")
    gap = float(np.max(np.abs(pred_image.affine - label_image.affine)))
    if not gap <= AFFINE_TOLERANCE_MM:
        raise InputError(
            f"{prediction}: affine differs from its label {label}'s by up to {gap:.4g} mm (tolerance "
            f"{AFFINE_TOLERANCE_MM} mm); {fix}"
        )


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """(3,) voxel sizes in mm along the array axes: the norms of the affine's first three columns."""
    return np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))


def voxel_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in ml: ``|det(affine[:3, :3])| / 1000``."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])) / 1000.0)


# ---------------------------------------------------------------------------
# Metrics of one case
# ---------------------------------------------------------------------------


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (MONAI's ``compute_hausdorff_distance``).

    Args:
        pred: (X, Y, Z) bool predicted mask.
        truth: (X, Y, Z) bool label mask.
        spacing: (3,) voxel sizes in mm along X, Y, Z (:func:`voxel_spacing`).

    Returns:
        max(P95 of prediction-to-label surface distances, P95 of label-to-prediction ones), in mm;
        0.0 when both masks are empty, NaN when exactly one is.
    """
    from monai.metrics import compute_hausdorff_distance

    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"pred and truth must be (X, Y, Z) of one shape, got {pred.shape} and {truth.shape}")
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return 0.0
    if has_pred != has_truth:
        return math.nan
    with warnings.catch_warnings():  # MONAI 1.5+ warns about an argument it passes itself
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        distance = compute_hausdorff_distance(
            pred[None, None], truth[None, None], include_background=True, percentile=95,
            spacing=[float(s) for s in spacing],
        )  # fmt: skip
    return float(distance[0, 0])


def lesion_f1(tp: int, fn: int, fp: int) -> float:
    """Lesion-wise F1 = TP / (TP + (FN + FP) / 2); 1.0 when all three counts are 0."""
    if tp + fn + fp == 0:
        return 1.0
    return tp / (tp + 0.5 * (fn + fp))


CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def lesion_detection(pred: np.ndarray, truth: np.ndarray) -> LesionCounts:
    """Lesion-wise counts of one case from the 26-connected components of both masks.

    Args:
        pred: (X, Y, Z) bool predicted mask.
        truth: (X, Y, Z) bool label mask.

    Returns:
        :class:`LesionCounts`: a true lesion sharing a voxel with the prediction is a TP, else a
        FN; a predicted component sharing no voxel with the label is a FP.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth must have one shape, got {pred.shape} and {truth.shape}")
    true_labels, n_true = ndimage.label(truth, structure=CONNECTIVITY_26)
    pred_labels, n_pred = ndimage.label(pred, structure=CONNECTIVITY_26)
    detected = np.unique(true_labels[pred & truth])  # true components touched by the prediction
    touching = np.unique(pred_labels[pred & truth])  # predicted components touching the label
    tp = int(np.count_nonzero(detected))
    return LesionCounts(n_true, n_pred, tp=tp, fn=n_true - tp, fp=n_pred - int(np.count_nonzero(touching)))


def score_case(pred: np.ndarray, truth: np.ndarray, affine: np.ndarray) -> dict[str, float | int]:
    """Every per-case metric of one (prediction, label) pair on one grid.

    Args:
        pred: (X, Y, Z) bool predicted mask.
        truth: (X, Y, Z) bool label mask.
        affine: (4, 4) voxel-to-world affine of the grid (mm).

    Returns:
        ``{dice, hd95_mm, true_lesions, pred_lesions, tp, fn, fp, lesion_f1, true_ml, pred_ml}``.
    """
    counts = lesion_detection(pred, truth)
    ml = voxel_ml(affine)
    return {
        "dice": volume_dice(pred, truth),
        "hd95_mm": hd95(pred, truth, voxel_spacing(affine)),
        "true_lesions": counts.true_lesions, "pred_lesions": counts.pred_lesions,
        "tp": counts.tp, "fn": counts.fn, "fp": counts.fp, "lesion_f1": counts.f1,
        "true_ml": int(truth.sum()) * ml, "pred_ml": int(pred.sum()) * ml,
    }  # fmt: skip


def score_pair(pair: MaskPair) -> dict:
    """Read, check and score one pair: a ``per_case.csv`` row (columns :data:`CASE_COLUMNS`)."""
    truth, label_image = read_mask(pair.label, label=True)
    if pair.prediction is None:
        pred = np.zeros_like(truth)
    else:
        pred, pred_image = read_mask(pair.prediction)
        check_same_grid(pair.prediction, pred_image, pair.label, label_image)
    row = {"case": pair.case_id, **score_case(pred, truth, label_image.affine)}
    row.update(prediction_missing=pair.prediction is None, prediction=str(pair.prediction or ""), label=str(pair.label))
    return row


# ---------------------------------------------------------------------------
# Pairing files
# ---------------------------------------------------------------------------


def nifti_case_id(path: Path) -> str | None:
    """The case id of ``CASE.nii.gz`` / ``CASE.nii`` (None for other files and hidden temporaries)."""
    if path.name.startswith(".") or not path.is_file():
        return None
    suffix = next((s for s in NIFTI_SUFFIXES if path.name.endswith(s)), None)
    return None if suffix is None else path.name[: -len(suffix)]


def case_files(folder: Path, what: str, skip_anomaly: bool) -> dict[str, Path]:
    """``{case: file}`` of a folder of ``CASE.nii.gz`` files (``CASE_anomaly`` maps skipped when asked)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        case = nifti_case_id(path)
        if case is None or (skip_anomaly and case.endswith(ANOMALY_SUFFIX)):
            continue
        check_case_id(case, path, "rename the file")
        if case in found:
            raise InputError(f"{path}: {what} {case!r} given twice ({found[case]} and {path}); keep one of them")
        found[case] = path
    return found


def label_files(labels: str | Path) -> dict[str, Path]:
    """``{case: label file}`` of ``-l``: a cohort in a layout ``preprocess`` reads, or a folder of ``CASE.nii.gz``.

    A BraTS21 or ATLAS v2.0 cohort and a manifest CSV are read by their reader, an nnU-Net dataset
    (a folder with ``imagesTr``/``imagesTs``, or the images folder itself) by its reader; cases
    without a lesion file are left out. Any other folder is read as ``CASE.nii.gz`` label files.
    """
    root = Path(labels)
    if not root.exists():
        raise InputError(f"{root}: labels not found; give a cohort folder, a manifest CSV or a folder of CASE.nii.gz labels")
    layout = detect_layout(root)
    nnunet_dataset = any((root / d).is_dir() for d in ("imagesTr", "imagesTs")) or root.name.startswith("images")
    if layout is not None and (layout != "nnunet" or nnunet_dataset):
        return {r.case_id: r.label for r in read_cases(root, layout) if r.label is not None}
    if not root.is_dir():
        raise InputError(f"{root}: not a folder or a manifest CSV; give the labels folder or the cohort")
    return case_files(root, "label of case", skip_anomaly=False)


def pair_masks(predictions: str | Path, labels: str | Path, missing_as_empty: bool = False) -> list[MaskPair]:
    """Pair every prediction ``PRED_DIR/CASE.nii.gz`` with its label file.

    Args:
        predictions: folder of ``CASE.nii.gz`` masks (``CASE_anomaly.nii.gz`` maps are ignored).
        labels: see :func:`label_files`.
        missing_as_empty: a labelled case without a prediction is scored as an empty prediction
            (flagged ``prediction_missing``); False refuses it (an InputError).

    Returns:
        One :class:`MaskPair` per labelled case, sorted by case id.

    Raises:
        InputError: a prediction without a label, a labelled case without a prediction (unless
            ``missing_as_empty``), or nothing to score.
    """
    pred_dir = Path(predictions)
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: predictions folder not found; give the folder holding CASE.nii.gz masks")
    if Path(labels).resolve() == pred_dir.resolve():
        raise InputError(f"{pred_dir}: the predictions and the labels are the same folder, so every case would score "
                         "100 against itself; give the folder of the ground-truth labels as the labels")  # fmt: skip
    preds = case_files(pred_dir, "prediction of case", skip_anomaly=True)
    truths = label_files(labels)
    orphans = sorted(set(preds) - set(truths))
    if orphans:
        raise InputError(
            f"{preds[orphans[0]]}: no label file for case {orphans[0]!r} in {labels} ({len(orphans)} such prediction(s)); "
            "give labels that cover every predicted case, or move the unlabelled predictions out of the predictions folder"
        )
    unpredicted = sorted(set(truths) - set(preds))
    if unpredicted and not missing_as_empty:
        raise InputError(
            f"{pred_dir / (unpredicted[0] + '.nii.gz')}: no prediction for labelled case {unpredicted[0]!r} "
            f"({len(unpredicted)} labelled case(s) without one); segment them, or score them as empty predictions "
            "with missing_as_empty",
            arguments="missing_as_empty",
        )
    if not truths:
        raise InputError(f"{labels}: no label files found; give a cohort with lesion files or a folder of CASE.nii.gz labels")
    return [MaskPair(case, preds.get(case), truths[case]) for case in sorted(truths)]


# ---------------------------------------------------------------------------
# A folder of predictions
# ---------------------------------------------------------------------------


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else math.nan


def summarise_cases(per_case: pd.DataFrame) -> dict:
    """``summary.json``'s content from the ``per_case.csv`` table.

    Means over cases (HD95 over the cases where it is defined, with their count), the lesion counts
    pooled over the cohort with their F1, and the mean volumes.
    """
    tp, fn, fp = (int(per_case[k].sum()) for k in ("tp", "fn", "fp"))
    summary = {
        "n_cases": len(per_case),
        "n_missing_predictions": int(per_case["prediction_missing"].sum()),
        "mean": {
            "dice": _mean(per_case["dice"]),
            "hd95_mm": _mean(per_case["hd95_mm"]),
            "lesion_f1": _mean(per_case["lesion_f1"]),
            "true_ml": _mean(per_case["true_ml"]),
            "pred_ml": _mean(per_case["pred_ml"]),
        },
        "n_hd95_defined": int(per_case["hd95_mm"].notna().sum()),
        "pooled_lesions": {
            "true_lesions": int(per_case["true_lesions"].sum()), "pred_lesions": int(per_case["pred_lesions"].sum()),
            "tp": tp, "fn": fn, "fp": fp, "lesion_f1": lesion_f1(tp, fn, fp),
        },
    }  # fmt: skip
    if summary["n_hd95_defined"] < len(per_case):
        summary["undefined"] = {"hd95_mm": f"{len(per_case) - summary['n_hd95_defined']} case(s): {UNDEFINED_HD95}"}
    return summary


def score_folder(
    predictions: str | Path, labels: str | Path, output: str | Path, missing_as_empty: bool = False
) -> tuple[pd.DataFrame, dict]:
    """Score every prediction of ``predictions`` against ``labels``; write ``per_case.csv`` and ``summary.json``.

    Args:
        predictions, labels, missing_as_empty: as for :func:`pair_masks`.
        output: output folder (created); both files are written atomically, the JSON strict.

    Returns:
        ``(per_case, summary)``: the table (columns :data:`CASE_COLUMNS`) and the summary dict.
    """
    pairs = pair_masks(predictions, labels, missing_as_empty)
    per_case = pd.DataFrame([score_pair(pair) for pair in pairs], columns=list(CASE_COLUMNS))
    summary = summarise_cases(per_case)
    summary["per_case"] = per_case.drop(columns=["prediction", "label"]).to_dict(orient="records")
    out_dir = Path(output)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{out_dir}: cannot create the folder ({err.strerror}); choose a writable output", arguments="output") from err
    atomic_save_dataframe(per_case, out_dir / "per_case.csv")
    atomic_write_json(out_dir / "summary.json", summary)
    return per_case, summary


MAX_PRINTED_CASES = 20


def score_table(per_case: pd.DataFrame, summary: dict) -> str:
    """A short text table: one line per case (up to :data:`MAX_PRINTED_CASES`) and the cohort line."""

    def cell(value: float, spec: str) -> str:
        undefined = value is None or (isinstance(value, float) and math.isnan(value))
        return format("-", f">{spec.split('.')[0]}") if undefined else format(value, spec)

    width = max(8, *(len(str(c)) for c in per_case["case"].head(MAX_PRINTED_CASES)))
    header = f"{'case':<{width}} {'DICE %':>7} {'HD95 mm':>8} {'TP':>4} {'FN':>4} {'FP':>4} {'F1 %':>6} {'true ml':>8} {'pred ml':>8}"
    lines = [header, "-" * len(header)]
    for row in per_case.head(MAX_PRINTED_CASES).itertuples(index=False):
        mark = " (no prediction: scored empty)" if row.prediction_missing else ""
        lines.append(
            f"{row.case:<{width}} {cell(100 * row.dice, '7.1f')} {cell(row.hd95_mm, '8.2f')} {row.tp:>4} {row.fn:>4} "
            f"{row.fp:>4} {cell(100 * row.lesion_f1, '6.1f')} {cell(row.true_ml, '8.2f')} {cell(row.pred_ml, '8.2f')}{mark}"
        )
    if len(per_case) > MAX_PRINTED_CASES:
        lines.append(f"... {len(per_case) - MAX_PRINTED_CASES} more case(s) in per_case.csv")
    mean, pooled = summary["mean"], summary["pooled_lesions"]
    lines.append("-" * len(header))
    lines.append(
        f"{'cohort':<{width}} {cell(100 * mean['dice'], '7.1f')} {cell(mean['hd95_mm'], '8.2f')} {pooled['tp']:>4} "
        f"{pooled['fn']:>4} {pooled['fp']:>4} {cell(100 * pooled['lesion_f1'], '6.1f')} {cell(mean['true_ml'], '8.2f')} "
        f"{cell(mean['pred_ml'], '8.2f')}"
    )
    lines.append(f"(cohort: DICE, HD95 and volumes are means over the {summary['n_cases']} cases, HD95 over the "
                 f"{summary['n_hd95_defined']} where it is defined; TP/FN/FP are sums and F1 is theirs)")  # fmt: skip
    return "\n".join(lines) + "\n"
