"""Tests of ``anofpdm score`` (anofpdm_monai/scoring.py): the metrics on hand-built masks with known
answers, the pairing of predictions with label files of each layout, the refusals, and that the
per-case DICE of the masks ``evaluate`` writes equals evaluate's own native-grid DICE.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from anofpdm_monai.evaluation import Cohort, CohortEvaluator, load_case_results
from anofpdm_monai.inferers import VolumeInferer
from anofpdm_monai.transforms import slices_to_volume
from anofpdm_monai.scoring import (
    CASE_COLUMNS,
    hd95,
    lesion_detection,
    lesion_detection_summary,
    match_lesions,
    pair_masks,
    score_case,
    voxel_spacing,
)
from pipelines.cli import main

SHAPE = (16, 14, 12)
# voxel axes -> world axes permuted and flipped, sizes 2.0, 0.5 and 1.5 mm (spacing comes from the columns)
AFFINE = np.array([[0.0, 0.5, 0.0, 10.0], [-2.0, 0.0, 0.0, 20.0], [0.0, 0.0, 1.5, -5.0], [0.0, 0.0, 0.0, 1.0]])


def strict_json(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{path}: bare {name} in JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def write_mask(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE, dtype: type = np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), affine), str(path))
    return path


def empty() -> np.ndarray:
    return np.zeros(SHAPE, bool)


# ---------------------------------------------------------------- HD95


def test_spacing_and_volume_come_from_the_affine():
    np.testing.assert_allclose(voxel_spacing(AFFINE), [2.0, 0.5, 1.5])
    truth = empty()
    truth[2:4, 2:4, 2:4] = True  # 8 voxels of 2.0 * 0.5 * 1.5 = 1.5 mm^3
    row = score_case(truth, truth, AFFINE)
    assert row["true_ml"] == pytest.approx(8 * 1.5 / 1000) and row["pred_ml"] == row["true_ml"]
    assert (row["dice"], row["hd95_mm"], row["lesion_f1"]) == (1.0, 0.0, 1.0)


@pytest.mark.parametrize(("axis", "offset", "mm"), [(0, 3, 6.0), (1, 4, 2.0), (2, 2, 3.0)])
def test_hd95_of_parallel_planes_is_their_distance_in_mm(axis, offset, mm):
    """Two full planes `offset` voxels apart along `axis`: every surface voxel is exactly that far from the other."""
    pred, truth = empty(), empty()
    index = [slice(None)] * 3
    index[axis] = 4
    pred[tuple(index)] = True
    index[axis] = 4 + offset
    truth[tuple(index)] = True
    assert hd95(pred, truth, voxel_spacing(AFFINE)) == pytest.approx(mm)
    assert hd95(truth, pred, voxel_spacing(AFFINE)) == pytest.approx(mm)


def brute_force_hd95(pred: np.ndarray, truth: np.ndarray, spacing: np.ndarray) -> float:
    """The definition, written out: surface voxels (the mask minus its erosion), all pairwise distances in mm,
    each surface's nearest distances to the other, the 95th percentile (linear) of each direction, the larger."""

    def surface(mask: np.ndarray) -> np.ndarray:
        return np.argwhere(mask & ~ndimage.binary_erosion(mask)) * spacing

    a, b = surface(pred), surface(truth)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_of_offset_cubes_with_anisotropic_spacing():
    pred, truth = empty(), empty()
    pred[3:9, 3:9, 3:8] = True
    truth[5:11, 4:10, 3:8] = True  # shifted 2 voxels (4 mm) along x and 1 voxel (0.5 mm) along y
    spacing = voxel_spacing(AFFINE)
    got = hd95(pred, truth, spacing)
    assert got == pytest.approx(brute_force_hd95(pred, truth, spacing), rel=1e-5)
    # the x offset dominates: at least its 4 mm, less than the offset's full diagonal
    assert 4.0 <= got <= math.hypot(4.0, 0.5) + 1e-6
    assert hd95(pred, truth, 2 * spacing) == pytest.approx(2 * got, rel=1e-5)  # scales with the voxel size


def test_hd95_of_empty_masks():
    truth = empty()
    truth[5, 5, 5] = True
    assert hd95(empty(), empty(), (1, 1, 1)) == 0.0  # both empty: nothing to be far from
    assert math.isnan(hd95(empty(), truth, (1, 1, 1)))  # one empty: undefined
    assert math.isnan(hd95(truth, empty(), (1, 1, 1)))


# ---------------------------------------------------------------- lesion-wise detection


def test_lesion_wise_counts_on_a_hand_built_example():
    """Three true lesions: a cube (found), two voxels touching only at a corner (one lesion under 26-connectivity,
    found through one voxel), a lone voxel (missed). Predictions: over the cube, on one corner voxel, and a
    component far from any lesion (false positive)."""
    truth, pred = empty(), empty()
    truth[1:4, 1:4, 1:4] = True
    truth[8, 8, 8] = truth[9, 9, 9] = True  # corner-touching pair
    truth[13, 2, 10] = True  # missed
    pred[2:5, 2:5, 2:5] = True  # overlaps the cube
    pred[9, 9, 9] = True  # one voxel of the pair
    pred[12:14, 11:13, 0:2] = True  # false positive
    counts = lesion_detection(pred, truth)
    assert (counts.true_lesions, counts.pred_lesions) == (3, 3)
    assert (counts.tp, counts.fn, counts.fp) == (2, 1, 1)
    assert counts.f1 == pytest.approx(2 / (2 + (1 + 1) / 2))
    # the rule is 26-connectivity: with faces only, the pair would be two lesions and one of them missed
    assert ndimage.label(truth)[1] == 4


def test_match_lesions_counts_detections_slivers_and_false_positives():
    """Issue 27's lesion-wise rule on a 1 mm grid: a 64 mm^3 cube found, a 512 mm^3 cube missed with a voxel
    2 mm from its face (a sliver, not a false positive), and two components far from both (false positives)."""
    iso = np.eye(4)
    truth, pred = np.zeros((20, 20, 20), bool), np.zeros((20, 20, 20), bool)
    truth[1:5, 1:5, 1:5] = True  # 64 mm^3
    truth[10:18, 10:18, 10:18] = True  # 512 mm^3
    pred[3:6, 3:6, 3:6] = True  # overlaps the small cube
    pred[8, 12, 12] = True  # 2 mm from the big cube's face: near, not false
    pred[0:2, 18:20, 0:2] = True  # 8 voxels far from both
    pred[19, 0, 19] = True  # 1 voxel far from both
    match = match_lesions(pred, truth, iso)
    assert match.lesion_mm3.tolist() == [64.0, 512.0]
    assert match.detected.tolist() == [True, False]
    assert (match.pred_components, match.fp_components, match.near_components) == (4, 2, 1)
    assert match.fp_ml == pytest.approx(0.009) and match.pred_ml == pytest.approx(0.037)
    # one voxel further out, the sliver is a false positive; a tighter distance does the same
    assert match_lesions(pred, truth, iso, fp_distance_mm=1.9).fp_components == 3
    pred[8, 12, 12], pred[7, 12, 12] = False, True
    assert (match_lesions(pred, truth, iso).fp_components, match_lesions(pred, truth, iso).near_components) == (3, 0)


def test_match_lesions_uses_the_affine_voxel_sizes():
    """On AFFINE (voxel sizes 2.0, 0.5, 1.5 mm along the array axes): one step along axis 0 is 2 mm (near), two
    steps along axis 2 are 3 mm (false); volumes are voxels x 1.5 mm^3."""
    truth = empty()
    truth[6:8, 6:8, 4:6] = True  # 8 voxels = 12 mm^3
    near, far = empty(), empty()
    near[5, 6, 4] = True
    far[6, 6, 7] = True
    assert match_lesions(near, truth, AFFINE).lesion_mm3.tolist() == [pytest.approx(12.0)]
    assert (match_lesions(near, truth, AFFINE).fp_components, match_lesions(near, truth, AFFINE).near_components) == (0, 1)
    assert match_lesions(far, truth, AFFINE).fp_components == 1
    assert match_lesions(far, truth, AFFINE).fp_ml == pytest.approx(0.0015)


def test_lesion_detection_summary_bins_and_healthy_cases():
    iso = np.eye(4)
    truth, pred = np.zeros((20, 20, 20), bool), np.zeros((20, 20, 20), bool)
    truth[1:5, 1:5, 1:5] = True  # 64 mm^3, found
    truth[10:18, 10:18, 10:18] = True  # 512 mm^3, missed
    pred[3:6, 3:6, 3:6] = pred[0:2, 18:20, 0:2] = True  # one hit, one false positive of 8 voxels
    healthy_pred = np.zeros((20, 20, 20), bool)
    healthy_pred[2:4, 2:4, 2:4] = healthy_pred[15, 15, 15] = True  # 9 voxels in 2 components, all false
    matches = [match_lesions(pred, truth, iso), match_lesions(healthy_pred, np.zeros_like(truth), iso),
               match_lesions(np.zeros_like(truth), np.zeros_like(truth), iso)]  # fmt: skip
    summary = lesion_detection_summary(matches)
    bins = summary["bins"]
    assert bins["<100"] == {"lesions": 1, "detected": 1, "rate": 1.0}
    assert bins["500-1500"] == {"lesions": 1, "detected": 0, "rate": 0.0}
    assert bins["100-500"]["lesions"] == 0 and math.isnan(bins["100-500"]["rate"])
    assert (summary["cases"], summary["healthy_cases"]) == (1, 2)
    assert (summary["fp_components_per_case"], summary["max_fp_components"]) == (1.0, 1)
    assert summary["fp_ml_per_case"] == pytest.approx(0.008)
    assert summary["fp_components_per_healthy_case"] == 1.0  # 2 and 0
    assert summary["fp_ml_per_healthy_case"] == pytest.approx(0.0045) and summary["max_healthy_ml"] == pytest.approx(0.009)


def test_lesion_wise_edge_cases():
    truth = empty()
    truth[3:5, 3:5, 3:5] = True
    assert lesion_detection(empty(), empty()).f1 == 1.0  # nothing to find, nothing found
    nothing = lesion_detection(empty(), truth)
    assert (nothing.tp, nothing.fn, nothing.fp, nothing.f1) == (0, 1, 0, 0.0)
    alarm = lesion_detection(truth, empty())
    assert (alarm.tp, alarm.fn, alarm.fp, alarm.f1) == (0, 0, 1, 0.0)


# ---------------------------------------------------------------- a folder of labels, through the CLI


@pytest.fixture
def label_folder(tmp_path):
    """Labels of cases a (two lesions, label values 1 and 2) and b (healthy); predictions of both, in other dtypes."""
    labels, preds = tmp_path / "labels", tmp_path / "preds"
    la = np.zeros(SHAPE, np.uint8)
    la[2:6, 2:6, 2:6] = 1
    la[10:12, 8:10, 8:10] = 2
    pa = np.zeros(SHAPE, np.float32)
    pa[3:6, 2:6, 2:6] = 0.7  # a float mask from another tool: > 0 is lesion; misses the small lesion
    pb = np.zeros(SHAPE, np.int16)
    pb[0, 0, 0] = 3  # one false voxel on the healthy case
    write_mask(labels / "a.nii.gz", la)
    write_mask(labels / "b.nii.gz", np.zeros(SHAPE, np.uint8))
    write_mask(preds / "a.nii.gz", pa, dtype=np.float32)
    write_mask(preds / "b.nii.gz", pb, dtype=np.int16)
    write_mask(preds / "a_anomaly.nii.gz", np.random.default_rng(0).random(SHAPE), dtype=np.float32)  # ignored
    return preds, labels, la > 0, pa > 0


def test_score_a_folder_of_labels(label_folder, tmp_path, capsys):
    preds, labels, truth_a, pred_a = label_folder
    out = tmp_path / "scores"
    assert main(["score", "-p", str(preds), "-l", str(labels), "-o", str(out)]) == 0
    table = pd.read_csv(out / "per_case.csv")
    assert list(table.columns) == list(CASE_COLUMNS) and list(table["case"]) == ["a", "b"]
    a, b = table.iloc[0], table.iloc[1]
    inter = int((truth_a & pred_a).sum())
    assert a["dice"] == pytest.approx(2 * inter / (truth_a.sum() + pred_a.sum()))
    assert (a["tp"], a["fn"], a["fp"], a["true_lesions"]) == (1, 1, 0, 2)
    assert a["true_ml"] == pytest.approx(truth_a.sum() * 1.5 / 1000)
    assert (b["dice"], b["tp"], b["fn"], b["fp"], b["lesion_f1"]) == (0.0, 0, 0, 1, 0.0)
    assert math.isnan(b["hd95_mm"])  # a prediction on an empty label: no distance
    summary = strict_json(out / "summary.json")
    assert summary["n_cases"] == 2 and summary["n_hd95_defined"] == 1 and "hd95_mm" in summary["undefined"]
    assert summary["mean"]["dice"] == pytest.approx(table["dice"].mean())
    assert summary["mean"]["hd95_mm"] == pytest.approx(a["hd95_mm"])
    assert summary["pooled_lesions"] == {"true_lesions": 2, "pred_lesions": 2, "tp": 1, "fn": 1, "fp": 1}
    # F1 both ways, each named: of the summed counts 1 / (1 + (1 + 1) / 2); the mean of a's 1 / (1 + 1 / 2) and b's 0
    assert summary["lesion_f1_pooled"] == pytest.approx(0.5) and summary["lesion_f1_case_mean"] == pytest.approx(1 / 3)
    assert summary["lesion_f1_cohort"] == summary["lesion_f1_pooled"] and summary["convention"] == "default"
    # ISLES'22's other two columns: |true ml - pred ml| and |#true lesions - #predicted components|
    assert a["abs_volume_diff_ml"] == pytest.approx(abs(int(truth_a.sum()) - int(pred_a.sum())) * 1.5 / 1000)
    assert (a["lesion_count_diff"], b["lesion_count_diff"]) == (1, 1)
    assert b["abs_volume_diff_ml"] == pytest.approx(1.5 / 1000)
    assert summary["per_case"][1]["hd95_mm"] is None
    record = strict_json(out / "run.json")  # like the other verbs
    assert record["verb"] == "score" and record["settings"]["convention"] == "default"
    assert record["settings"]["labels"] == str(labels.resolve()) and record["argv"][1] == "score"
    printed = capsys.readouterr().out
    assert "DICE %" in printed and "HD95 mm" in printed and "per_case.csv" in printed


def test_missing_predictions_are_refused_or_scored_empty(label_folder, tmp_path, capsys):
    preds, labels, _, _ = label_folder
    (preds / "a.nii.gz").unlink()
    out = tmp_path / "scores"
    assert main(["score", "-p", str(preds), "-l", str(labels), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'a'" in err[0] and "--missing-as-empty" in err[0]
    assert not out.exists()
    assert main(["score", "-p", str(preds), "-l", str(labels), "-o", str(out), "--missing-as-empty"]) == 0
    a = pd.read_csv(out / "per_case.csv").set_index("case").loc["a"]
    assert bool(a["prediction_missing"]) and (a["dice"], a["tp"], a["fn"]) == (0.0, 0, 2)
    assert strict_json(out / "summary.json")["n_missing_predictions"] == 1


def test_a_prediction_without_a_label_is_refused(label_folder, tmp_path, capsys):
    preds, labels, _, _ = label_folder
    write_mask(preds / "c.nii.gz", np.zeros(SHAPE, np.uint8))
    assert main(["score", "-p", str(preds), "-l", str(labels), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(preds / "c.nii.gz") in err[0] and "no label file" in err[0]


@pytest.mark.parametrize("change", ["shape", "affine"])
def test_a_prediction_off_the_label_grid_is_refused(label_folder, tmp_path, capsys, change):
    preds, labels, _, _ = label_folder
    if change == "shape":
        write_mask(preds / "b.nii.gz", np.zeros((16, 14, 11), np.uint8))
    else:
        shifted = AFFINE.copy()
        shifted[0, 3] += 0.5  # half a millimetre off
        write_mask(preds / "b.nii.gz", np.zeros(SHAPE, np.uint8), affine=shifted)
    assert main(["score", "-p", str(preds), "-l", str(labels), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(preds / "b.nii.gz") in err[0] and str(labels / "b.nii.gz") in err[0] and "grid" in err[0]
    # within the tolerance (float32 round-off of a header) the grids are one
    nearly = AFFINE.copy()
    nearly[0, 3] += 1e-5
    write_mask(preds / "b.nii.gz", np.zeros(SHAPE, np.uint8), affine=nearly)
    assert main(["score", "-p", str(preds), "-l", str(labels), "-o", str(tmp_path / "out")]) == 0


# ---------------------------------------------------------------- a BraTS cohort: evaluate's masks, scored


@pytest.fixture(scope="module")
def model(tiny_model_d1: Path) -> Path:
    return tiny_model_d1


@pytest.fixture(scope="module")
def evaluated_cohort(model, brats_cohort, tmp_path_factory):
    """Two BraTS-layout cases (one with a lesion, the healthy one) evaluated as a raw cohort, masks written.

    Also the same cases through the evaluator's own writer and native DICE with masks set by hand
    (the truth shifted by two pixels, plus a blob), so the comparison does not rest on what an
    untrained model happens to segment. Returns (cohort, results, masks, hand masks, {case: hand
    native DICE}, (lesion case, healthy case)).
    """
    root = tmp_path_factory.mktemp("scoring")
    cohort_dir = root / "cohort"
    cohort_dir.mkdir()
    lesion_voxels = {}
    for case in sorted(p for p in brats_cohort.iterdir() if p.is_dir()):
        lesion_voxels[case.name] = int((np.asarray(nib.load(str(case / f"{case.name}_seg.nii.gz")).dataobj) > 0).sum())
    healthy = next(c for c, n in lesion_voxels.items() if n == 0)
    lesion = next(c for c, n in lesion_voxels.items() if n > 0)
    for case in (lesion, healthy):
        (cohort_dir / case).symlink_to(brats_cohort / case)
    results, masks, hand = root / "results", root / "masks", root / "hand"
    inferer = VolumeInferer(model, device="cpu")
    cohort = Cohort(cohort_dir, inferer)
    evaluator = CohortEvaluator(inferer, ["anofpdm-ddim"], results, outputs_dir=masks)
    by_hand = CohortEvaluator(inferer, ["anofpdm-ddim"], root / "unused", outputs_dir=hand)
    hand_dice = {}
    for case_id in cohort.case_ids:
        case = cohort.load(case_id)
        evaluator.evaluate_case(case)
        slices = np.roll(case.masks.numpy().astype(bool), 2, axis=1)
        slices[len(slices) // 2, 20:28, 20:28] = True
        arrays = {"anofpdm-ddim/mixed_masks": slices, "anofpdm-ddim/masks": slices, "anofpdm-ddim/maps": slices.astype(np.float32)}
        hand_masks = {"anofpdm-ddim": slices_to_volume(torch.from_numpy(slices).float(), case.geometry, "mask")}
        by_hand.write_outputs(case, arrays, hand_masks)
        hand_dice[case_id] = by_hand.native_scores(case, arrays, hand_masks)["anofpdm-ddim"]["dice_3d_native"]
    return cohort_dir, results, masks, hand, hand_dice, (lesion, healthy)


def test_score_reproduces_evaluates_native_dice(evaluated_cohort, tmp_path):
    cohort_dir, results, masks, hand, hand_dice, cases = evaluated_cohort
    assert sorted(p.name for p in masks.glob("*.nii.gz")) == sorted(
        [f"{c}.nii.gz" for c in cases] + [f"{c}_anomaly.nii.gz" for c in cases]
    )
    out = tmp_path / "scores"
    assert main(["score", "-p", str(masks), "-l", str(cohort_dir), "-o", str(out)]) == 0  # the BraTS layout's labels
    table = pd.read_csv(out / "per_case.csv").set_index("case")
    assert sorted(table.index) == sorted(cases)
    for case in cases:
        arrays, facts = load_case_results(results / "cases" / f"{case}.npz")
        assert bool(arrays["whole_volume"])  # raw cohorts are evaluated whole
        assert table.loc[case, "dice"] == pytest.approx(facts["anofpdm-ddim"]["dice_3d_native"], abs=1e-12), case
        assert Path(table.loc[case, "label"]) == cohort_dir / case / f"{case}_seg.nii.gz"
    lesion, healthy = cases
    assert table.loc[healthy, "true_ml"] == 0 and table.loc[healthy, "true_lesions"] == 0
    assert table.loc[lesion, "true_lesions"] >= 1

    # masks that overlap the lesion in part: the same numbers, and not trivial ones
    assert main(["score", "-p", str(hand), "-l", str(cohort_dir), "-o", str(tmp_path / "hand_scores")]) == 0
    table = pd.read_csv(tmp_path / "hand_scores" / "per_case.csv").set_index("case")
    for case in cases:
        assert table.loc[case, "dice"] == pytest.approx(hand_dice[case], abs=1e-12), case
    assert 0 < table.loc[lesion, "dice"] < 1 and table.loc[healthy, "dice"] == 0
    assert table.loc[lesion, "tp"] >= 1 and table.loc[healthy, "fp"] >= 1 and np.isfinite(table.loc[lesion, "hd95_mm"])


def test_pairing_with_a_brats_cohort_skips_anomaly_maps(evaluated_cohort):
    cohort_dir, _, masks, _, _, cases = evaluated_cohort
    pairs = pair_masks(masks, cohort_dir)
    assert [p.case_id for p in pairs] == sorted(cases)
    assert all(p.prediction == masks / f"{p.case_id}.nii.gz" for p in pairs)
