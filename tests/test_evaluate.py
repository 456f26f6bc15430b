"""Tests of ``anofpdm evaluate`` and the merge of per-case results into the tables and Table 1.

Runs use the session's ``brats_store`` (64 px; test split: 1 patient, train split: 2 patients, one
of them healthy) and a copy of ``tiny_model`` with a well-conditioned D (untrained: the numbers
are meaningless, the files and their bookkeeping are what is tested). Metrics are checked against
hand-computed values on a results folder written by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anofpdm_monai.baselines import best_threshold_dice
from anofpdm_monai.reconstruction import tune_on_grid
from anofpdm_monai.data import PreprocessedStore
from anofpdm_monai.evaluation import Cohort, CohortEvaluator, load_case_results, merge_results, select_slices
from anofpdm_monai.inferers import VolumeInferer
from anofpdm_monai.methods import MethodContext, get_method
from anofpdm_monai.tuning import method_maps
from anofpdm_monai.metrics import brain_foreground
from anofpdm_monai.networks import HEALTHY, UNHEALTHY
from pipelines.cli import main

SLICE_COLUMNS = ["case", "slice", "label", "pred_label", "dice", "iou", "lesion_pixels", "pred_pixels", "sim", "t_e",
                 "quantile", "threshold", "method"]  # fmt: skip
TIMING = ("seconds", "seconds_per_slice")
CHEAP = ("--methods", "anofpdm-ddim,anofpdm-ddim-last,threshold")


@pytest.fixture(scope="module")
def model(tiny_model_d1: Path) -> Path:
    """``tiny_model`` with D = 1 (conftest.py says why)."""
    return tiny_model_d1


def evaluate(*args) -> int:
    return main(["evaluate", *[str(a) for a in args], "--device", "cpu"])


def without_timing(summary: dict) -> dict:
    return {m: {k: v for k, v in row.items() if k not in TIMING} for m, row in summary.items()}


def assert_same_results(results: Path, reference: Path) -> None:
    """slices.csv, cases.csv and summary.json agree, timings aside, floats up to round-off."""
    for table in ("slices.csv", "cases.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(results / table).drop(columns=["seconds"]),
            pd.read_csv(reference / table).drop(columns=["seconds"]),
            check_exact=False, rtol=1e-6, atol=1e-9,
        )  # fmt: skip
    got, want = (without_timing(json.loads((d / "summary.json").read_text())) for d in (results, reference))
    assert {m: sorted(r) for m, r in got.items()} == {m: sorted(r) for m, r in want.items()}
    for method, row in want.items():
        for key, value in row.items():
            if isinstance(value, float):
                assert got[method][key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), (method, key)
            else:
                assert got[method][key] == value, (method, key)


# ---------------------------------------------------------------- a store's test split


@pytest.fixture(scope="module")
def test_split_run(model, brats_store, tmp_path_factory):
    results = tmp_path_factory.mktemp("evaluate") / "results"
    rc = evaluate("-m", model, "-i", brats_store, "-o", results, *CHEAP, "--max-slices", 30)
    return rc, results


def test_tables_and_summary_of_a_store_split(test_split_run, brats_store):
    rc, results = test_split_run
    assert rc == 0
    for name in ("slices.csv", "cases.csv", "summary.json", "summary.md"):
        assert (results / name).is_file(), name
    slices = pd.read_csv(results / "slices.csv")
    assert set(SLICE_COLUMNS) <= set(slices.columns)
    assert slices.groupby("method").size().to_dict() == {"anofpdm-ddim": 30, "anofpdm-ddim-last": 30, "threshold": 30}
    # the ground truth of every row is the store's
    manifest = pd.read_csv(brats_store / "manifest.csv")
    merged = slices.merge(manifest, left_on=["case", "slice"], right_on=["patient", "slice"], suffixes=("", "_store"))
    assert len(merged) == len(slices) and (merged["split"] == "test").all()
    assert (merged["label"] == merged["label_store"]).all()
    assert (merged["lesion_pixels"] == merged["lesion_pixels_store"]).all()
    assert merged["label"].isin([HEALTHY, UNHEALTHY]).all()
    # AnoFPDM rows carry the per-slice decisions, the oracle threshold carries its cut
    anofpdm = slices[slices["method"] != "threshold"]
    assert anofpdm["pred_label"].isin([HEALTHY, UNHEALTHY]).all()
    assert anofpdm["t_e"].isin([0, 10, 20]).all()  # mean over the 2 map channels of t_e in {0, 20} (N = 40, k = 20)
    assert anofpdm["quantile"].between(0.9, 0.98 + 1e-6).all()
    assert np.isfinite(anofpdm[["sim", "threshold", "dice", "iou"]].to_numpy()).all()
    oracle = slices[slices["method"] == "threshold"]
    assert oracle["pred_label"].isna().all() and oracle["threshold"].nunique() == 1
    summary = json.loads((results / "summary.json").read_text())
    assert list(summary) == ["anofpdm-ddim", "anofpdm-ddim-last", "threshold"]
    for row in summary.values():
        for key in ("mixed_dice", "mixed_iou", "mixed_auprc", "unhealthy_dice", "unhealthy_iou", "unhealthy_auprc"):
            assert 0.0 <= row[key] <= 1.0, key
        assert row["n_slices"] == 30
    assert summary["anofpdm-ddim"]["calls_per_slice"] == 2 and summary["threshold"]["calls_per_slice"] == 0
    assert summary["threshold"]["uses_pixel_labels"] and not summary["anofpdm-ddim"]["uses_pixel_labels"]
    assert summary["threshold"]["oracle_threshold"] == pytest.approx(oracle["threshold"].iloc[0])
    markdown = (results / "summary.md").read_text()
    assert markdown.startswith("| method | mixed DICE | mixed IoU | mixed AUPRC | unhealthy DICE |")
    assert "| threshold † |" in markdown and "| anofpdm-ddim |" in markdown
    cases = pd.read_csv(results / "cases.csv")
    assert set(cases["method"]) == set(summary) and cases["case"].nunique() == 1
    # 30 sampled slices are not the patient's volume: no 3-D DICE, and the summary says why
    assert not cases["whole_volume"].any() and cases["dice_3d"].isna().all()
    assert summary["anofpdm-ddim"]["case_dice_3d"] is None and "sampled" in summary["anofpdm-ddim"]["undefined"]["case_dice_3d"]
    # before the cases, one line says what runs and how long it should take; after them, how long it took
    log = (results / "evaluate.log").read_text()
    plan = next(line for line in log.splitlines() if "plan: " in line)
    # one encoding (ddim) at N = 40, k = 20: 2 visited steps, guided and unguided
    assert "1 case(s), 30 slices; methods anofpdm-ddim, anofpdm-ddim-last, threshold; 4 network inputs per slice" in plan
    assert "estimated " in plan and "1 case(s) evaluated in " in log and "(planned " in log


def small_val_store(store: Path, folder: Path, per_label: int = 4) -> Path:
    """``store`` with only ``per_label`` healthy and unhealthy validation slices left in the val split.

    The arrays are linked, not copied; the other validation slices are relabelled 'train' (rows keep
    their places, which the store's indexing relies on).
    """
    folder.mkdir()
    for name in ("images", "masks", "cases", "settings.json"):
        (folder / name).symlink_to(store / name)
    manifest = pd.read_csv(store / "manifest.csv", dtype={"patient": str})
    val = manifest[manifest["split"] == "val"]
    keep = pd.concat([val[val["label"] == label].head(per_label) for label in (HEALTHY, UNHEALTHY)]).index
    manifest.loc[val.index.difference(keep), "split"] = "train"
    manifest.to_csv(folder / "manifest.csv", index=False)
    return folder


def test_ddib_baseline_is_tuned_on_validation_pixel_labels(model, brats_store, tmp_path):
    results = tmp_path / "results"
    val = small_val_store(brats_store, tmp_path / "val_store")
    args = ("-m", model, "-i", brats_store, "-o", results, "--methods", "anofpdm-ddim,ddib", "--tune", "ddib.depth=40",
            "--tune", "ddib.w=1,2")  # fmt: skip
    assert evaluate(*args, "--max-slices", 6, "--val-data", val) == 0
    cache = results / "tuning" / "ddib.json"
    tuned = json.loads(cache.read_text())
    assert tuned["uses_pixel_labels"] is True and Path(tuned["key"]["tuned_on"]) == val.resolve()
    assert tuned["key"]["grid"] == {"depth": [40], "w": [1, 2]} and len(tuned["result"]["grid"]) == 2
    setups = tuned["result"]["setups"]
    assert set(setups) == {"mixed", "unhealthy"} and all(t["params"]["depth"] == 40 for t in setups.values())
    run = json.loads((results / "run.json").read_text())
    assert run["settings"]["tuning"]["ddib"] == setups  # recorded in run.json
    summary = json.loads((results / "summary.json").read_text())
    assert summary["ddib"]["uses_pixel_labels"] and not summary["anofpdm-ddim"]["uses_pixel_labels"]
    markdown = (results / "summary.md").read_text()
    assert "| ddib † |" in markdown and "† uses pixel labels: ddib's depth, w and threshold are tuned on validation masks" in markdown
    slices = pd.read_csv(results / "slices.csv")
    ddib = slices[slices["method"] == "ddib"]
    assert len(ddib) == 6 and ddib["pred_label"].isna().all()
    arrays = np.load(results / "cases" / f"{ddib['case'].iloc[0]}.npz")
    mixed_maps = arrays["ddib/mixed_maps"] if "ddib/mixed_maps" in arrays else arrays["ddib/maps"]
    for key, maps, setup in (("ddib/masks", arrays["ddib/maps"], "unhealthy"), ("ddib/mixed_masks", mixed_maps, "mixed")):
        np.testing.assert_array_equal(arrays[key], (maps >= setups[setup]["threshold"]) & arrays["foreground"])
    # depth 40, stride 20: one inversion call and two guided decoding calls per map
    assert summary["ddib"]["calls_per_slice"] == 3 * (2 if "ddib/mixed_maps" in arrays else 1)

    # the cached tuning is reused for the same model and settings, and tuned again for another grid
    cache.write_text(json.dumps({**tuned, "result": {**tuned["result"], "setups": {
        k: {**v, "threshold": 123.0} for k, v in setups.items()}}}))  # fmt: skip
    ddib_only = ("-m", model, "-i", brats_store, "-o", results, "--methods", "ddib", "--max-slices", 2, "--val-data", val)
    assert evaluate(*ddib_only, "--tune", "ddib.depth=40", "--tune", "ddib.w=1,2") == 0
    assert json.loads(cache.read_text())["result"]["setups"]["mixed"]["threshold"] == 123.0
    assert evaluate(*ddib_only, "--tune", "ddib.depth=20", "--tune", "ddib.w=1") == 0
    retuned = json.loads(cache.read_text())
    assert retuned["result"]["setups"]["mixed"]["threshold"] != 123.0 and retuned["key"]["grid"]["depth"] == [20]
    # the mixed threshold is the mean-per-slice-DICE optimum (the Table-1 metric) of the ddib maps of exactly those validation slices
    store = PreprocessedStore(val)
    images, masks, _ = store.load_slices(store.rows("val"))
    inferer = VolumeInferer(model, device="cpu")
    context = MethodContext(inferer.model, inferer.settings)
    maps, _ = method_maps(get_method("ddib"), context, images, [0] * len(images), {"depth": 20, "w": 1})
    expected = tune_on_grid(lambda params: maps, [{"depth": 20, "w": 1}], masks.numpy(), brain_foreground(images).numpy())
    assert retuned["result"]["setups"]["mixed"]["threshold"] == pytest.approx(expected["mixed"]["threshold"])


def test_unknown_tuning_hyperparameter_is_one_line_naming_the_flag(model, brats_store, tmp_path, capsys):
    rc = evaluate("-m", model, "-i", brats_store, "-o", tmp_path / "r", "--methods", "ddib", "--tune", "ddib.depht=40")
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "--tune: ddib has no hyperparameter ['depht']" in err and "\n" not in err


# ---------------------------------------------------------------- metrics by hand

S = 4


def pixels(*coords: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((S, S), bool)
    for c in coords:
        mask[c] = True
    return mask


def write_case_npz(results: Path, case_id: str, arrays: dict, facts: dict) -> None:
    (results / "cases").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(results / "cases" / f"{case_id}.npz", facts=np.array(json.dumps(facts)), **arrays)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP by its definition (no ties): mean over positives of the precision at the positive's rank."""
    order = np.argsort(-scores, kind="stable")
    hits = labels[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].mean())


@pytest.fixture
def hand_results(tmp_path):
    """Two cases, three 4 x 4 slices, one method with health decisions plus the oracle threshold.

    Case A: slice 10 has lesion {(0,0),(0,1)}, predicted unhealthy with mask {(0,1),(1,1)};
    slice 11 is healthy, predicted healthy, mask {(2,2)}. Case B: slice 5 has lesion {(3,3)},
    predicted healthy, empty mask. Pixel (3,3) of case A is outside the brain, with the highest
    map value and intensity of all (it must not count).
    """
    rng = np.random.default_rng(0)
    values = rng.permutation(np.arange(1, 49)).reshape(3, S, S) / 100.0  # distinct map values in (0, 0.5)
    truth = np.stack([pixels((0, 0), (0, 1)), pixels(), pixels((3, 3))])
    fg = np.ones((3, S, S), bool)
    fg[0, 3, 3] = fg[1, 3, 3] = False
    maps = values.astype(np.float32)
    maps[0, 0, 0], maps[0, 0, 1], maps[2, 3, 3] = 0.455, 0.305, 0.205  # lesion pixels: high, middling, low
    maps[~fg] = 10.0
    intensity = (values / 2).astype(np.float32)  # brain below 0.25
    intensity[0, 0, 0], intensity[0, 0, 1], intensity[2, 3, 3], intensity[1, 1, 2] = 0.9, 0.8, 0.7, 0.75
    intensity[~fg] = 5.0
    masks = np.stack([pixels((0, 1), (1, 1)), pixels((2, 2)), pixels()])
    pred = np.array([True, False, False])
    parts = {"A": slice(0, 2), "B": slice(2, 3)}
    indices = {"A": np.array([10, 11]), "B": np.array([5])}
    for case_id, part in parts.items():
        n = part.stop - part.start
        arrays = {
            "truth": truth[part], "foreground": fg[part], "intensity": intensity[part],
            "slice_indices": indices[case_id], "whole_volume": np.array(True),
            "anofpdm-ddim/maps": maps[part], "anofpdm-ddim/masks": masks[part], "anofpdm-ddim/pred": pred[part],
            "anofpdm-ddim/mixed_masks": masks[part] & pred[part][:, None, None],
            "anofpdm-ddim/sim": np.full(n, 0.9), "anofpdm-ddim/t_e": np.zeros(n),
            "anofpdm-ddim/quantile": np.full(n, 0.98), "anofpdm-ddim/threshold": np.full(n, 0.3),
            "voxel_mm": np.array([1.0, 1.0, 3.0]), "anofpdm-ddim/health": np.where(pred[part], 0.2, 0.05).astype(np.float32),
            "anofpdm-ddim/health_threshold": np.float64(0.1), "anofpdm-ddim/divergence": np.zeros((n, 3), np.float32),
            "anofpdm-ddim/timesteps": np.array([0, 20, 40]),
        }  # fmt: skip
        write_case_npz(tmp_path, case_id, arrays, {"anofpdm-ddim": {"seconds": 1.5 * n, "calls": 600}})
    return tmp_path, dict(truth=truth, fg=fg, maps=maps, intensity=intensity)


def test_merge_results_matches_hand_computed_metrics(hand_results):
    results, a = hand_results
    summary = merge_results(results, ["A", "B"], ["anofpdm-ddim", "threshold"])
    ours = summary["anofpdm-ddim"]
    # per slice (unhealthy setup): A/10 DICE 2*1/(2+2) = 1/2, IoU 1/3; A/11 0, 0 (a mask on a healthy slice); B/5 0, 0.
    # mixed setup: A/11 and B/5 are predicted healthy, so their masks are emptied: A/11 scores 1, B/5 0.
    assert ours["mixed_dice"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert ours["mixed_iou"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert ours["unhealthy_dice"] == pytest.approx((0.5 + 0) / 2)
    assert ours["unhealthy_iou"] == pytest.approx((1 / 3 + 0) / 2)
    # labels U, H, U; predictions U, H, H
    assert (ours["accuracy"], ours["precision"], ours["recall"]) == pytest.approx((2 / 3, 1.0, 0.5))
    assert ours["calls_per_slice"] == 600 and ours["seconds_per_slice"] == pytest.approx(1.5)
    fg, truth = a["fg"], a["truth"]
    assert ours["mixed_auprc"] == pytest.approx(average_precision(a["maps"][fg], truth[fg]))
    unhealthy = np.array([True, False, True])
    assert ours["unhealthy_auprc"] == pytest.approx(
        average_precision(a["maps"][unhealthy][fg[unhealthy]], truth[unhealthy][fg[unhealthy]])
    )
    # not a trivial value, and one that counting the out-of-brain pixels would change
    assert 3 / fg.sum() < ours["mixed_auprc"] < 1
    assert ours["mixed_auprc"] != pytest.approx(average_precision(a["maps"].ravel(), truth.ravel()))

    # oracle threshold on brain intensities: cut 0.7 predicts {0.9, 0.8, 0.75, 0.7}: DICE 2*3/(4+3) = 6/7, the best
    oracle = summary["threshold"]
    assert oracle["oracle_threshold"] == pytest.approx(0.7) and oracle["oracle_direction"] == "high"
    # per slice: A/10 exact (1), A/11 one false pixel (0), B/5 exact (1); no health decision, so mixed = as is
    assert oracle["mixed_dice"] == pytest.approx(2 / 3) and oracle["mixed_iou"] == pytest.approx(2 / 3)
    assert oracle["unhealthy_dice"] == pytest.approx(1.0) and oracle["unhealthy_iou"] == pytest.approx(1.0)
    assert np.isnan(oracle["accuracy"]) and oracle["uses_pixel_labels"]
    assert oracle["mixed_auprc"] == pytest.approx(average_precision(a["intensity"][fg], truth[fg]))

    slices = pd.read_csv(results / "slices.csv")
    assert set(SLICE_COLUMNS) <= set(slices.columns) and len(slices) == 6
    row = slices[(slices["method"] == "anofpdm-ddim") & (slices["case"] == "A") & (slices["slice"] == 10)].iloc[0]
    assert (row["dice"], row["iou"], row["lesion_pixels"], row["pred_pixels"]) == pytest.approx((0.5, 1 / 3, 2, 2))
    assert (row["label"], row["pred_label"]) == (UNHEALTHY, UNHEALTHY)
    # 3-D DICE per case, mixed setup: A 2*1/(2+2); B 0; the oracle: A 2*2/(3+2), B 1
    cases = pd.read_csv(results / "cases.csv").set_index(["method", "case"])["dice_3d"]
    assert cases[("anofpdm-ddim", "A")] == pytest.approx(0.5) and cases[("anofpdm-ddim", "B")] == 0.0
    assert cases[("threshold", "A")] == pytest.approx(0.8) and cases[("threshold", "B")] == pytest.approx(1.0)
    assert summary["anofpdm-ddim"]["case_dice_3d"] == pytest.approx(0.25)
    md = (results / "summary.md").read_text()
    assert "| anofpdm-ddim | 50.0 | 44.4 |" in md and "| threshold † | 66.7 | 66.7 |" in md


def test_3d_dice_only_for_whole_volumes(hand_results, model, brats_store):
    """A case evaluated on a subset of its slices (--max-slices) gets no 3-D DICE: its sampled slices may hold
    none of its lesion, and an empty mask on them would score a perfect 1."""
    results, _ = hand_results
    arrays, facts = load_case_results(results / "cases" / "A.npz")
    lesion_free = {**arrays, "truth": np.zeros_like(arrays["truth"]), "anofpdm-ddim/mixed_masks": np.zeros_like(arrays["truth"]),
                   "anofpdm-ddim/masks": np.zeros_like(arrays["truth"]), "whole_volume": np.array(False)}  # fmt: skip
    write_case_npz(results, "C", lesion_free, facts)
    summary = merge_results(results, ["A", "B", "C"], ["anofpdm-ddim"])
    cases = pd.read_csv(results / "cases.csv").set_index("case")
    assert np.isnan(cases.loc["C", "dice_3d"]) and not cases.loc["C", "whole_volume"]
    assert cases.loc["A", "whole_volume"] and cases.loc["A", "dice_3d"] == pytest.approx(0.5)
    assert summary["anofpdm-ddim"]["case_dice_3d"] == pytest.approx(0.25)  # the whole cases A and B only
    # select_slices marks a case partial exactly when it drops a slice
    store = PreprocessedStore(brats_store)
    case = Cohort(brats_store, VolumeInferer(model, device="cpu"), "test").load(store.rows("test")["patient"].iloc[0])
    assert case.whole_volume
    assert select_slices(case, case.slice_indices).whole_volume
    assert not select_slices(case, case.slice_indices[:3]).whole_volume


def test_merge_results_thresholds_in_the_direction_the_evaluator_recorded(hand_results):
    """A T1w model records "low" (lesions darker): the oracle cuts from below even where "high" scores better."""
    results, a = hand_results
    for path in (results / "cases").glob("*.npz"):
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files if k != "facts"}
            facts = json.loads(str(data["facts"]))
        write_case_npz(results, path.stem, arrays, {**facts, "threshold": {"direction": "low"}})
    oracle = merge_results(results, ["A", "B"], ["threshold"])["threshold"]
    assert oracle["oracle_direction"] == "low"  # "best" would pick "high" (DICE 6/7), as the test above shows
    fg, truth = a["fg"], a["truth"]
    low = best_threshold_dice(a["intensity"][fg], truth[fg], direction="low")
    assert oracle["oracle_threshold"] == pytest.approx(low.threshold) and low.dice < 6 / 7


def test_hand_made_case_files_have_the_evaluators_format(hand_results, test_split_run):
    """Guards the test above: its case files hold what CohortEvaluator.evaluate_case writes, in the same dtypes."""
    hand_dir, _ = hand_results
    _, results = test_split_run
    real = np.load(next((results / "cases").glob("*.npz")))
    hand = np.load(hand_dir / "cases" / "A.npz")
    real_keys = {k for k in real.files if not k.startswith(("anofpdm-ddim-last/", "threshold/"))}
    assert set(hand.files) == real_keys
    for key in hand.files:
        assert hand[key].dtype.kind == real[key].dtype.kind, key
        assert hand[key].ndim == real[key].ndim, key
    assert set(json.loads(str(hand["facts"]))["anofpdm-ddim"]) == set(json.loads(str(real["facts"]))["anofpdm-ddim"])


def test_sklearn_agrees_with_the_hand_written_average_precision(hand_results):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    _, a = hand_results
    fg = a["fg"]
    assert average_precision(a["maps"][fg], a["truth"][fg]) == pytest.approx(
        sklearn_metrics.average_precision_score(a["truth"][fg], a["maps"][fg])
    )


# ---------------------------------------------------------------- --continue and --num-parts


@pytest.fixture(scope="module")
def train_split_run(model, brats_store, tmp_path_factory):
    """One uninterrupted run over the two patients of the train split (a cheap subset of slices)."""
    results = tmp_path_factory.mktemp("evaluate_train") / "whole"
    args = ("-m", model, "-i", brats_store, "--split", "train", *CHEAP, "--max-slices", 16)
    assert evaluate(*args, "-o", results) == 0
    return args, results


def test_two_parts_give_the_same_results_as_one(train_split_run, tmp_path, capsys):
    args, whole = train_split_run
    parts = tmp_path / "parts"
    assert evaluate(*args, "-o", parts, "--num-parts", 2, "--part-id", 0) == 0
    assert "1 of 2 cases done" in capsys.readouterr().out
    assert len(list((parts / "cases").glob("*.npz"))) == 1 and not (parts / "summary.json").exists()
    first = json.loads((parts / "run.part-0-of-2.json").read_text())
    assert first["part"]["state"] == "finished" and first["part"]["cases"] == 1 and not (parts / "run.json").exists()
    assert (parts / "evaluate.part-0-of-2.log").is_file(), "each part logs to its own file"
    assert evaluate(*args, "-o", parts, "--num-parts", 2, "--part-id", 1) == 0
    assert len(list((parts / "cases").glob("*.npz"))) == 2
    assert_same_results(parts, whole)
    merged = json.loads((parts / "run.json").read_text())  # written by the last part to finish
    assert [p["file"] for p in merged["parts"]] == ["run.part-0-of-2.json", "run.part-1-of-2.json"]
    assert all(p["state"] == "finished" for p in merged["parts"]) and "part_id" not in merged["settings"]


def test_a_part_with_other_settings_is_refused_naming_both_records(train_split_run, tmp_path, capsys):
    args, _ = train_split_run
    parts = tmp_path / "parts"
    assert evaluate(*args, "-o", parts, "--num-parts", 2, "--part-id", 0) == 0
    capsys.readouterr()
    assert evaluate(*args, "-o", parts, "--num-parts", 2, "--part-id", 1, "--seed", 5) != 0
    err = capsys.readouterr().err
    assert "run.part-1-of-2.json" in err and "run.part-0-of-2.json" in err and "seed" in err
    assert not (parts / "summary.json").exists() and len(list((parts / "cases").glob("*.npz"))) == 1


def test_parts_finish_when_max_slices_leaves_a_case_empty(model, brats_store, tmp_path):
    """With one slice over two patients, one part has nothing to do: the summary must still come."""
    args = ("-m", model, "-i", brats_store, "--split", "train", "--methods", "anofpdm-ddim", "--max-slices", 1)
    for part in (0, 1):
        assert evaluate(*args, "-o", tmp_path, "--num-parts", 2, "--part-id", part) == 0
    assert len(list((tmp_path / "cases").glob("*.npz"))) == 1
    assert json.loads((tmp_path / "summary.json").read_text())["anofpdm-ddim"]["n_slices"] == 1


def test_continue_after_a_crash_redoes_only_the_missing_case(train_split_run, tmp_path, capsys):
    args, whole = train_split_run
    crashed = tmp_path / "crashed"
    shutil.copytree(whole, crashed)  # keeps the mtimes
    npz = sorted((crashed / "cases").glob("*.npz"))
    assert len(npz) == 2
    lost, kept = npz
    lost.unlink()
    for name in ("slices.csv", "cases.csv", "summary.json", "summary.md"):
        (crashed / name).unlink()
    kept_mtime = kept.stat().st_mtime_ns
    assert evaluate(*args, "-o", crashed, "--continue") == 0
    assert kept.stat().st_mtime_ns == kept_mtime and lost.is_file()
    assert_same_results(crashed, whole)
    # without --continue both cases are done again
    assert evaluate(*args, "-o", crashed) == 0
    assert kept.stat().st_mtime_ns != kept_mtime


# ---------------------------------------------------------------- bad inputs


def test_model_folder_without_calibration(tiny_model, brats_store, tmp_path, capsys):
    uncalibrated = tmp_path / "model"
    uncalibrated.mkdir()
    for name in ("config.json", "model.pt"):
        shutil.copy(tiny_model / name, uncalibrated / name)
    assert evaluate("-m", uncalibrated, "-i", brats_store, "-o", tmp_path / "results", *CHEAP) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(uncalibrated / "calibration.json") in err[0] and "anofpdm calibrate" in err[0]


def test_results_folder_that_cannot_be_written(model, brats_store, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert evaluate("-m", model, "-i", brats_store, "-o", blocker / "results", *CHEAP) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(blocker / "results") in err[0] and "choose a writable --output" in err[0]


def test_each_encoding_runs_with_its_own_calibrated_budget(model, tmp_path):
    """DDIM and DDPM calibrations may pick different N and k; --steps/--stride override both."""
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    ddim = json.loads((folder / "calibration.json").read_text())
    (folder / "calibration_ddpm.json").write_text(json.dumps({**ddim, "encoding": "ddpm", "steps": ddim["steps"] // 2, "stride": 1}))
    methods = ["anofpdm-ddim", "anofpdm-ddpm"]
    evaluator = CohortEvaluator(VolumeInferer(folder, device="cpu"), methods, tmp_path / "unused")
    budgets = {enc: (inf.steps, inf.stride) for enc, inf in evaluator.slice_inferers.items()}
    assert budgets == {"ddim": (ddim["steps"], ddim["stride"]), "ddpm": (ddim["steps"] // 2, 1)}
    with pytest.warns(UserWarning, match="calibration was made with"):
        evaluator = CohortEvaluator(VolumeInferer(folder, device="cpu", steps=8, stride=4), methods, tmp_path / "unused")
    assert {inf.steps for inf in evaluator.slice_inferers.values()} == {8}
    assert {inf.stride for inf in evaluator.slice_inferers.values()} == {4}
