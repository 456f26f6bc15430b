"""Dataset readers: every layout yields the right records; a wrong --dataset names the layout found."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anofpdm_monai.io import InputError
from anofpdm_monai.readers import (
    DEFAULT_MAP_CHANNELS,
    detect_layout,
    read_atlas,
    read_brats,
    read_cases,
    read_manifest,
    read_nnunet,
)

SHAPE = (8, 8, 4)


def _nifti(path: Path, value: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full(SHAPE, value, dtype=np.float32), np.eye(4)), str(path))
    return path


def _atlas_tree(root: Path) -> dict[str, tuple[Path, Path | None]]:
    """ATLAS v2.0 as shipped: Training (with masks) and Testing (no masks) under ATLAS_2/."""
    out = {}
    for split, site, subject, with_mask in [
        ("Training", "R001", "sub-r001s001", True),
        ("Training", "R001", "sub-r001s002", True),
        ("Training", "R002", "sub-r002s001", True),
        ("Testing", "R003", "sub-r003s001", False),
    ]:
        anat = root / "ATLAS_2" / split / site / subject / "ses-1" / "anat"
        stem = f"{subject}_ses-1_space-MNI152NLin2009aSym"
        t1 = _nifti(anat / f"{stem}_T1w.nii.gz")
        mask = _nifti(anat / f"{stem}_label-L_desc-T1lesion_mask.nii.gz", 0.0) if with_mask else None
        out[subject] = (t1, mask)
    # BIDS side files the reader must ignore.
    (root / "ATLAS_2" / "Training" / "dataset_description.json").write_text("{}")
    (root / "ATLAS_2" / "Training" / "R001" / "sub-r001s001" / "ses-1" / "anat" / "x.json").write_text("{}")
    return out


def _nnunet_tree(root: Path, channel_names: dict[str, str] | None = {"0": "T1", "1": "FLAIR"}) -> Path:
    for case in ("CASE_A", "CASE_B", "CASE_C"):
        _nifti(root / "imagesTr" / f"{case}_0000.nii.gz")
        _nifti(root / "imagesTr" / f"{case}_0001.nii.gz", 2.0)
    _nifti(root / "labelsTr" / "CASE_A.nii.gz", 0.0)
    _nifti(root / "labelsTr" / "CASE_C.nii.gz", 0.0)
    if channel_names is not None:
        (root / "dataset.json").write_text(
            json.dumps({"channel_names": channel_names, "labels": {"background": 0, "lesion": 1}, "numTraining": 3})
        )
    return root


def _brats_tree(root: Path, cases: tuple[str, ...] = ("BraTS2021_00001", "BraTS2021_00002")) -> Path:
    for case in cases:
        for c in ("flair", "t1", "t1ce", "t2", "seg"):
            _nifti(root / case / f"{case}_{c}.nii.gz")
    return root


# --- brats -----------------------------------------------------------------------------------


def test_brats_reader_on_phantom_cohort(brats_cohort):
    records = read_brats(brats_cohort)
    assert [r.case_id for r in records] == [f"BraTS2021_{i:05d}" for i in range(4)]
    for r in records:
        assert list(r.channels) == ["flair", "t1", "t1ce", "t2"], "channel order is fixed"
        for name, path in r.channels.items():
            assert path == brats_cohort / r.case_id / f"{r.case_id}_{name}.nii.gz" and path.is_file()
        assert r.label == brats_cohort / r.case_id / f"{r.case_id}_seg.nii.gz"
    assert detect_layout(brats_cohort) == "brats"
    assert read_cases(brats_cohort, "brats")[0].channels == records[0].channels
    assert DEFAULT_MAP_CHANNELS["brats"] == ("flair", "t2")


def test_brats_reader_uncompressed_and_missing_seg(tmp_path):
    case = "BraTS2021_00007"
    for c in ("flair", "t1", "t1ce", "t2"):
        _nifti(tmp_path / case / f"{case}_{c}.nii")
    (tmp_path / "notes").mkdir()  # a stray folder is not a case
    records = read_brats(tmp_path)
    assert len(records) == 1
    assert records[0].channels["t1ce"] == tmp_path / case / f"{case}_t1ce.nii"
    assert records[0].label is None


def test_brats_case_missing_a_channel_still_yields_a_record(tmp_path):
    """The missing file is reported when the case is loaded (and skipped), not silently dropped here."""
    _brats_tree(tmp_path)
    (tmp_path / "BraTS2021_00002" / "BraTS2021_00002_t1.nii.gz").unlink()
    (tmp_path / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz").unlink()
    records = {r.case_id: r for r in read_brats(tmp_path)}
    assert set(records) == {"BraTS2021_00001", "BraTS2021_00002"}
    assert not records["BraTS2021_00002"].channels["t1"].exists()
    assert not records["BraTS2021_00001"].channels["flair"].exists()


# --- atlas -----------------------------------------------------------------------------------


def test_atlas_reader_bids_tree(tmp_path):
    expected = _atlas_tree(tmp_path)
    records = read_atlas(tmp_path)
    assert sorted(r.case_id for r in records) == sorted(expected), "Training and Testing subjects, side files ignored"
    for r in records:
        t1, mask = expected[r.case_id]
        assert r.channels == {"t1": t1}
        assert r.label == mask
    assert detect_layout(tmp_path) == "atlas"
    assert DEFAULT_MAP_CHANNELS["atlas"] == ("t1",)
    # The subject folder itself is accepted as a root too.
    sub = read_cases(tmp_path / "ATLAS_2" / "Training" / "R002", "atlas")
    assert [r.case_id for r in sub] == ["sub-r002s001"]


# --- nnunet ----------------------------------------------------------------------------------


def test_nnunet_reader_with_dataset_json(tmp_path):
    _nnunet_tree(tmp_path)
    records = read_nnunet(tmp_path)
    assert [r.case_id for r in records] == ["CASE_A", "CASE_B", "CASE_C"]
    for r in records:
        assert list(r.channels) == ["t1", "flair"], "names from dataset.json channel_names, in index order"
        assert r.channels["t1"] == tmp_path / "imagesTr" / f"{r.case_id}_0000.nii.gz"
        assert r.channels["flair"] == tmp_path / "imagesTr" / f"{r.case_id}_0001.nii.gz"
    labels = {r.case_id: r.label for r in records}
    assert labels == {
        "CASE_A": tmp_path / "labelsTr" / "CASE_A.nii.gz",
        "CASE_B": None,
        "CASE_C": tmp_path / "labelsTr" / "CASE_C.nii.gz",
    }
    assert detect_layout(tmp_path) == "nnunet"
    # Pointing at imagesTr itself finds labelsTr beside it and dataset.json above it.
    inner = read_nnunet(tmp_path / "imagesTr")
    assert [(r.case_id, list(r.channels), r.label) for r in inner] == [
        (r.case_id, list(r.channels), r.label) for r in records
    ]


def test_nnunet_reader_without_dataset_json_names_channels_by_index(tmp_path):
    _nnunet_tree(tmp_path, channel_names=None)
    records = read_nnunet(tmp_path)
    assert list(records[0].channels) == ["ch0000", "ch0001"]


def test_nnunet_case_missing_a_channel_points_at_the_expected_file(tmp_path):
    _nnunet_tree(tmp_path)
    (tmp_path / "imagesTr" / "CASE_B_0001.nii.gz").unlink()
    records = {r.case_id: r for r in read_nnunet(tmp_path)}
    assert records["CASE_B"].channels["flair"] == tmp_path / "imagesTr" / "CASE_B_0001.nii.gz"
    assert not records["CASE_B"].channels["flair"].exists()


# --- manifest --------------------------------------------------------------------------------


def test_manifest_reader_relative_paths_and_optional_mask(tmp_path):
    data = tmp_path / "data"
    _nifti(data / "p1_t1.nii.gz")
    _nifti(data / "p1_t2.nii.gz")
    _nifti(data / "p1_mask.nii.gz", 0.0)
    absolute_t1 = _nifti(tmp_path / "elsewhere" / "p2_t1.nii.gz")
    _nifti(data / "p2_t2.nii.gz")
    csv = tmp_path / "cohort.csv"
    csv.write_text(
        "case_id,t1,t2,mask\n"
        "p1,data/p1_t1.nii.gz,data/p1_t2.nii.gz,data/p1_mask.nii.gz\n"
        f"p2,{absolute_t1},data/p2_t2.nii.gz,\n"
    )
    records = read_manifest(csv)
    assert [r.case_id for r in records] == ["p1", "p2"]
    assert list(records[0].channels) == ["t1", "t2"], "channel order is the column order"
    assert records[0].channels["t1"] == data / "p1_t1.nii.gz"
    assert records[0].label == data / "p1_mask.nii.gz"
    assert records[1].channels["t1"] == absolute_t1
    assert records[1].channels["t2"] == data / "p2_t2.nii.gz"
    assert records[1].label is None
    assert detect_layout(csv) == "manifest"
    assert [r.case_id for r in read_cases(csv, "manifest")] == ["p1", "p2"]


def test_manifest_without_mask_column_and_case_ids_kept_as_text(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("case_id,flair\n007,a.nii.gz\n")
    (record,) = read_manifest(csv)
    assert record.case_id == "007" and record.label is None and list(record.channels) == ["flair"]


@pytest.mark.parametrize(
    "text, message",
    [("patient,t1\np1,a.nii.gz\n", "case_id"), ("case_id,mask\np1,m.nii.gz\n", "no channel columns")],
)
def test_manifest_bad_columns(tmp_path, text, message):
    csv = tmp_path / "m.csv"
    csv.write_text(text)
    with pytest.raises(InputError, match=message):
        read_manifest(csv)


# --- wrong --dataset -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, found, wrong",
    [
        (_brats_tree, "brats", "atlas"),
        (_brats_tree, "brats", "nnunet"),
        (_brats_tree, "brats", "manifest"),
        (_atlas_tree, "atlas", "brats"),
        (_atlas_tree, "atlas", "nnunet"),
        (_nnunet_tree, "nnunet", "brats"),
        (_nnunet_tree, "nnunet", "atlas"),
    ],
)
def test_wrong_dataset_names_the_layout_found(tmp_path, build, found, wrong):
    build(tmp_path)
    assert detect_layout(tmp_path) == found
    with pytest.raises(InputError) as err:
        read_cases(tmp_path, wrong)
    message = str(err.value)
    assert f"'{found}'" in message and f"dataset={found!r}" in message and "--" not in message, message
    assert f"--dataset={found!r}" in err.value.renamed({"dataset": "--dataset"})
    assert "\n" not in message


def test_read_cases_unknown_dataset_missing_root_empty_folder_and_csv_as_folder(tmp_path):
    with pytest.raises(ValueError, match="not one of"):
        read_cases(tmp_path, "kaggle")
    with pytest.raises(InputError, match="not found"):
        read_cases(tmp_path / "nope", "brats")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="docs/data.md"):
        read_cases(empty, "brats")
    assert detect_layout(empty) is None
    csv = tmp_path / "m.csv"
    csv.write_text("case_id,t1\n")
    with pytest.raises(InputError, match="dataset='manifest'"):
        read_cases(csv, "brats")
