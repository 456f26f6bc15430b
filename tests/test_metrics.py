"""Tests of anofpdm_monai.metrics with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from anofpdm_monai.metrics import (
    PooledAUPRC,
    auprc,
    brain_foreground,
    classification_scores,
    dice_iou_per_slice,
    merge_auprc,
    summarise_slices,
    summary_markdown,
    volume_dice,
)
from anofpdm_monai.networks import HEALTHY, UNHEALTHY


def _reference_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision by a loop over distinct thresholds, descending (sklearn's definition)."""
    ap, prev_recall = 0.0, 0.0
    for thr in np.unique(scores)[::-1]:
        pred = scores >= thr
        tp = np.sum(pred & labels)
        recall = tp / labels.sum()
        ap += (recall - prev_recall) * tp / pred.sum()
        prev_recall = recall
    return float(ap)


def test_dice_iou_per_slice_hand_values():
    pred = np.zeros((4, 4, 4), bool)
    target = np.zeros((4, 4, 4), bool)
    pred[0, :2, :2] = True  # 4 px
    target[0, :2, :3] = True  # 6 px, overlap 4
    target[2, 3, 3] = True  # slice 2: empty prediction, one lesion pixel
    pred[3, 0, :2] = True  # slice 3: disjoint masks
    target[3, 3, :2] = True
    dice, iou = dice_iou_per_slice(pred, target)
    np.testing.assert_allclose(dice, [0.8, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(iou, [4 / 6, 1.0, 0.0, 0.0])
    dice_t, iou_t = dice_iou_per_slice(torch.from_numpy(pred), torch.from_numpy(target))
    np.testing.assert_allclose(dice_t, dice)
    np.testing.assert_allclose(iou_t, iou)


def test_dice_iou_per_slice_rejects_bad_shapes():
    with pytest.raises(ValueError):
        dice_iou_per_slice(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 5), bool))
    with pytest.raises(ValueError):
        dice_iou_per_slice(np.zeros((4, 4), bool), np.zeros((4, 4), bool))


def test_volume_dice():
    pred = np.zeros((2, 4, 4), bool)
    target = np.zeros((2, 4, 4), bool)
    pred[0, 0, :3] = True
    target[0, 0, 1:4] = True
    target[1, 2, 2:4] = True
    assert volume_dice(pred, target) == pytest.approx(2 * 2 / (3 + 5))
    assert volume_dice(np.zeros((2, 3, 3)), np.zeros((2, 3, 3))) == 1.0


def test_auprc_hand_values():
    assert auprc(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0], bool)) == pytest.approx((1 + 2 / 3) / 2)
    # tie between a positive and a negative at 0.5: (0.5 * 1/2) + (0.5 * 2/3)
    assert auprc(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 1], bool)) == pytest.approx(7 / 12)
    assert auprc(np.array([0.3, 0.1]), np.array([1, 1], bool)) == 1.0
    assert math.isnan(auprc(np.array([0.3, 0.1]), np.array([0, 0], bool)))


def test_auprc_matches_reference_loop_with_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 1)
    labels = rng.random(300) < 0.3
    assert auprc(scores, labels) == pytest.approx(_reference_ap(scores, labels))


def test_pooled_auprc_equals_one_shot_on_foreground():
    rng = np.random.default_rng(1)
    maps = rng.random((6, 8, 8)).astype(np.float32)
    masks = rng.random((6, 8, 8)) < maps * 0.5
    fg = rng.random((6, 8, 8)) < 0.8
    acc = PooledAUPRC()
    for i in range(0, 6, 2):
        acc.update(torch.from_numpy(maps[i : i + 2]), masks[i : i + 2], fg[i : i + 2])
    expected = auprc(maps[fg], masks[fg])
    assert acc.compute() == pytest.approx(expected, abs=1e-12)
    assert acc.compute() == pytest.approx(expected, abs=1e-12)  # compacted state gives the same
    assert acc.n_positive == int(masks[fg].sum()) and acc.n_negative == int((~masks[fg]).sum())
    acc.update(maps, masks)  # further updates after compute still pool
    both = np.concatenate([maps[fg], maps.ravel()])
    assert acc.compute() == pytest.approx(auprc(both, np.concatenate([masks[fg], masks.ravel()])), abs=1e-12)
    acc.reset()
    assert math.isnan(acc.compute())


def test_brain_foreground():
    x0 = np.array([[[[-1.0, -0.95, -0.9]], [[-1.0, -0.95, -0.9]]]])  # (1, 2, 1, 3)
    np.testing.assert_array_equal(brain_foreground(x0), [[[False, False, True]]])
    fg = brain_foreground(torch.from_numpy(x0))
    assert fg.dtype == torch.bool and fg.shape == (1, 1, 3)
    with pytest.raises(ValueError):
        brain_foreground(np.zeros((2, 3, 3)))


def test_classification_scores():
    s = classification_scores(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool))
    assert s == pytest.approx({"accuracy": 0.5, "precision": 0.5, "recall": 0.5})
    none_predicted = classification_scores(np.zeros(3, bool), np.array([1, 0, 0], bool))
    assert none_predicted == pytest.approx({"accuracy": 2 / 3, "precision": 1.0, "recall": 0.0})
    none_actual = classification_scores(np.array([1, 0], bool), np.zeros(2, bool))
    assert none_actual == pytest.approx({"accuracy": 0.5, "precision": 0.0, "recall": 1.0})
    with pytest.raises(ValueError):
        classification_scores(np.zeros(0, bool), np.zeros(0, bool))


def _slice_table() -> pd.DataFrame:
    rows = [
        # method, label, pred_label, dice, iou (unhealthy setup), mixed dice, mixed iou, calls, seconds, pixel labels
        ("anofpdm", UNHEALTHY, UNHEALTHY, 0.8, 0.6, 0.8, 0.6, 10, 0.5, False),
        ("anofpdm", UNHEALTHY, HEALTHY, 0.5, 0.4, 0.0, 0.0, 10, 0.5, False),  # mixed: zero mask -> 0
        ("anofpdm", HEALTHY, HEALTHY, 0.0, 0.0, 1.0, 1.0, 10, 0.5, False),  # mixed: zero mask -> 1
        ("anofpdm", HEALTHY, UNHEALTHY, 0.0, 0.0, 0.0, 0.0, 10, 0.5, False),
        ("ddib", UNHEALTHY, np.nan, 0.3, 0.2, 0.3, 0.2, 9, 0.25, True),
        ("ddib", HEALTHY, np.nan, 1.0, 1.0, 1.0, 1.0, 9, 0.25, True),
    ]
    cols = ["method", "label", "pred_label", "dice", "iou", "mixed_dice", "mixed_iou", "network_calls", "seconds", "uses_pixel_labels"]
    return pd.DataFrame(rows, columns=cols)


def test_summarise_slices_hand_values():
    rows = summarise_slices(_slice_table())
    assert list(rows) == ["anofpdm", "ddib"]
    a = rows["anofpdm"]
    assert a["mixed_dice"] == pytest.approx((0.8 + 0 + 1 + 0) / 4)
    assert a["mixed_iou"] == pytest.approx((0.6 + 0 + 1 + 0) / 4)
    assert a["unhealthy_dice"] == pytest.approx(0.65)
    assert a["unhealthy_iou"] == pytest.approx(0.5)
    assert (a["accuracy"], a["precision"], a["recall"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (a["calls_per_slice"], a["seconds_per_slice"]) == pytest.approx((10, 0.5))
    assert (a["n_slices"], a["n_unhealthy"], a["uses_pixel_labels"]) == (4, 2, False)
    assert math.isnan(a["mixed_auprc"])
    b = rows["ddib"]
    assert (b["mixed_dice"], b["mixed_iou"]) == pytest.approx((0.65, 0.6))
    assert (b["unhealthy_dice"], b["unhealthy_iou"]) == pytest.approx((0.3, 0.2))
    assert math.isnan(b["accuracy"]) and b["uses_pixel_labels"]


def test_summarise_slices_rejects_partial_predictions():
    df = _slice_table()
    df.loc[0, "pred_label"] = np.nan
    with pytest.raises(ValueError):
        summarise_slices(df)
    with pytest.raises(ValueError):
        summarise_slices(df.drop(columns="dice"))


def test_summary_markdown():
    rows = summarise_slices(_slice_table())
    rows = merge_auprc(rows, "anofpdm", mixed=0.7, unhealthy=0.8)
    text = summary_markdown(rows)
    lines = text.splitlines()
    assert lines[0] == (
        "| method | mixed DICE | mixed IoU | mixed AUPRC | unhealthy DICE | unhealthy IoU | unhealthy AUPRC"
        " | acc | prec | rec | calls/slice | s/slice |"
    )
    assert lines[2] == "| anofpdm | 45.0 | 40.0 | 70.0 | 65.0 | 50.0 | 80.0 | 50.0 | 50.0 | 50.0 | 10.0 | 0.500 |"
    assert lines[3] == "| ddib † | 65.0 | 60.0 | – | 30.0 | 20.0 | – | – | – | – | 9.0 | 0.250 |"
    assert lines[-1] == "† uses pixel labels: ddib's depth, w and threshold are tuned on validation masks."  # only the methods shown
    with pytest.raises(KeyError):
        merge_auprc(rows, "missing", mixed=0.1, unhealthy=0.1)
