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

Those are the ``default`` convention's rules. :data:`CONVENTIONS` holds the rules of the challenges'
own scorers (ISLES'22, ATLAS R2.0, BraTS 2023 lesion-wise, BraTS 2025 / panoptica), written from
their published definitions: components, lesion matching, HD95, the value of an empty mask, the
lesion size filter and the cohort figure; docs/score.md has them side by side.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any
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
    check_same_grid,
    load_nifti,
    spacing_volume_mm3,
    voxel_volume_mm3,
)
from anofpdm_monai.metrics import volume_dice
from anofpdm_monai.provenance import write_run_record
from anofpdm_monai.readers import detect_layout, read_cases
from anofpdm_monai.segmentation import VOLUME_CONNECTIVITY, label_components

"""Largest difference between the affine entries of a prediction and its label (mm) still taken as one grid."""

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ANOMALY_SUFFIX = "_anomaly"  # anofpdm's anomaly maps beside the masks: not predictions

METRIC_COLUMNS = ("dice", "hd95_mm", "true_lesions", "pred_lesions", "tp", "fn", "fp", "lesion_f1", "lesion_dice",
                  "lesion_hd95_mm", "true_ml", "pred_ml", "abs_volume_diff_ml", "lesion_count_diff")  # fmt: skip
"""What :func:`score_case` returns for one case and one label set, in ``per_case.csv``'s order."""

CASE_COLUMNS = ("case", "region", *METRIC_COLUMNS, "prediction_missing", "prediction", "label")
"""Columns of ``per_case.csv``, in order (one row per case and label set)."""

MEAN_COLUMNS = ("dice", "hd95_mm", "lesion_f1", "lesion_dice", "lesion_hd95_mm", "true_ml", "pred_ml",
                "abs_volume_diff_ml", "lesion_count_diff")  # fmt: skip
"""The per-case figures the summary averages over cases (undefined ones left out, and counted)."""

ALL_LABELS = "lesion"
"""The region name of the default label set: every voxel > 0."""

UNDEFINED_HD95 = "exactly one of prediction and label is empty: no surface distance exists"


@dataclass(frozen=True)
class MaskPair:
    """One case to score: its label file and its prediction file (None: missing, scored as empty)."""

    case_id: str
    prediction: Path | None
    label: Path


@dataclass(frozen=True)
class Convention:
    """How one challenge's scorer turns a (prediction, label) pair into numbers (docs/score.md, the table).

    Attributes:
        name: the ``--convention`` value.
        connectivity: 26 (faces, edges, corners) or 6 (faces only) for the connected components.
        matching: ``"overlap"``: a true lesion is found when any predicted voxel touches it, a predicted
            component is false when it touches none (many-to-many; ISLES'22, ATLAS); ``"dilated"``: BraTS
            2023 (true lesions closer than the dilation merged into one, each matched to every predicted
            component within its dilation, lesions of at most ``min_lesion_mm3`` not scored);
            ``"bipartite"``: panoptica's one-to-one assignment maximising the summed DSC of overlapping
            pairs (BraTS 2025).
        hd95: ``"monai"`` (larger of the two directed 95th percentiles over surface voxels), ``"surfel"``
            (BraTS 2023: the larger of the two directed 95th percentiles over marching-cubes surface
            elements weighted by their area), ``"pooled"`` (panoptica / medpy: one 95th percentile over
            the distances of both directions pooled).
        empty_hd95_mm: HD95 when exactly one mask is empty, and of a missed or spurious lesion (NaN: undefined).
        both_empty: DICE and lesion F1 when both masks are empty (1.0, or NaN for panoptica: not scored).
        dilation: BraTS 2023's dilation of the true lesions (iterations of the 18-connected cross).
        min_lesion_mm3: true lesions of at most this volume are not scored (BraTS 2023 glioma: 50).
        cohort_f1: the lesion F1 the challenge reports for a cohort: ``"pooled"`` (from summed counts) or
            ``"case_mean"`` (the mean of per-case F1).
    """

    name: str
    connectivity: int
    matching: str
    hd95: str
    empty_hd95_mm: float
    both_empty: float
    dilation: int = 0
    min_lesion_mm3: float = 0.0
    cohort_f1: str = "case_mean"


CONVENTIONS: dict[str, Convention] = {
    c.name: c
    for c in (
        Convention("default", 26, "overlap", "monai", math.nan, 1.0, cohort_f1="pooled"),
        Convention("isles22", 26, "overlap", "monai", math.nan, 1.0),
        Convention("atlas", 6, "overlap", "monai", math.nan, 1.0),
        Convention("brats2023", 26, "dilated", "surfel", 374.0, 1.0, dilation=3, min_lesion_mm3=50.0),
        Convention("brats2025", 26, "bipartite", "pooled", 373.0, math.nan),
    )
}
"""The conventions ``anofpdm score --convention`` knows, by name."""


def get_convention(convention: str | Convention) -> Convention:
    """A :class:`Convention` from its name (or itself)."""
    if isinstance(convention, Convention):
        return convention
    if convention not in CONVENTIONS:
        raise InputError(f"convention={convention!r} is not one of {', '.join(CONVENTIONS)}", arguments="convention")
    return CONVENTIONS[convention]


@dataclass(frozen=True)
class LabelSet:
    """A region to score: the voxels whose label is one of ``labels`` (None: every voxel > 0)."""

    name: str
    labels: tuple[int, ...] | None = None

    def mask(self, data: np.ndarray) -> np.ndarray:
        """(X, Y, Z) bool mask of this region in a label map of the same shape."""
        return data > 0 if self.labels is None else np.isin(data, self.labels)


def parse_label_sets(specs: Sequence[str] | None) -> tuple[LabelSet, ...]:
    """Label sets from ``NAME=1,2,4`` or ``1,2,4`` texts (the name is then the text); none: every voxel > 0.

    Raises:
        InputError: a set that is empty, holds a non-integer or a label below 1, or a name given twice.
    """
    if not specs:
        return (LabelSet(ALL_LABELS),)
    sets: list[LabelSet] = []
    for spec in specs:
        name, _, values = spec.rpartition("=")
        name = name or values
        try:
            labels = tuple(sorted({int(v) for v in values.split(",")}))
        except ValueError:
            labels = ()
        if not labels or min(labels) < 1:
            raise InputError(
                f"label_sets={spec!r} is not a set of labels; write NAME=1,2,4 or 1,2,4 (integers of at least 1)",
                arguments="label_sets",
            )
        if any(s.name == name for s in sets):
            raise InputError(f"label_sets: the name {name!r} is given twice; give each set its own name", arguments="label_sets")
        sets.append(LabelSet(name, labels))
    return tuple(sets)


@dataclass(frozen=True)
class LesionCounts:
    """Lesion-wise detection of one case (connected components, any-overlap matching)."""

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


def read_label_map(path: str | Path, label: bool = False) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A label NIfTI as it is stored: ``(data, image)``, data (X, Y, Z) of the file's values (for ``--label-sets``).

    Args:
        label: the file is a ground-truth label: refuse values that are negative or not whole numbers.

    Raises:
        InputError: as for :func:`read_mask`.
    """
    with warnings.catch_warnings():  # a constant label map is fine
        warnings.simplefilter("ignore", InputWarning)
        data, image = load_nifti(path)
    if label:  # a label holds whole non-negative numbers, as preprocess demands (a prediction may be any map)
        check_label_values(path, data)
    return data, image


def check_prediction_grid(prediction: Path, pred_image: nib.Nifti1Image, label: Path, label_image: nib.Nifti1Image) -> None:
    """Refuse a prediction that is not on its label's voxel grid (:func:`~anofpdm_monai.io.check_same_grid`)."""
    fix = "write the prediction on the label's grid (anofpdm segment keeps its input's grid) or resample it first"
    check_same_grid(prediction, pred_image, f"its label {label}", label_image, fix)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """(3,) voxel sizes in mm along the array axes: the norms of the affine's first three columns."""
    return np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))


def voxel_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in ml: :func:`~anofpdm_monai.io.voxel_volume_mm3` / 1000."""
    return voxel_volume_mm3(affine) / 1000.0


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


STRUCTURES = VOLUME_CONNECTIVITY
"""Neighbourhoods by connectivity: 26 (faces, edges, corners), 18 (faces, edges), 6 (faces)."""


def components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """``(labels, n)``: the connected components of an (X, Y, Z) bool mask, numbered 1..n (0: background)
    (:func:`~anofpdm_monai.segmentation.label_components` at ``connectivity``)."""
    labels, sizes = label_components(mask, connectivity=connectivity)
    return labels, len(sizes) - 1


def lesion_detection(pred: np.ndarray, truth: np.ndarray, connectivity: int = 26) -> LesionCounts:
    """Lesion-wise counts of one case from the connected components of both masks.

    Args:
        pred: (X, Y, Z) bool predicted mask.
        truth: (X, Y, Z) bool label mask.
        connectivity: 26 (default, ISLES'22) or 6 (ATLAS R2.0's ``scipy.ndimage.label``).

    Returns:
        :class:`LesionCounts`: a true lesion sharing a voxel with the prediction is a TP, else a
        FN; a predicted component sharing no voxel with the label is a FP.
    """
    pair = _component_pair(pred, truth, connectivity)
    tp, touching = int(pair.detected[1:].sum()), int(pair.touching[1:].sum())
    return LesionCounts(pair.n_true, pair.n_pred, tp=tp, fn=pair.n_true - tp, fp=pair.n_pred - touching)


@dataclass(frozen=True)
class _ComponentPair:
    """The connected components of a prediction and a label on one grid, and which of them overlap.

    Attributes:
        true_labels, pred_labels: (X, Y, Z) component numbers (0: background).
        n_true, n_pred: component counts.
        detected: (n_true + 1,) bool, the true component shares a voxel with the prediction (index 0 False).
        touching: (n_pred + 1,) bool, the predicted component shares a voxel with the label (index 0 False).
    """

    true_labels: np.ndarray
    pred_labels: np.ndarray
    n_true: int
    n_pred: int
    detected: np.ndarray
    touching: np.ndarray


def _component_pair(pred: np.ndarray, truth: np.ndarray, connectivity: int) -> _ComponentPair:
    """Components of (X, Y, Z) ``pred`` and ``truth`` and their overlaps (shared by the lesion-wise scores)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"pred and truth must be (X, Y, Z) of one shape, got {pred.shape} and {truth.shape}")
    true_labels, n_true = components(truth, connectivity)
    pred_labels, n_pred = components(pred, connectivity)
    detected, touching = np.zeros(n_true + 1, dtype=bool), np.zeros(n_pred + 1, dtype=bool)
    detected[np.unique(true_labels[pred & truth])] = True
    touching[np.unique(pred_labels[pred & truth])] = True
    detected[0] = touching[0] = False
    return _ComponentPair(true_labels, pred_labels, int(n_true), int(n_pred), detected, touching)


FP_DISTANCE_MM = 2.0
"""A predicted component that touches no lesion counts as a false positive only when it lies farther than this
from every lesion voxel (mm, voxel centre to voxel centre); nearer, it is a sliver of the lesion's edge."""

DETECTION_BINS_MM3 = {"<100": (0.0, 100.0), "100-500": (100.0, 500.0), "500-1500": (500.0, 1500.0),
                      ">1500": (1500.0, math.inf)}  # fmt: skip
"""Lesion volume bins of the lesion-wise detection summary (mm^3, [low, high); issue 27)."""


@dataclass(frozen=True)
class LesionMatch:
    """Lesion by lesion, one case on one grid (:func:`match_lesions`).

    Attributes:
        lesion_mm3: (L,) volume of each true lesion (connected component of the label), mm^3.
        detected: (L,) bool, the lesion shares at least one voxel with the prediction.
        pred_components: connected components of the prediction.
        fp_components: predicted components that share no voxel with the label and lie farther than
            ``fp_distance_mm`` from every lesion voxel.
        near_components: predicted components that share no voxel with the label but lie within
            ``fp_distance_mm`` of a lesion (neither a detection nor a false positive).
        fp_ml: volume of the false-positive components, ml.
        pred_ml: volume of the whole prediction, ml.
    """

    lesion_mm3: np.ndarray
    detected: np.ndarray
    pred_components: int
    fp_components: int
    near_components: int
    fp_ml: float
    pred_ml: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (the arrays as lists), read back by :meth:`from_dict`."""
        return {**dataclasses.asdict(self), "lesion_mm3": self.lesion_mm3.tolist(), "detected": self.detected.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LesionMatch:
        return cls(**{**data, "lesion_mm3": np.asarray(data["lesion_mm3"], dtype=np.float64),
                      "detected": np.asarray(data["detected"], dtype=bool)})  # fmt: skip


def match_lesions(pred: np.ndarray, truth: np.ndarray, affine: np.ndarray, fp_distance_mm: float = FP_DISTANCE_MM,
                  connectivity: int = 26) -> LesionMatch:  # fmt: skip
    """Lesion-wise detection of one case on the label's own grid (issue 27's figures).

    Lesions are the ``connectivity``-connected components of ``truth``; a lesion is detected when any
    predicted voxel lies in it. A predicted component sharing no voxel with ``truth`` is a false positive
    when its nearest voxel is farther than ``fp_distance_mm`` from every lesion voxel (Euclidean, in mm
    with the affine's voxel sizes); within that distance it is counted apart (``near_components``), since
    a mask decided on a coarser grid leaves such slivers beside the lesion it found. Without any lesion
    every predicted component is a false positive.

    Args:
        pred: (X, Y, Z) bool predicted mask.
        truth: (X, Y, Z) bool label mask, same grid.
        affine: (4, 4) voxel-to-world affine of the grid (mm): voxel sizes and volumes.
        fp_distance_mm: see above (default :data:`FP_DISTANCE_MM`).
        connectivity: 26 (default), 18 or 6, for both masks.
    """
    pair = _component_pair(pred, truth, connectivity)
    spacing, ml = voxel_spacing(affine), voxel_ml(affine)
    n_true, n_pred = pair.n_true, pair.n_pred
    lesion_mm3 = np.bincount(pair.true_labels.ravel(), minlength=n_true + 1)[1:] * ml * 1000.0
    sizes = np.bincount(pair.pred_labels.ravel(), minlength=n_pred + 1)
    near = np.zeros(n_pred + 1, dtype=bool)
    if n_true and n_pred:
        distance = ndimage.distance_transform_edt(pair.true_labels == 0, sampling=spacing)  # mm to the nearest lesion voxel
        nearest = ndimage.minimum(distance, pair.pred_labels, index=np.arange(1, n_pred + 1))
        near[1:] = np.asarray(nearest, dtype=np.float64) <= fp_distance_mm
    false = ~pair.touching & ~near
    false[0] = False
    return LesionMatch(
        lesion_mm3=lesion_mm3, detected=pair.detected[1:], pred_components=n_pred, fp_components=int(false.sum()),
        near_components=int((~pair.touching & near)[1:].sum()), fp_ml=float(sizes[false].sum()) * ml,
        pred_ml=float(sizes[1:].sum()) * ml,
    )  # fmt: skip


def lesion_detection_summary(matches: Sequence[LesionMatch], bins: dict[str, tuple[float, float]] | None = None) -> dict:
    """Cohort figures from the :func:`match_lesions` of its cases (a healthy case: one without any lesion).

    Returns:
        ``{"bins": {name: {"lesions", "detected", "rate"}}, "cases", "healthy_cases", "fp_components_per_case",
        "fp_ml_per_case", "max_fp_components", "fp_components_per_healthy_case", "fp_ml_per_healthy_case",
        "max_healthy_ml", "near_components_per_case"}``: per volume bin (default :data:`DETECTION_BINS_MM3`,
        [low, high) mm^3) the lesions, how many were detected and the rate (NaN for an empty bin); false
        positives averaged over the cases with lesions and, apart, over the healthy cases (where they are the
        whole prediction), with the largest per case; NaN where there is no such case.
    """
    bins = DETECTION_BINS_MM3 if bins is None else bins
    volumes = np.concatenate([m.lesion_mm3 for m in matches]) if matches else np.zeros(0)
    detected = np.concatenate([m.detected for m in matches]) if matches else np.zeros(0, dtype=bool)
    table = {}
    for name, (low, high) in bins.items():
        inside = (volumes >= low) & (volumes < high)
        n, k = int(inside.sum()), int(detected[inside].sum())
        table[name] = {"lesions": n, "detected": k, "rate": k / n if n else math.nan}
    ill = [m for m in matches if m.lesion_mm3.size]
    healthy = [m for m in matches if not m.lesion_mm3.size]

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else math.nan

    return {
        "bins": table, "cases": len(ill), "healthy_cases": len(healthy),
        "fp_components_per_case": mean([m.fp_components for m in ill]),
        "fp_ml_per_case": mean([m.fp_ml for m in ill]),
        "max_fp_components": max((m.fp_components for m in ill), default=math.nan),
        "near_components_per_case": mean([m.near_components for m in ill]),
        "fp_components_per_healthy_case": mean([m.fp_components for m in healthy]),
        "fp_ml_per_healthy_case": mean([m.fp_ml for m in healthy]),
        "max_healthy_ml": max((m.fp_ml for m in healthy), default=math.nan),
    }  # fmt: skip


def _crop(*masks: np.ndarray, margin: int = 1) -> tuple[np.ndarray, ...]:
    """The masks cut to the bounding box of their union, with ``margin`` empty voxels added on every side."""
    union = np.logical_or.reduce(masks)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(union))
    return tuple(np.pad(m[box], margin) for m in masks)


def _directed_percentile(distances: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest distance whose cumulative weight reaches the fraction ``q`` (surface-distance's rule)."""
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(weights[order]) / weights.sum()
    index = min(int(np.searchsorted(cumulative, q)), len(order) - 1)
    return float(distances[order][index])


def surfel_areas(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Surface area (mm^2) in each 2 x 2 x 2 cell of a zero-padded mask.

    Args:
        mask: (X, Y, Z) bool, with at least one empty voxel on every side.
        spacing: (3,) voxel sizes in mm.

    Returns:
        (X - 1, Y - 1, Z - 1) float: the area of the marching-cubes surface (iso-level 0.5, Lorensen's
        case table) inside the cell whose corners are voxels ``i..i+1`` along each axis; > 0 exactly
        in the cells whose eight voxels are not all equal.
    """
    from skimage.measure import marching_cubes

    spacing = np.asarray(spacing, dtype=np.float64)
    verts, faces, _, _ = marching_cubes(mask.astype(np.float32), level=0.5, spacing=tuple(spacing), method="lorensen")
    corners = verts[faces]  # (F, 3, 3) in mm
    area = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    cell = np.floor(corners.mean(axis=1) / spacing).astype(np.int64)  # a triangle lies inside one cell
    areas = np.zeros(tuple(n - 1 for n in mask.shape))
    np.add.at(areas, tuple(cell.T), area)
    return areas


def _border_cells(mask: np.ndarray) -> np.ndarray:
    """(X - 1, Y - 1, Z - 1) bool: the 2 x 2 x 2 cells of a mask whose eight voxels are not all equal."""
    m = mask.astype(np.int8)
    total = sum(m[i : m.shape[0] - 1 + i, j : m.shape[1] - 1 + j, k : m.shape[2] - 1 + k]
                for i in (0, 1) for j in (0, 1) for k in (0, 1))  # fmt: skip
    return (total > 0) & (total < 8)


def surfel_hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], percentile: float = 95.0) -> float:
    """BraTS 2023's HD95 (the surface-distance package's robust Hausdorff distance) in mm.

    The surface of each mask is a set of surface elements, one per 2 x 2 x 2 cell of voxels that are not
    all equal, each weighted by the marching-cubes area inside it (:func:`surfel_areas`); for each
    element the distance to the nearest element of the other surface (cell centres, in mm); in each
    direction the smallest distance reached by 95 % of the surface *area*; HD95 is the larger.

    Args:
        pred, truth: (X, Y, Z) bool masks of one shape.
        spacing: (3,) voxel sizes in mm.

    Returns:
        HD95 in mm; 0.0 when both masks are empty, inf when exactly one is.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return math.inf
    pred, truth = _crop(pred, truth)
    sampling = np.asarray(spacing, dtype=np.float64)
    found = []
    for a, b in ((truth, pred), (pred, truth)):
        border_a, border_b = _border_cells(a), _border_cells(b)
        to_b = ndimage.distance_transform_edt(~border_b, sampling=sampling)
        found.append(_directed_percentile(to_b[border_a], surfel_areas(a, sampling)[border_a], percentile / 100.0))
    return max(found)


def pooled_hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """panoptica's (and medpy's) HD95 in mm: one 95th percentile over both directions' distances pooled.

    The border of a mask is its voxels not in its erosion by the 6-connected cross; each border voxel's
    distance (mm) to the nearest border voxel of the other mask, in both directions, pooled; the 95th
    percentile of those (linear interpolation).

    Args:
        pred, truth: (X, Y, Z) bool masks of one shape.
        spacing: (3,) voxel sizes in mm.

    Returns:
        HD95 in mm; NaN when both masks are empty (panoptica scores nothing), inf when exactly one is.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() and not truth.any():
        return math.nan
    if not pred.any() or not truth.any():
        return math.inf
    pred, truth = _crop(pred, truth)
    sampling = np.asarray(spacing, dtype=np.float64)
    borders = [m ^ ndimage.binary_erosion(m, structure=STRUCTURES[6]) for m in (pred, truth)]
    distances = [ndimage.distance_transform_edt(~other, sampling=sampling)[own] for own, other in (borders, borders[::-1])]
    return float(np.percentile(np.concatenate(distances), 95))


def _hd95(pred: np.ndarray, truth: np.ndarray, spacing: np.ndarray, convention: Convention) -> float:
    """The convention's HD95 of a pair, its empty-mask value applied (inf: ``empty_hd95_mm``)."""
    if convention.hd95 == "surfel":
        distance = surfel_hd95(pred, truth, spacing)
    elif convention.hd95 == "pooled":
        distance = pooled_hd95(pred, truth, spacing)
    else:
        distance = hd95(pred, truth, spacing)
    if pred.any() != truth.any():
        return convention.empty_hd95_mm
    return distance


def _dice(pred: np.ndarray, truth: np.ndarray, both_empty: float) -> float:
    return both_empty if not pred.any() and not truth.any() else volume_dice(pred, truth)


@dataclass(frozen=True)
class LesionScores:
    """Lesion-wise scores of one case under a convention.

    ``lesion_dice`` / ``lesion_hd95_mm``: BraTS's per-case lesion-wise figures (NaN for the conventions
    without them); counts as in :class:`LesionCounts`, after the convention's matching and size filter.
    """

    true_lesions: int
    pred_lesions: int
    tp: int
    fn: int
    fp: int
    lesion_f1: float
    lesion_dice: float = math.nan
    lesion_hd95_mm: float = math.nan


def _lesion_box(lesion: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The bounding box of a lesion widened by ``margin`` voxels (clipped to the array)."""
    return tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in np.nonzero(lesion))


def brats2023_lesions(
    pred: np.ndarray, truth: np.ndarray, spacing: np.ndarray, convention: Convention, voxel_mm3: float | None = None
) -> LesionScores:
    """BraTS 2023's lesion-wise scores of one case (the BraTS-2023-Metrics definitions).

    1. True lesions: 26-connected components of the label; those lying in one 26-connected component of
       the label dilated ``convention.dilation`` times by the 18-connected cross are one lesion.
    2. Each lesion, dilated the same way, collects every 26-connected predicted component it touches
       (a component may serve several lesions); its DSC and surfel HD95 are against the union of them
       (none: DSC 0, HD95 ``empty_hd95_mm``). It is a TP when it collects any, else a FN.
    3. Predicted components that no dilated lesion touches are FP, each scored DSC 0 / HD95 ``empty_hd95_mm``.
    4. Lesions of at most ``min_lesion_mm3`` are left out of the scores and counts (their components are no FP).
    5. Lesion-wise DSC = sum of lesion DSCs / (lesions + FP); HD95 likewise, FP adding the penalty;
       1 and 0 when there is no lesion and no FP.

    Args:
        pred, truth: (X, Y, Z) bool masks of one shape.
        spacing: (3,) voxel sizes in mm (the distances).
        convention: the BraTS 2023 rules (:data:`CONVENTIONS`).
        voxel_mm3: volume of one voxel in mm^3, of the size filter (:func:`score_case`: |det| of the grid's affine,
            :func:`~anofpdm_monai.io.voxel_volume_mm3`); None: the product of ``spacing``, the same on any grid whose
            axes are orthogonal (:func:`~anofpdm_monai.io.spacing_volume_mm3`).
    """
    structure = STRUCTURES[18]
    dilated_labels, n_groups = components(ndimage.binary_dilation(truth, structure, convention.dilation), 26)
    lesions = np.where(truth, dilated_labels, 0)
    pred_labels, n_pred = components(pred, 26)
    voxel_mm3 = spacing_volume_mm3(spacing) if voxel_mm3 is None else float(voxel_mm3)
    touched: set[int] = set()
    dices, distances = [], []
    tp = fn = 0
    for group in range(1, n_groups + 1):
        lesion = lesions == group
        box = _lesion_box(lesion, convention.dilation + 1)
        near = ndimage.binary_dilation(lesion[box], structure, convention.dilation)
        hits = np.setdiff1d(np.unique(pred_labels[box][near]), [0])
        touched.update(int(h) for h in hits)
        if int(lesion.sum()) * voxel_mm3 <= convention.min_lesion_mm3:
            continue
        found = np.isin(pred_labels, hits) if len(hits) else np.zeros_like(lesion)
        dices.append(volume_dice(found, lesion))
        distances.append(_hd95(found, lesion, spacing, convention))
        tp, fn = tp + bool(len(hits)), fn + (not len(hits))
    fp = n_pred - len(touched)
    scored = len(dices) + fp
    return LesionScores(
        true_lesions=len(dices), pred_lesions=n_pred, tp=tp, fn=fn, fp=fp, lesion_f1=lesion_f1(tp, fn, fp),
        lesion_dice=sum(dices) / scored if scored else 1.0,
        lesion_hd95_mm=(sum(distances) + fp * convention.empty_hd95_mm) / scored if scored else 0.0,
    )  # fmt: skip


def bipartite_lesions(pred: np.ndarray, truth: np.ndarray, spacing: np.ndarray, convention: Convention) -> LesionScores:
    """BraTS 2025's lesion-wise scores of one case (panoptica as the BraTS 2025 glioma config sets it).

    26-connected components of both masks; overlapping (reference, prediction) pairs are assigned one to
    one so that the sum of their DSC is largest (a linear assignment over pairs with DSC > 0); each
    assigned pair is a TP, the other components FN / FP. Lesion-wise DSC and HD95 (:func:`pooled_hd95`)
    are the means over the TP pairs, F1 = TP / (TP + (FN + FP) / 2). No TP: DSC 0, HD95
    ``empty_hd95_mm`` (panoptica: inf), F1 0; no component at all: all three NaN (not scored).

    Args:
        pred, truth: (X, Y, Z) bool masks of one shape.
        spacing: (3,) voxel sizes in mm.
        convention: the BraTS 2025 rules (:data:`CONVENTIONS`).
    """
    from scipy.optimize import linear_sum_assignment

    ref_labels, n_ref = components(truth, 26)
    pred_labels, n_pred = components(pred, 26)
    if n_ref + n_pred == 0:
        return LesionScores(0, 0, 0, 0, 0, math.nan, math.nan, math.nan)
    both = truth & pred
    pairs, overlap = np.unique(np.stack([ref_labels[both], pred_labels[both]]), axis=1, return_counts=True)
    ref_size, pred_size = np.bincount(ref_labels.ravel(), minlength=n_ref + 1), np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    dsc = np.zeros((n_ref + 1, n_pred + 1))
    dsc[pairs[0], pairs[1]] = 2.0 * overlap / (ref_size[pairs[0]] + pred_size[pairs[1]])
    rows, cols = linear_sum_assignment(dsc[1:, 1:], maximize=True)
    matched = [(r + 1, c + 1) for r, c in zip(rows, cols) if dsc[r + 1, c + 1] > 0]
    tp = len(matched)
    if tp == 0:
        return LesionScores(n_ref, n_pred, 0, n_ref, n_pred, 0.0, 0.0, convention.empty_hd95_mm)
    distances = [pooled_hd95(pred_labels == c, ref_labels == r, spacing) for r, c in matched]
    return LesionScores(
        n_ref, n_pred, tp, n_ref - tp, n_pred - tp, lesion_f1(tp, n_ref - tp, n_pred - tp),
        lesion_dice=float(np.mean([dsc[r, c] for r, c in matched])), lesion_hd95_mm=float(np.mean(distances)),
    )  # fmt: skip


def lesion_scores(
    pred: np.ndarray, truth: np.ndarray, spacing: np.ndarray, convention: Convention, voxel_mm3: float | None = None
) -> LesionScores:
    """The convention's lesion-wise scores of one case (its matching rule, :class:`Convention`; ``voxel_mm3``: see
    :func:`brats2023_lesions`)."""
    if convention.matching == "dilated":
        return brats2023_lesions(pred, truth, spacing, convention, voxel_mm3)
    if convention.matching == "bipartite":
        return bipartite_lesions(pred, truth, spacing, convention)
    counts = lesion_detection(pred, truth, convention.connectivity)
    f1 = convention.both_empty if counts.tp + counts.fn + counts.fp == 0 else counts.f1
    return LesionScores(counts.true_lesions, counts.pred_lesions, counts.tp, counts.fn, counts.fp, f1)


def score_case(pred: np.ndarray, truth: np.ndarray, affine: np.ndarray, convention: str | Convention = "default") -> dict[str, float | int]:
    """Every per-case metric of one (prediction, label) pair on one grid, under one convention.

    Args:
        pred: (X, Y, Z) bool predicted mask.
        truth: (X, Y, Z) bool label mask.
        affine: (4, 4) voxel-to-world affine of the grid (mm).
        convention: a name of :data:`CONVENTIONS` (or the :class:`Convention`).

    Returns:
        ``{column: value}`` for :data:`METRIC_COLUMNS`: DICE and HD95 of the whole masks, the
        lesion-wise counts and F1 (and BraTS's lesion-wise DSC / HD95), the volumes in ml, their
        absolute difference and the absolute difference of the numbers of connected components
        (the convention's connectivity; ISLES'22's and ATLAS's lesion count difference).
    """
    rules = get_convention(convention)
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    spacing, ml = voxel_spacing(affine), voxel_ml(affine)
    lesions = lesion_scores(pred, truth, spacing, rules, voxel_volume_mm3(affine))
    true_ml, pred_ml = int(truth.sum()) * ml, int(pred.sum()) * ml
    count_diff = abs(components(truth, rules.connectivity)[1] - components(pred, rules.connectivity)[1])
    return {
        "dice": _dice(pred, truth, rules.both_empty),
        "hd95_mm": _hd95(pred, truth, spacing, rules),
        "true_lesions": lesions.true_lesions, "pred_lesions": lesions.pred_lesions,
        "tp": lesions.tp, "fn": lesions.fn, "fp": lesions.fp, "lesion_f1": lesions.lesion_f1,
        "lesion_dice": lesions.lesion_dice, "lesion_hd95_mm": lesions.lesion_hd95_mm,
        "true_ml": true_ml, "pred_ml": pred_ml, "abs_volume_diff_ml": abs(true_ml - pred_ml),
        "lesion_count_diff": int(count_diff),
    }  # fmt: skip


def score_pair(pair: MaskPair, convention: str | Convention = "default", label_sets: Sequence[LabelSet] | None = None) -> list[dict]:
    """Read, check and score one pair: one ``per_case.csv`` row (columns :data:`CASE_COLUMNS`) per label set.

    Args:
        pair: the case's files.
        convention: see :func:`score_case`.
        label_sets: the regions to score (default: one, every voxel > 0); each is taken from the label
            file and from the prediction alike.
    """
    sets = tuple(label_sets or parse_label_sets(None))
    truth_map, label_image = read_label_map(pair.label, label=True)
    if pair.prediction is None:
        pred_map = np.zeros_like(truth_map)
    else:
        pred_map, pred_image = read_label_map(pair.prediction)
        check_prediction_grid(pair.prediction, pred_image, pair.label, label_image)
    files = {"prediction_missing": pair.prediction is None, "prediction": str(pair.prediction or ""), "label": str(pair.label)}
    return [
        {"case": pair.case_id, "region": region.name,
         **score_case(region.mask(pred_map), region.mask(truth_map), label_image.affine, convention), **files}
        for region in sets
    ]  # fmt: skip


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


UNDEFINED = {
    "hd95_mm": UNDEFINED_HD95,
    "dice": "both masks empty: panoptica scores no DSC",
    "lesion_f1": "no true lesion and no predicted component: panoptica scores no F1",
    "lesion_dice": "not a figure of this convention, or no lesion to score",
    "lesion_hd95_mm": "not a figure of this convention, or no lesion to score",
}
"""Why a per-case figure can be undefined (NaN in the CSV, null in JSON)."""


def summarise_region(rows: pd.DataFrame, convention: Convention) -> dict:
    """The summary of one label set's rows of ``per_case.csv``.

    Means over cases of :data:`MEAN_COLUMNS` (each over the cases where it is defined, with the count
    in ``n_defined``), the lesion counts pooled over the cohort, the lesion F1 both ways
    (``lesion_f1_pooled``: of the summed counts; ``lesion_f1_case_mean``: the mean of the per-case F1)
    and ``lesion_f1_cohort``, the one of the two the convention's challenge reports.
    """
    tp, fn, fp = (int(rows[k].sum()) for k in ("tp", "fn", "fp"))
    counts = {k: int(rows[k].notna().sum()) for k in MEAN_COLUMNS}
    pooled_f1 = lesion_f1(tp, fn, fp)
    if tp + fn + fp == 0:
        pooled_f1 = convention.both_empty
    summary = {
        "n_cases": len(rows),
        "mean": {k: _mean(rows[k]) for k in MEAN_COLUMNS},
        "n_defined": counts,
        "n_hd95_defined": counts["hd95_mm"],
        "lesion_f1_pooled": pooled_f1,
        "lesion_f1_case_mean": _mean(rows["lesion_f1"]),
        "pooled_lesions": {
            "true_lesions": int(rows["true_lesions"].sum()), "pred_lesions": int(rows["pred_lesions"].sum()),
            "tp": tp, "fn": fn, "fp": fp,
        },
    }  # fmt: skip
    summary["lesion_f1_cohort"] = summary[f"lesion_f1_{convention.cohort_f1}"]
    undefined = {k: f"{len(rows) - n} case(s): {UNDEFINED[k]}" for k, n in counts.items() if n < len(rows) and k in UNDEFINED}
    if convention.matching == "overlap":  # lesion-wise DSC / HD95 are BraTS's figures only
        undefined = {k: v for k, v in undefined.items() if not k.startswith("lesion_") or k == "lesion_f1"}
    if undefined:
        summary["undefined"] = undefined
    return summary


def summarise_cases(per_case: pd.DataFrame, convention: str | Convention = "default") -> dict:
    """``summary.json``'s content from the ``per_case.csv`` table.

    ``by_region`` holds :func:`summarise_region` per label set; the top level repeats the first label
    set's figures (so a run with one set reads as before), with the convention and the case counts.
    """
    rules = get_convention(convention)
    regions = list(dict.fromkeys(per_case["region"]))
    by_region = {name: summarise_region(per_case[per_case["region"] == name], rules) for name in regions}
    first = per_case[per_case["region"] == regions[0]]
    return {
        "convention": rules.name,
        "regions": regions,
        "n_missing_predictions": int(first["prediction_missing"].sum()),
        **by_region[regions[0]],
        "by_region": by_region,
    }


def score_folder(
    predictions: str | Path,
    labels: str | Path,
    output: str | Path,
    missing_as_empty: bool = False,
    convention: str | Convention = "default",
    label_sets: Sequence[str] | Sequence[LabelSet] | None = None,
    run_record: dict | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Score every prediction of ``predictions`` against ``labels``; write ``per_case.csv`` and ``summary.json``.

    Args:
        predictions, labels, missing_as_empty: as for :func:`pair_masks`.
        output: output folder (created); both files are written atomically, the JSON strict.
        convention: a name of :data:`CONVENTIONS`: the challenge whose rules score the cases.
        label_sets: the regions to score, as :class:`LabelSet` or as ``NAME=1,2,4`` texts
            (:func:`parse_label_sets`); default: every voxel > 0.
        run_record: the run's record (``anofpdm_monai.provenance.run_record``), written as
            ``OUTPUT/run.json`` once the files are paired and before the first case; None: none written.

    Returns:
        ``(per_case, summary)``: the table (columns :data:`CASE_COLUMNS`, one row per case and label set)
        and the summary dict.
    """
    rules = get_convention(convention)
    given = tuple(label_sets or ())
    sets = given if given and all(isinstance(s, LabelSet) for s in given) else parse_label_sets(given)  # type: ignore[arg-type]
    pairs = pair_masks(predictions, labels, missing_as_empty)
    out_dir = Path(output)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{out_dir}: cannot create the folder ({err.strerror}); choose a writable output", arguments="output") from err
    if run_record is not None:
        write_run_record(out_dir, run_record)
    per_case = pd.DataFrame([row for pair in pairs for row in score_pair(pair, rules, sets)], columns=list(CASE_COLUMNS))
    summary = summarise_cases(per_case, rules)
    summary["per_case"] = per_case.drop(columns=["prediction", "label"]).to_dict(orient="records")
    atomic_save_dataframe(per_case, out_dir / "per_case.csv")
    atomic_write_json(out_dir / "summary.json", summary)
    return per_case, summary


MAX_PRINTED_CASES = 20


def score_table(per_case: pd.DataFrame, summary: dict) -> str:
    """A short text table per label set: one line per case (up to :data:`MAX_PRINTED_CASES`) and the cohort line."""

    def cell(value: float, spec: str) -> str:
        undefined = value is None or (isinstance(value, float) and math.isnan(value))
        return format("-", f">{spec.split('.')[0]}") if undefined else format(value, spec)

    lesionwise = summary["convention"] in ("brats2023", "brats2025")
    width = max(8, *(len(str(c)) for c in per_case["case"].head(MAX_PRINTED_CASES)))
    header = f"{'case':<{width}} {'DICE %':>7} {'HD95 mm':>8} {'TP':>4} {'FN':>4} {'FP':>4} {'F1 %':>6}"
    header += f" {'LDSC %':>7} {'LHD95 mm':>9}" if lesionwise else ""
    header += f" {'true ml':>8} {'pred ml':>8} {'|dV| ml':>8}"

    def line(name: str, row: dict, tp: int, fn: int, fp: int, f1: float) -> str:
        text = (f"{name:<{width}} {cell(100 * row['dice'], '7.1f')} {cell(row['hd95_mm'], '8.2f')} {tp:>4} {fn:>4} "
                f"{fp:>4} {cell(100 * f1, '6.1f')}")  # fmt: skip
        if lesionwise:
            text += f" {cell(100 * row['lesion_dice'], '7.1f')} {cell(row['lesion_hd95_mm'], '9.2f')}"
        return text + f" {cell(row['true_ml'], '8.2f')} {cell(row['pred_ml'], '8.2f')} {cell(row['abs_volume_diff_ml'], '8.2f')}"

    lines = [f"convention {summary['convention']}"]
    for region in summary["regions"]:
        rows = per_case[per_case["region"] == region]
        result = summary["by_region"][region]
        if len(summary["regions"]) > 1:
            lines.append(f"region {region}")
        lines += [header, "-" * len(header)]
        for row in rows.head(MAX_PRINTED_CASES).to_dict(orient="records"):
            mark = " (no prediction: scored empty)" if row["prediction_missing"] else ""
            lines.append(line(str(row["case"]), row, row["tp"], row["fn"], row["fp"], row["lesion_f1"]) + mark)
        if len(rows) > MAX_PRINTED_CASES:
            lines.append(f"... {len(rows) - MAX_PRINTED_CASES} more case(s) in per_case.csv")
        pooled = result["pooled_lesions"]
        lines.append("-" * len(header))
        lines.append(line("cohort", result["mean"], pooled["tp"], pooled["fn"], pooled["fp"], result["lesion_f1_cohort"]))
    f1 = "the mean of the per-case F1" if get_convention(summary["convention"]).cohort_f1 == "case_mean" else "the F1 of those sums"
    lines.append(f"(cohort: means over the {summary['n_cases']} cases, each over the cases where it is defined; "
                 f"TP/FN/FP are sums, F1 is {f1}; summary.json has both F1s)")  # fmt: skip
    return "\n".join(lines) + "\n"
