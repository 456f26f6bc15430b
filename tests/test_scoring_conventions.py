"""``anofpdm score --convention``: each challenge's rules on hand-made pairs whose numbers are derived here.

The pairs (split, merge, miss, spurious, a lesion under BraTS 2023's size filter, a corner-touching pair,
empty, both empty) lie on an anisotropic grid (2.0 x 0.5 x 1.5 mm, 1.5 mm^3 voxels); every expected
count, DSC and penalty below is worked out by hand from the conventions' definitions (docs/score.md).
The last test checks ``brats2025`` against panoptica itself when it is installed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from anofpdm_monai.io import InputError
from anofpdm_monai.scoring import (
    CONVENTIONS,
    LabelSet,
    hd95,
    parse_label_sets,
    pooled_hd95,
    score_case,
    score_folder,
    surfel_hd95,
    voxel_spacing,
)
from pipelines.cli import main

SHAPE = (20, 18, 16)
SPACING = (2.0, 0.5, 1.5)
AFFINE = np.diag([*SPACING, 1.0])
VOXEL_MM3 = 2.0 * 0.5 * 1.5
OVERLAP = ("default", "isles22", "atlas")  # any-overlap matching


def empty() -> np.ndarray:
    return np.zeros(SHAPE, bool)


def box(*ranges: tuple[int, int]) -> np.ndarray:
    mask = empty()
    mask[tuple(slice(a, b) for a, b in ranges)] = True
    return mask


def cube(x: int, y: int = 2, z: int = 2, side: int = 4) -> np.ndarray:
    return box((x, x + side), (y, y + side), (z, z + side))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * int((a & b).sum()) / (int(a.sum()) + int(b.sum()))


# ---------------------------------------------------------------- HD95, three ways


@pytest.mark.parametrize("distance", [hd95, surfel_hd95, pooled_hd95])
@pytest.mark.parametrize(("axis", "offset"), [(0, 2), (1, 3), (2, 2)])
def test_every_hd95_of_a_shifted_cube_is_the_shift_in_mm(distance, axis, offset):
    """A 6-voxel cube and the same cube moved `offset` voxels along `axis`: the leading face of one is that far from
    the other's and no surface point is farther, and that face is over 5 % of either surface (1/6 of it) whether
    surfaces are counted in voxels, in voxels of both directions pooled, or weighted by area: HD95 = offset x spacing."""
    start = [3, 3, 3]
    truth = box(*((s, s + 6) for s in start))
    start[axis] += offset
    pred = box(*((s, s + 6) for s in start))
    assert distance(pred, truth, SPACING) == pytest.approx(offset * SPACING[axis])


def test_hd95_rules_on_empty_masks():
    lesion = cube(2)
    assert surfel_hd95(empty(), empty(), SPACING) == 0.0 and math.isinf(surfel_hd95(lesion, empty(), SPACING))
    assert math.isnan(pooled_hd95(empty(), empty(), SPACING)) and math.isinf(pooled_hd95(empty(), lesion, SPACING))


# ---------------------------------------------------------------- the hand-made pairs

T = cube(2)  # 4 x 4 x 4 = 64 voxels = 96 mm^3 (> BraTS 2023's 50 mm^3)


def split():
    """One true lesion, two predicted slabs on it (x = 2 and x = 5, two voxels apart: two components)."""
    return box((2, 3), (2, 6), (2, 6)) | box((5, 6), (2, 6), (2, 6)), T


def merge():
    """Two true cubes 3 voxels apart along x (x 2..5 and 9..12), one predicted bar over both and the gap."""
    return box((2, 13), (2, 6), (2, 6)), cube(2) | cube(9)


SMALL = box((14, 16), (14, 16), (12, 14))  # 8 voxels = 12 mm^3 (<= 50 mm^3)
SPURIOUS = box((14, 16), (2, 4), (12, 14))  # far from T and from SMALL (and from their 3-voxel dilations)


def miss_spurious_small():
    """T missed, SMALL found exactly, SPURIOUS predicted where there is nothing."""
    return SPURIOUS | SMALL, T | SMALL


def corner_pair():
    """Two 2-voxel cubes touching at one corner: one lesion with 26-connectivity, two with 6; only the first found."""
    first = box((2, 4), (2, 4), (2, 4))
    return first, first | box((4, 6), (4, 6), (4, 6))


def score(convention: str, pair) -> dict:
    pred, truth = pair
    return score_case(pred, truth, AFFINE, convention)


def test_split_lesion():
    pred, truth = split()
    halves = [box((2, 3), (2, 6), (2, 6)), box((5, 6), (2, 6), (2, 6))]
    for name in OVERLAP:  # the lesion touched: found; both slabs touch it: no false positive
        row = score(name, split())
        assert (row["true_lesions"], row["pred_lesions"], row["tp"], row["fn"], row["fp"], row["lesion_f1"]) == (1, 2, 1, 0, 0, 1.0)
        assert row["lesion_count_diff"] == 1 and math.isnan(row["lesion_dice"])
    row = score("brats2023", split())  # both slabs within the dilated lesion: its DSC is against their union
    assert (row["tp"], row["fn"], row["fp"], row["lesion_f1"]) == (1, 0, 0, 1.0)
    assert row["lesion_dice"] == pytest.approx(2 * 32 / (32 + 64))
    assert row["lesion_hd95_mm"] == pytest.approx(surfel_hd95(pred, truth, SPACING))
    row = score("brats2025", split())  # one to one: one slab matched (DSC 2*16/(16+64)), the other a false positive
    assert (row["tp"], row["fn"], row["fp"]) == (1, 0, 1)
    assert row["lesion_f1"] == pytest.approx(1 / (1 + 0.5)) and row["lesion_dice"] == pytest.approx(0.4)
    assert row["lesion_hd95_mm"] == pytest.approx(pooled_hd95(halves[0], truth, SPACING))
    assert row["dice"] == pytest.approx(dice(pred, truth))


def test_merged_lesions():
    pred, truth = merge()
    for name in OVERLAP:  # one component over two lesions detects both
        row = score(name, merge())
        assert (row["true_lesions"], row["pred_lesions"], row["tp"], row["fn"], row["fp"], row["lesion_f1"]) == (2, 1, 2, 0, 0, 1.0)
    # BraTS 2023: dilated 3 times, the cubes 3 voxels apart meet: one lesion of 128 voxels against the bar's 176
    row = score("brats2023", merge())
    assert (row["true_lesions"], row["tp"], row["fn"], row["fp"]) == (1, 1, 0, 0)
    assert row["lesion_dice"] == pytest.approx(2 * 128 / (128 + 176))
    assert row["lesion_count_diff"] == 1  # the raw components: 2 against 1
    # BraTS 2025: the bar goes to one cube (DSC 2*64/(64+176)); the other cube is missed
    row = score("brats2025", merge())
    assert (row["true_lesions"], row["tp"], row["fn"], row["fp"]) == (2, 1, 1, 0)
    assert row["lesion_f1"] == pytest.approx(2 / 3) and row["lesion_dice"] == pytest.approx(128 / 240)


def test_miss_spurious_and_the_size_filter():
    for name in OVERLAP:  # SMALL found, T missed, SPURIOUS false: F1 = 1 / (1 + (1 + 1) / 2)
        row = score(name, miss_spurious_small())
        assert (row["tp"], row["fn"], row["fp"], row["lesion_f1"]) == (1, 1, 1, 0.5)
        assert row["abs_volume_diff_ml"] == pytest.approx((64 + 8 - 16) * VOXEL_MM3 / 1000)
    # BraTS 2023: SMALL (12 mm^3) is not scored, and the component on it is no false positive; T missed
    # (DSC 0, HD95 374), SPURIOUS false (DSC 0, HD95 374): lesion-wise DSC 0 / 2, HD95 (374 + 374) / 2
    row = score("brats2023", miss_spurious_small())
    assert (row["true_lesions"], row["tp"], row["fn"], row["fp"], row["lesion_f1"]) == (1, 0, 1, 1, 0.0)
    assert (row["lesion_dice"], row["lesion_hd95_mm"]) == (0.0, 374.0)
    # without SMALL's component the same, without SPURIOUS: only the miss, HD95 374 / 1
    row = score_case(empty(), T | SMALL, AFFINE, "brats2023")
    assert (row["tp"], row["fn"], row["fp"], row["lesion_dice"], row["lesion_hd95_mm"]) == (0, 1, 0, 0.0, 374.0)
    # BraTS 2025: no size filter; SMALL matched exactly (DSC 1, HD95 0), T missed, SPURIOUS false
    row = score("brats2025", miss_spurious_small())
    assert (row["tp"], row["fn"], row["fp"], row["lesion_f1"]) == (1, 1, 1, 0.5)
    assert (row["lesion_dice"], row["lesion_hd95_mm"]) == (1.0, 0.0)


def test_connectivity_of_atlas():
    for name in ("default", "isles22"):  # 26-connected: one lesion, found
        row = score(name, corner_pair())
        assert (row["true_lesions"], row["tp"], row["fn"], row["lesion_f1"], row["lesion_count_diff"]) == (1, 1, 0, 1.0, 0)
    row = score("atlas", corner_pair())  # scipy.ndimage.label's faces only: two lesions, one missed
    assert (row["true_lesions"], row["tp"], row["fn"], row["lesion_count_diff"]) == (2, 1, 1, 1)
    assert row["lesion_f1"] == pytest.approx(1 / (1 + 0.5))


def test_empty_masks_per_convention():
    both = {name: score_case(empty(), empty(), AFFINE, name) for name in CONVENTIONS}
    for name in (*OVERLAP, "brats2023"):  # agreement: DICE 1, HD95 0, F1 1
        assert (both[name]["dice"], both[name]["hd95_mm"], both[name]["lesion_f1"]) == (1.0, 0.0, 1.0), name
    assert (both["brats2023"]["lesion_dice"], both["brats2023"]["lesion_hd95_mm"]) == (1.0, 0.0)
    assert all(math.isnan(both["brats2025"][k]) for k in ("dice", "hd95_mm", "lesion_f1", "lesion_dice", "lesion_hd95_mm"))
    for pred, truth in ((empty(), T), (T, empty())):  # one empty: HD95 undefined, or the challenge's penalty
        rows = {name: score_case(pred, truth, AFFINE, name) for name in CONVENTIONS}
        assert all(rows[name]["dice"] == 0.0 and rows[name]["lesion_f1"] == 0.0 for name in CONVENTIONS)
        assert all(math.isnan(rows[name]["hd95_mm"]) for name in OVERLAP)
        assert (rows["brats2023"]["hd95_mm"], rows["brats2023"]["lesion_dice"], rows["brats2023"]["lesion_hd95_mm"]) == (374.0, 0.0, 374.0)
        assert (rows["brats2025"]["hd95_mm"], rows["brats2025"]["lesion_dice"], rows["brats2025"]["lesion_hd95_mm"]) == (373.0, 0.0, 373.0)


# ---------------------------------------------------------------- label sets, the cohort and the CLI


def test_label_sets_are_parsed_and_refused_in_one_line():
    assert parse_label_sets(["WT=1,2,4", "4"]) == (LabelSet("WT", (1, 2, 4)), LabelSet("4", (4,)))
    assert parse_label_sets(None) == (LabelSet("lesion", None),)
    for bad in (["WT="], ["TC=1,x"], ["0,1"], ["A=1", "A=2"]):
        with pytest.raises(InputError, match="label_sets"):
            parse_label_sets(bad)


def write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, np.uint8), AFFINE), str(path))


def test_a_cohort_per_convention_and_label_set(tmp_path, capsys):
    """Three BraTS 2023-style cases (labels 1 necrosis, 2 oedema, 3 enhancing) scored as WT = 1,2,3 and ET = 3."""
    labels, preds = tmp_path / "labels", tmp_path / "preds"
    a_truth = np.where(cube(2), 2, 0)
    a_truth[3:5, 3:5, 3:5] = 3  # an enhancing core of 8 voxels
    a_pred = np.where(split()[0], 2, 0)  # oedema predicted in two slabs, no enhancing
    write(labels / "a.nii.gz", a_truth), write(preds / "a.nii.gz", a_pred)
    write(labels / "b.nii.gz", np.where(T | SMALL, 1, 0)), write(preds / "b.nii.gz", np.where(SPURIOUS | SMALL, 1, 0))
    write(labels / "c.nii.gz", empty()), write(preds / "c.nii.gz", empty())
    out = tmp_path / "scores"
    args = ["score", "-p", str(preds), "-l", str(labels), "-o", str(out), "--convention", "brats2023", "--label-sets", "WT=1,2,3", "ET=3"]
    assert main(args) == 0
    table = pd.read_csv(out / "per_case.csv")
    assert list(table["region"]) == ["WT", "ET"] * 3 and list(table["case"]) == ["a", "a", "b", "b", "c", "c"]
    wt = table[table["region"] == "WT"].set_index("case")
    et = table[table["region"] == "ET"].set_index("case")
    assert wt.loc["a", "lesion_dice"] == pytest.approx(2 / 3)  # the split lesion, as in test_split_lesion
    assert (wt.loc["b", "lesion_dice"], wt.loc["b", "lesion_hd95_mm"]) == (0.0, 374.0)  # miss + spurious, SMALL filtered
    assert (wt.loc["c", "lesion_dice"], wt.loc["c", "lesion_hd95_mm"], wt.loc["c", "dice"]) == (1.0, 0.0, 1.0)
    # ET: case a's 8-voxel core (12 mm^3) is under the filter and nothing is predicted: no lesion, no FP -> 1 / 0;
    # the whole-mask DSC and HD95 still see it: 0 and 374
    assert (et.loc["a", "lesion_dice"], et.loc["a", "lesion_hd95_mm"], et.loc["a", "dice"], et.loc["a", "hd95_mm"]) == (1.0, 0.0, 0.0, 374.0)
    summary = json.loads((out / "summary.json").read_text())
    by_region = summary["by_region"]
    assert summary["convention"] == "brats2023" and summary["regions"] == ["WT", "ET"]
    assert by_region["WT"]["mean"]["lesion_dice"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert by_region["WT"]["mean"]["lesion_hd95_mm"] == pytest.approx((wt.loc["a", "lesion_hd95_mm"] + 374 + 0) / 3)
    # F1 of case a 1, b 0 (tp 0, fn 1, fp 1), c 1: case mean 2/3; pooled 1 / (1 + (1 + 1) / 2) = 1/2
    assert by_region["WT"]["lesion_f1_case_mean"] == pytest.approx(2 / 3)
    assert by_region["WT"]["lesion_f1_pooled"] == pytest.approx(0.5)
    assert by_region["WT"]["lesion_f1_cohort"] == by_region["WT"]["lesion_f1_case_mean"]
    assert summary["mean"] == by_region["WT"]["mean"]  # the top level repeats the first label set
    printed = capsys.readouterr().out
    assert "region WT" in printed and "region ET" in printed and "LDSC %" in printed
    # the same masks under ISLES'22: any voxel > 0, one region
    score_folder(preds, labels, tmp_path / "isles", convention="isles22")
    table = pd.read_csv(tmp_path / "isles" / "per_case.csv").set_index("case")
    assert list(table["region"]) == ["lesion"] * 3 and list(table["lesion_f1"]) == [1.0, 0.5, 1.0]


def test_an_unknown_convention_is_refused(tmp_path, capsys):
    with pytest.raises(InputError, match="convention='brats21' is not one of default, isles22, atlas, brats2023, brats2025"):
        score_folder(tmp_path, tmp_path, tmp_path / "o", convention="brats21")
    with pytest.raises(SystemExit) as exit_code:
        main(["score", "-p", str(tmp_path), "-l", str(tmp_path), "-o", str(tmp_path / "o"), "--convention", "brats21"])
    assert exit_code.value.code == 2 and "--convention" in capsys.readouterr().err


# ---------------------------------------------------------------- brats2025 against panoptica


PAIRS = {"split": split, "merge": merge, "miss_spurious_small": miss_spurious_small, "corner_pair": corner_pair,
         "empty_prediction": lambda: (empty(), T), "empty_label": lambda: (T, empty()), "both_empty": lambda: (empty(), empty())}  # fmt: skip


@pytest.mark.parametrize("name", list(PAIRS))
def test_brats2025_equals_panoptica(name):
    """panoptica configured as the BraTS 2025 glioma evaluation (connected components, one-to-one assignment of the
    largest summed DSC over pairs with DSC > 0, DSC and HD95 per instance and globally), voxel spacing passed."""
    panoptica = pytest.importorskip("panoptica", reason="panoptica is not installed (pip install panoptica)")
    from panoptica.utils.edge_case_handling import EdgeCaseHandler, EdgeCaseResult, MetricZeroTPEdgeCaseHandling

    Metric = panoptica.Metric
    zero_tp = {
        Metric.DSC: MetricZeroTPEdgeCaseHandling(no_instances_result=EdgeCaseResult.NAN, default_result=EdgeCaseResult.ZERO),
        Metric.HD95: MetricZeroTPEdgeCaseHandling(no_instances_result=EdgeCaseResult.NAN, default_result=EdgeCaseResult.INF),
    }
    evaluator = panoptica.Panoptica_Evaluator(
        expected_input=panoptica.InputType.SEMANTIC,
        instance_approximator=panoptica.ConnectedComponentsInstanceApproximator(),
        instance_matcher=panoptica.MaxBipartiteMatching(matching_metric=Metric.DSC, matching_threshold=1e-6),
        edge_case_handler=EdgeCaseHandler(listmetric_zeroTP_handling=zero_tp),
        instance_metrics=[Metric.DSC, Metric.HD95], global_metrics=[Metric.DSC, Metric.HD95],
    )  # fmt: skip
    pred, truth = PAIRS[name]()
    result = next(iter(evaluator.evaluate(pred.astype(np.uint8), truth.astype(np.uint8), voxelspacing=SPACING, verbose=False).values()))
    theirs = result.to_dict()
    ours = score_case(pred, truth, AFFINE, "brats2025")

    def same(a: float, b: float) -> bool:
        b = 373.0 if b is not None and math.isinf(b) else b  # BraTS's penalty for panoptica's inf
        return (math.isnan(a) and (b is None or math.isnan(b))) or a == pytest.approx(b)

    assert (ours["tp"], ours["fn"], ours["fp"]) == (theirs["tp"], theirs["fn"], theirs["fp"])
    for mine, key in (("lesion_f1", "rq"), ("lesion_dice", "sq_dsc"), ("lesion_hd95_mm", "sq_hd95"), ("dice", "global_bin_dsc")):
        assert same(ours[mine], theirs[key]), (mine, ours[mine], key, theirs[key])
    # panoptica 2.1.7 computes its global (whole-mask) HD95 in voxels whatever the spacing (its instance HD95 uses
    # it); ours is in mm: on a 1 mm grid the two are the same
    in_voxels = score_case(pred, truth, np.eye(4), "brats2025")["hd95_mm"]
    assert same(in_voxels, theirs["global_bin_hd95"]), (in_voxels, theirs["global_bin_hd95"])
    assert voxel_spacing(AFFINE).tolist() == list(SPACING)


def test_brats2023_size_filter_measures_the_voxel_by_the_affine():
    # a sheared grid: column norms (1, sqrt 2, 1), but each voxel holds |det| = 1 mm^3
    sheared = np.eye(4)
    sheared[0, 1] = 1.0
    truth = np.zeros((10, 10, 10), bool)
    truth[2:6, 2:7, 2:4] = True  # 40 voxels: 40 mm^3 (<= 50, not scored), not 40 sqrt 2 = 57 mm^3
    row = score_case(np.zeros_like(truth), truth, sheared, "brats2023")
    assert (row["true_lesions"], row["fn"]) == (0, 0)
    assert row["true_ml"] == pytest.approx(0.040)
