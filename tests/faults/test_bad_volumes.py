"""Guarantee 1: a bad volume costs its own case only, with one clear line, in preprocess, segment and evaluate.

One BraTS-layout cohort holds one case per fault next to a good case (one of whose channels is
shifted by half the affine tolerance: within it, the same grid). Each verb runs once over the whole cohort (evaluate takes
the raw folder and preprocesses it with the model's chain); then, per verb and fault:

* the exit code is non-zero;
* exactly one line of stderr is about the case, and it names the bad file, the problem and the fix;
* the case has no output (store arrays / masks and maps / per-case results and table rows);
* every good case of the same run is complete.

The channel-count faults need an nnU-Net-layout cohort (BraTS fixes four channels by file name).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anofpdm_monai.io import load_nifti
from anofpdm_monai.io import AFFINE_TOLERANCE_MM

from . import volumes as V

# fault -> (spoil, problem pattern, fix pattern)
FAULTS = {
    "truncated": (V.spoil_truncated, r"truncated", r"re-export or re-download"),
    "notnifti": (V.spoil_not_nifti, r"not a NIfTI image", r"give a \.nii or \.nii\.gz volume"),
    "gztext": (V.spoil_gzipped_text, r"not a NIfTI image", r"give a \.nii or \.nii\.gz volume"),
    "zerobytes": (V.spoil_zero_bytes, r"empty file \(0 bytes\)", r"re-export or re-download"),
    "othershape": (V.spoil_other_shape, r"shape \(40, 46, 4\) differs from", r"resample them onto one grid"),
    "affinefar": (V.spoil_affine(1.5 * AFFINE_TOLERANCE_MM), r"affine differs from .* \(tolerance", r"resample them onto one grid"),
    "nanvoxel": (V.spoil_value(float("nan")), r"1 NaN or infinite voxels", r"fix or mask them"),
    "infvoxel": (V.spoil_value(float("inf")), r"1 NaN or infinite voxels", r"fix or mask them"),
    "allzero": (V.spoil_all_zero, r"every voxel is zero", r"re-export it or leave this case out"),
    "fourd": (V.spoil_4d, r"expected a 3-D volume, found 4-D", r"split 4-D series into one 3-D file per sequence"),
    "twod": (V.spoil_2d, r"expected a 3-D volume, found 2-D", r"give the whole 3-D volume"),
    "missing": (V.spoil_missing, r"file not found", r"check the path"),
    "labels": (V.spoil_labels, r"unexpected label values \[3\]", r"relabel the mask"),
    "fraclabels": (V.spoil_fractional_labels, r"unexpected label values \[0\.7", r"give the lesion mask"),
    # issue 23: headers that crashed the whole cohort (an SVD in Orientationd, an overflow in crop_planes)
    "nansrow": (V.spoil_header(srow_x=[float("nan"), 0, 0, 0]), r"affine \(sform, or qform and pixdim\) holds NaN", r"fix the header"),
    "zerocolumn": (V.spoil_zero_column, r"affine is degenerate", r"fix the header"),
    "nanpixdim": (V.spoil_header(sform_code=0, qform_code=1, pixdim_xyz=[float("nan"), 1, 1]), r"holds NaN or infinite", r"fix the header"),
    "tinypixdim": (V.spoil_header(sform_code=0, qform_code=1, pixdim_xyz=[1e-30, 1e-30, 1e-30]), r"voxel size .* lies outside \[0\.01, 100\.0\] mm", r"fix pixdim and xyzt_units"),
    "metres": (V.spoil_header(xyzt_units=1), r"voxel size \(1000.* mm \(header unit: meter\)", r"fix pixdim and xyzt_units"),
    "sclinf": (V.spoil_header(scl_slope=1.0, scl_inter=float("inf")), r"intensity scaling is not finite", r"set scl_slope to 1"),
    "zeroaxis": (V.spoil_header(dim=[3, 40, 48, 0, 1, 1, 1, 1]), r"an axis of length 0", r"re-export"),
    "extbomb": (V.spoil_extension_bomb, r"extensions", r"strip them"),
}
# The lesion mask is ground truth: preprocess and evaluate read it, segment does not (it is no input there).
MASK_FAULTS = ("labels", "fraclabels")
GOOD = ("good",)  # one of its channels is shifted by half the affine tolerance
VERBS = ("preprocess", "segment", "evaluate")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The raw cohort and, per fault, the file that was spoiled."""
    root = tmp_path_factory.mktemp("bad_cohort")
    spoiled = {}
    for i, (name, (spoil, _, _)) in enumerate(FAULTS.items()):
        spoiled[name] = spoil(*V.write_case(root, name, seed=i))
    # within the tolerance: the same grid
    V.spoil_affine(0.5 * AFFINE_TOLERANCE_MM)(*V.write_case(root, "good", seed=2))
    return root, spoiled


@pytest.fixture(scope="module")
def runs(cohort, tiny_model, tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    """verb -> (exit code, stderr, output folder), each verb run once over the whole cohort."""
    root, _ = cohort
    out = tmp_path_factory.mktemp("bad_runs")
    argvs = {
        "preprocess": ["preprocess", "-i", str(root), "-o", str(out / "preprocess"), "--dataset", "brats", "--size", "64"],
        "segment": ["segment", "-m", str(tiny_model), "-i", str(root), "-o", str(out / "segment"), "--device", "cpu"],
        "evaluate": ["evaluate", "-m", str(tiny_model), "-i", str(root), "-o", str(out / "evaluate"), "--device", "cpu",
                     "--methods", "anofpdm-ddim"],
    }  # fmt: skip
    results = {}
    for verb, argv in argvs.items():
        code, _, err = V.run_cli(argv)
        results[verb] = (code, err, out / verb)
    return results


def case_outputs(verb: str, folder: Path, case: str) -> list[Path]:
    """Every file the verb writes for ``case``."""
    if verb == "preprocess":
        return [folder / "images" / f"{case}.npy", folder / "masks" / f"{case}.npy", folder / "cases" / f"{case}.json"]
    if verb == "segment":
        return [folder / f"{case}.nii.gz", folder / f"{case}_anomaly.nii.gz"]
    return [folder / "cases" / f"{case}.npz"]


def error_lines(verb: str, err: str, case: str) -> list[str]:
    prefix = f"skipped {case}: " if verb == "preprocess" else f"anofpdm {verb}: error: {case}: "
    return [line for line in V.lines(err) if line.startswith(prefix) or f"/{case}/" in line]


@pytest.mark.parametrize("verb", VERBS)
def test_run_exits_nonzero(runs, verb):
    code, err, _ = runs[verb]
    assert code != 0, f"anofpdm {verb} exited 0 although cases failed:\n{err}"


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("verb", VERBS)
def test_bad_case_one_clear_line_and_no_output(runs, cohort, verb, fault):
    _, spoiled = cohort
    code, err, folder = runs[verb]
    _, problem, fix = FAULTS[fault]
    found = error_lines(verb, err, fault)
    if verb == "segment" and fault in MASK_FAULTS:
        assert found == [], "segment does not read lesion masks; it must not fail on one"
        assert all(p.is_file() for p in case_outputs(verb, folder, fault))
        return
    assert len(found) == 1, f"expected one line about {fault}, got {found}\nstderr:\n{err}"
    line = found[0]
    assert str(spoiled[fault]) in line, f"the line does not name the file {spoiled[fault]}: {line}"
    assert re.search(problem, line), f"the line does not say what is wrong ({problem!r}): {line}"
    assert re.search(fix, line), f"the line does not say how to fix it ({fix!r}): {line}"
    left = [p for p in case_outputs(verb, folder, fault) if p.exists()]
    assert left == [], f"outputs written for a failed case: {left}"
    assert [p for p in folder.rglob(f"{fault}*") if not p.name.startswith(".")] == []


@pytest.mark.parametrize("verb", VERBS)
def test_good_cases_of_the_same_run_complete(runs, verb):
    _, err, folder = runs[verb]
    for case in GOOD:
        assert error_lines(verb, err, case) == [], err
        for path in case_outputs(verb, folder, case):
            assert path.is_file(), f"{path} missing: a bad case stopped a good one"
    if verb == "preprocess":
        manifest = pd.read_csv(folder / "manifest.csv")
        assert set(manifest["patient"]) == set(GOOD)
        skipped = pd.read_csv(folder / "skipped.csv", dtype=str, keep_default_na=False)
        assert set(skipped["case_id"]) == set(FAULTS)
    elif verb == "segment":
        for case in GOOD:
            mask, _ = load_nifti(folder / f"{case}.nii.gz")
            assert mask.shape == V.SHAPE
    else:
        cases = pd.read_csv(folder / "cases.csv")
        assert set(cases["case"]) == set(GOOD)
        assert set(pd.read_csv(folder / "slices.csv")["case"]) == set(GOOD)


def test_affine_within_tolerance_is_the_same_grid(cohort, runs):
    """A channel shifted by half the tolerance is accepted by every verb (the tolerance is not zero)."""
    for verb in VERBS:
        _, err, folder = runs[verb]
        assert error_lines(verb, err, "good") == []
        assert all(p.is_file() for p in case_outputs(verb, folder, "good"))


# --- channel counts (nnU-Net layout) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nnunet_cohort(tmp_path_factory) -> Path:
    """Case ``ok`` with the model's four channels, ``five`` with an extra one, ``three`` with one missing."""
    root = tmp_path_factory.mktemp("nnunet_counts")
    names = {"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"}
    (root / "dataset.json").write_text(json.dumps({"channel_names": names, "labels": {"background": 0, "lesion": 1}}))
    for seed, (case, count) in enumerate((("ok", 4), ("five", 5), ("three", 3))):
        images, seg = V.brain_and_lesion(seed=seed)
        for i in range(count):
            V.save_nifti(root / "imagesTr" / f"{case}_{i:04d}.nii.gz", images[i % 4].astype(np.int16))
        V.save_nifti(root / "labelsTr" / f"{case}.nii.gz", (seg > 0).astype(np.uint8))
    return root


@pytest.mark.parametrize("verb", VERBS)
def test_channel_count(nnunet_cohort, tiny_model, tmp_path, verb):
    root = nnunet_cohort
    out = tmp_path / verb
    argv = {
        "preprocess": ["preprocess", "-i", str(root), "-o", str(out), "--dataset", "nnunet", "--size", "64"],
        "segment": ["segment", "-m", str(tiny_model), "-i", str(root / "imagesTr"), "-o", str(out), "--device", "cpu"],
        "evaluate": ["evaluate", "-m", str(tiny_model), "-i", str(root), "-o", str(out), "--device", "cpu",
                     "--methods", "anofpdm-ddim"],
    }[verb]  # fmt: skip
    code, _, err = V.run_cli(argv)
    assert code != 0
    prefix = "skipped {}: " if verb == "preprocess" else f"anofpdm {verb}: error: " + "{}: "
    five = [line for line in V.lines(err) if line.startswith(prefix.format("five"))]
    three = [line for line in V.lines(err) if line.startswith(prefix.format("three"))]
    assert len(five) == 1 and len(three) == 1, err
    assert re.search(r"five_000\d\.nii\.gz: .*has 5 channel file", five[0]), five[0]
    assert re.search(r"takes 4|have 4", five[0]) and re.search(r"give (one file per channel|every case the same)", five[0])
    assert "three_0003.nii.gz: file not found" in three[0] and "check the path" in three[0]
    assert [line for line in V.lines(err) if line.startswith(prefix.format("ok"))] == []
    for case, done in (("ok", True), ("five", False), ("three", False)):
        outputs = case_outputs(verb, out, case)
        assert all(p.is_file() == done for p in outputs), (case, outputs)
