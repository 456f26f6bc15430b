"""Evaluation metrics of ALGORITHM.md section 7 and the Table-1 summary.

Everything here is a pure function of arrays (numpy or torch; torch tensors are
moved to the CPU) except :class:`PooledAUPRC`, which accumulates the pixels of a
whole cohort so that AUPRC can be pooled over slices as in the paper.

Conventions:
    * DICE / IoU of an empty prediction on an empty ground truth is 1; of an
      empty prediction on a non-empty ground truth (or the reverse) it is 0.
    * "Mixed" = all test slices; "unhealthy" = slices whose image label is
      ``UNHEALTHY``.
    * AUPRC is average precision, step-wise as scikit-learn's
      ``average_precision_score``: ``sum_n (R_n - R_{n-1}) P_n`` over the
      distinct score thresholds, descending.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from anofpdm_monai.methods import all_methods
from anofpdm_monai.networks import HEALTHY, UNHEALTHY

ArrayLike = np.ndarray | torch.Tensor

FOREGROUND_THRESHOLD = -0.95
"""Default brain-foreground cut on the channel mean of x0 in [-1, 1] (section 7)."""

SUMMARY_COLUMNS = (
    ("mixed DICE", "mixed_dice"),
    ("mixed IoU", "mixed_iou"),
    ("mixed AUPRC", "mixed_auprc"),
    ("unhealthy DICE", "unhealthy_dice"),
    ("unhealthy IoU", "unhealthy_iou"),
    ("unhealthy AUPRC", "unhealthy_auprc"),
    ("acc", "accuracy"),
    ("prec", "precision"),
    ("rec", "recall"),
)
"""(Markdown header, row key) of the percent columns of :func:`summary_markdown`."""

PIXEL_LABEL_MARKER = "†"


def _numpy(x: ArrayLike, dtype: Any = None) -> np.ndarray:
    """``x`` as a numpy array (torch tensors are detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _check_same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {a.shape} and {b.shape}")


# ---------------------------------------------------------------------------
# Overlap metrics
# ---------------------------------------------------------------------------


def dice_iou_per_slice(pred: ArrayLike, target: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """DICE and IoU of each slice of a batch of binary masks.

    Args:
        pred: (B, H, W) bool predicted masks.
        target: (B, H, W) bool ground-truth masks.

    Returns:
        ``(dice, iou)``, each (B,) float64 in [0, 1]. A slice with both masks empty
        scores 1 for both.
    """
    p = _numpy(pred, bool)
    g = _numpy(target, bool)
    _check_same_shape(p, g, "pred and target")
    if p.ndim != 3:
        raise ValueError(f"pred and target must be (B, H, W), got shape {p.shape}")
    inter = np.logical_and(p, g).sum(axis=(1, 2)).astype(np.float64)
    total = p.sum(axis=(1, 2)).astype(np.float64) + g.sum(axis=(1, 2))
    union = total - inter
    dice = np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1.0))
    iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1.0))
    return dice, iou


def volume_dice(pred: ArrayLike, target: ArrayLike) -> float:
    """3-D DICE of one case (all voxels pooled).

    Args:
        pred: (D, H, W) bool predicted mask of the case (any shape equal to ``target``'s).
        target: (D, H, W) bool ground-truth mask.

    Returns:
        DICE in [0, 1]; 1.0 when both masks are empty.
    """
    p = _numpy(pred, bool)
    g = _numpy(target, bool)
    _check_same_shape(p, g, "pred and target")
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / total


# ---------------------------------------------------------------------------
# AUPRC
# ---------------------------------------------------------------------------


def _average_precision_sorted(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision from the ascending-sorted scores of positives and of negatives.

    Recall only changes at thresholds equal to a positive's score, so the sum runs
    over the distinct positive scores v: ``(#pos == v) / P * precision(score >= v)``.

    Args:
        pos: (P,) ascending scores of the positive pixels, P >= 1.
        neg: (M,) ascending scores of the negative pixels.
    """
    n_pos = pos.size
    first = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    values = pos[first]
    counts = np.diff(np.r_[first, n_pos])
    tp = n_pos - first
    fp = neg.size - np.searchsorted(neg, values, side="left")
    precision = tp / (tp + fp)
    return float(np.sum(counts * precision) / n_pos)


def _split_sorted(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending-sorted scores of the positives and of the negatives."""
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    return np.sort(scores[labels]), np.sort(scores[~labels])


def auprc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the precision-recall curve (average precision, step-wise).

    Equals scikit-learn's ``average_precision_score(labels, scores)``.

    Args:
        scores: (N,) anomaly scores (any shape equal to ``labels``'; flattened).
        labels: (N,) bool, True for lesion pixels.

    Returns:
        Average precision in [0, 1]; NaN when there is no positive.
    """
    s = _numpy(scores).ravel()
    y = _numpy(labels, bool).ravel()
    _check_same_shape(s, y, "scores and labels")
    if not y.any():
        return math.nan
    return _average_precision_sorted(*_split_sorted(s, y))


class PooledAUPRC:
    """Streaming AUPRC over the pooled pixels of many slices (exact).

    Each :meth:`update` keeps the foreground pixels' scores as float32, split by
    label (4 bytes a pixel); :meth:`compute` sorts them once and keeps them
    sorted, so repeated calls are cheap. Scores are rounded to float32, so the
    result equals :func:`auprc` on the float32 scores.

    Example:
        >>> acc = PooledAUPRC()
        >>> acc.update(maps, masks, brain_foreground(x0))  # per batch
        >>> acc.compute()
    """

    def __init__(self) -> None:
        self._pos: list[np.ndarray] = []
        self._neg: list[np.ndarray] = []

    def update(self, scores: ArrayLike, labels: ArrayLike, foreground: ArrayLike | None = None) -> None:
        """Add a batch of pixels.

        Args:
            scores: (B, H, W) anomaly maps.
            labels: (B, H, W) bool lesion masks.
            foreground: (B, H, W) bool brain foreground; only these pixels count.
                None keeps every pixel.
        """
        s = _numpy(scores, np.float32)
        y = _numpy(labels, bool)
        _check_same_shape(s, y, "scores and labels")
        if foreground is not None:
            fg = _numpy(foreground, bool)
            _check_same_shape(s, fg, "scores and foreground")
            s, y = s[fg], y[fg]
        s, y = s.ravel(), y.ravel()
        if not np.all(np.isfinite(s)):
            raise ValueError("scores must be finite")
        self._pos.append(s[y])
        self._neg.append(s[~y])

    @staticmethod
    def _merged(parts: list[np.ndarray]) -> np.ndarray:
        merged = np.concatenate(parts) if parts else np.empty(0, np.float32)
        merged.sort()
        return merged

    def compute(self) -> float:
        """Average precision of all pixels seen so far; NaN when none is positive."""
        pos, neg = self._merged(self._pos), self._merged(self._neg)
        self._pos, self._neg = [pos], [neg]
        if pos.size == 0:
            return math.nan
        return _average_precision_sorted(pos, neg)

    @property
    def n_positive(self) -> int:
        """Number of positive pixels seen."""
        return sum(p.size for p in self._pos)

    @property
    def n_negative(self) -> int:
        """Number of negative pixels seen."""
        return sum(n.size for n in self._neg)

    def reset(self) -> None:
        """Forget every pixel."""
        self._pos, self._neg = [], []


def brain_foreground(x0: ArrayLike, threshold: float = FOREGROUND_THRESHOLD) -> ArrayLike:
    """Brain-foreground pixels: the channel mean of x0 above ``threshold``.

    Args:
        x0: (B, C, H, W) clean slices in [-1, 1] (numpy or torch).
        threshold: cut on the channel mean (section 7: -0.95).

    Returns:
        (B, H, W) bool, of the same array type as ``x0``.
    """
    if x0.ndim != 4:
        raise ValueError(f"x0 must be (B, C, H, W), got shape {tuple(x0.shape)}")
    return x0.mean(1) > threshold


# ---------------------------------------------------------------------------
# Health classification
# ---------------------------------------------------------------------------


def classification_scores(pred_unhealthy: ArrayLike, label: ArrayLike) -> dict[str, float]:
    """Accuracy, precision and recall of the slice-level health decision.

    Unhealthy is the positive class. Degenerate cases are NaN-free:
    precision is 1.0 when no slice is predicted unhealthy (no false alarm was
    raised; recall then shows the misses), and recall is 1.0 when no slice is
    actually unhealthy (nothing could be missed).

    Args:
        pred_unhealthy: (N,) bool, True where the slice is predicted unhealthy.
        label: (N,) bool, True where the slice is unhealthy.

    Returns:
        ``{"accuracy", "precision", "recall"}``, each in [0, 1].

    Raises:
        ValueError: if the inputs are empty or differ in shape.
    """
    p = _numpy(pred_unhealthy, bool).ravel()
    y = _numpy(label, bool).ravel()
    _check_same_shape(p, y, "pred_unhealthy and label")
    if p.size == 0:
        raise ValueError("classification_scores needs at least one slice")
    tp = int(np.sum(p & y))
    n_pred, n_true = int(p.sum()), int(y.sum())
    return {
        "accuracy": float(np.mean(p == y)),
        "precision": tp / n_pred if n_pred else 1.0,
        "recall": tp / n_true if n_true else 1.0,
    }


# ---------------------------------------------------------------------------
# Table 1
# ---------------------------------------------------------------------------


def _mean_or_nan(values: pd.Series) -> float:
    return float(values.mean()) if len(values) else math.nan


def _summarise_method(group: pd.DataFrame) -> dict[str, Any]:
    """The Table-1 row of one method's per-slice rows (see :func:`summarise_slices`)."""
    unhealthy = group["label"].to_numpy() == UNHEALTHY
    if not np.all(unhealthy | (group["label"].to_numpy() == HEALTHY)):
        raise ValueError("label must hold HEALTHY or UNHEALTHY")
    pred = None
    if "pred_label" in group and group["pred_label"].notna().any():
        if group["pred_label"].isna().any():
            raise ValueError("pred_label must be given for all slices of a method or for none")
        pred = group["pred_label"].to_numpy() == UNHEALTHY
    mixed_dice, mixed_iou = group["mixed_dice"].to_numpy(float), group["mixed_iou"].to_numpy(float)
    if pred is None:
        cls = dict.fromkeys(("accuracy", "precision", "recall"), math.nan)
    else:
        cls = classification_scores(pred, unhealthy)
    return {
        "mixed_dice": float(mixed_dice.mean()),
        "mixed_iou": float(mixed_iou.mean()),
        "mixed_auprc": math.nan,
        "unhealthy_dice": _mean_or_nan(group.loc[unhealthy, "dice"]),
        "unhealthy_iou": _mean_or_nan(group.loc[unhealthy, "iou"]),
        "unhealthy_auprc": math.nan,
        **cls,
        "calls_per_slice": _mean_or_nan(group["network_calls"]) if "network_calls" in group else math.nan,
        "seconds_per_slice": _mean_or_nan(group["seconds"]) if "seconds" in group else math.nan,
        "uses_pixel_labels": bool(group["uses_pixel_labels"].any()) if "uses_pixel_labels" in group else False,
        "n_slices": int(len(group)),
        "n_unhealthy": int(unhealthy.sum()),
    }


def summarise_slices(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Turn a per-slice table into one Table-1 row per method.

    Args:
        df: one row per (method, slice) with columns

            * ``method`` (str);
            * ``label``: image label, ``HEALTHY`` or ``UNHEALTHY``;
            * ``dice``, ``iou``: the slice's scores in the unhealthy setup (mask
              kept whatever the classification);
            * ``mixed_dice``, ``mixed_iou``: its scores in the mixed setup (the
              method's own rule made the mask: see
              :func:`anofpdm_monai.segmentation.mixed_setup_masks`);
            * ``pred_label`` (optional): predicted health class, ``HEALTHY`` or
              ``UNHEALTHY``; NaN for every slice of a method that does not
              classify (reconstruction baselines);
            * ``network_calls``, ``seconds`` (optional): per slice;
            * ``uses_pixel_labels`` (optional, bool): the method's threshold was
              tuned with pixel labels.

    Returns:
        ``{method: row}`` in order of first appearance, each row holding
        ``mixed_dice``, ``mixed_iou``, ``unhealthy_dice``, ``unhealthy_iou``,
        ``accuracy``, ``precision``, ``recall`` (fractions; NaN where undefined),
        ``mixed_auprc`` / ``unhealthy_auprc`` (NaN until :func:`merge_auprc`),
        ``calls_per_slice``, ``seconds_per_slice``, ``uses_pixel_labels``,
        ``n_slices``, ``n_unhealthy``.
    """
    missing = {"method", "label", "dice", "iou", "mixed_dice", "mixed_iou"} - set(df.columns)
    if missing:
        raise ValueError(f"per-slice table lacks columns {sorted(missing)}")
    return {str(method): _summarise_method(group) for method, group in df.groupby("method", sort=False)}


def merge_auprc(
    rows: Mapping[str, Mapping[str, Any]], method: str, *, mixed: float, unhealthy: float
) -> dict[str, dict[str, Any]]:
    """A copy of ``rows`` with the pooled AUPRCs of ``method`` filled in.

    Args:
        rows: output of :func:`summarise_slices`.
        method: the row to update.
        mixed: pooled AUPRC over the brain pixels of all test slices.
        unhealthy: pooled AUPRC over the brain pixels of the unhealthy slices.
    """
    if method not in rows:
        raise KeyError(f"no summary row for method {method!r}; have {sorted(rows)}")
    out = {name: dict(row) for name, row in rows.items()}
    out[method].update(mixed_auprc=float(mixed), unhealthy_auprc=float(unhealthy))
    return out


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(float(value) * scale, spec)


def summary_markdown(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Render Table-1 rows as a Markdown table (percent, one decimal).

    Methods whose threshold was tuned with pixel labels (``uses_pixel_labels``)
    carry the marker ``†`` and a footnote. Missing values print as ``–``.

    Args:
        rows: ``{method: row}`` as returned by :func:`summarise_slices` /
            :func:`merge_auprc`.

    Returns:
        The table, one line per method, ending with a newline.
    """
    header = ["method", *(title for title, _ in SUMMARY_COLUMNS), "calls/slice", "s/slice"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    pixel_methods = [method for method, row in rows.items() if row.get("uses_pixel_labels", False)]
    for method, row in rows.items():
        pixel = method in pixel_methods
        cells = [method + (f" {PIXEL_LABEL_MARKER}" if pixel else "")]
        cells += [_fmt(row.get(key), ".1f", 100.0) for _, key in SUMMARY_COLUMNS]
        cells += [_fmt(row.get("calls_per_slice"), ".1f"), _fmt(row.get("seconds_per_slice"), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    if pixel_methods:
        lines += ["", pixel_label_note(rows)]
    return "\n".join(lines) + "\n"


def pixel_label_note(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """The footnote of the ``†`` methods of ``rows`` (those with ``uses_pixel_labels``), from the registry; "" if none."""
    pixel_methods = [method for method, row in rows.items() if row.get("uses_pixel_labels", False)]
    if not pixel_methods:
        return ""
    registry = all_methods()
    said = "; ".join(registry[m].footnote if m in registry else f"{m} is tuned on pixel labels" for m in pixel_methods)
    return f"{PIXEL_LABEL_MARKER} uses pixel labels: {said}."
