"""Guarantee 7: a case id becomes a file name only when it is safe and unique.

Case ids name every output file (``PREP/images/CASE.npy``, ``OUT/CASE.nii.gz``, ``RESULTS/cases/CASE.npz``).
An id from a manifest's ``case_id`` column, a folder name or a file name must therefore be made of
letters, digits, ``.``, ``_`` and ``-`` only, must not start with ``.`` (hidden names are anofpdm's
temporary files), and two inputs must never share one id. Otherwise the run stops before it writes
anything, with exit code 2 and one line that names the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anofpdm_monai.io import InputError
from anofpdm_monai.readers import read_atlas, read_brats, read_nnunet, records_for_inference

from . import volumes as V

BAD_IDS = ["../../escaped", "/tmp/anofpdm_abs_escape", "a/b", "..", ".", "", ".hidden", "a b", "x\\y", "é"]


def written_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def good_files(tmp_path_factory) -> dict[str, Path]:
    """One good BraTS-layout case whose files the manifests below point at."""
    root = tmp_path_factory.mktemp("ids_raw")
    channels, _ = V.write_case(root, "good", seed=1)
    return channels


def _manifest(path: Path, ids: list[str], channels: dict[str, Path]) -> Path:
    rows = ["case_id," + ",".join(channels)]
    rows += [f'"{i}",' + ",".join(str(p) for p in channels.values()) for i in ids]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("bad", BAD_IDS)
def test_unsafe_manifest_case_id_is_refused_before_anything_is_written(good_files, tmp_path, bad):
    work = tmp_path / "work"
    work.mkdir()
    csv = _manifest(work / "cohort.csv", ["ok1", bad], good_files)
    out = work / "deep" / "store"
    code, _, err = V.run_cli(["preprocess", "-i", str(csv), "-o", str(out), "--dataset", "manifest", "--size", "64"])
    assert code == 2, err
    lines = V.lines(err)
    assert len(lines) == 1, err
    assert str(csv) in lines[0] and "case_id" in lines[0], lines[0]
    assert "letters, digits" in lines[0], lines[0]
    assert written_files(out) == [], "nothing may be written when a case id is refused"
    assert [p for p in written_files(work) if p != csv] == [], "nothing may be written outside -o either"
    assert not Path("/tmp/anofpdm_abs_escape.npy").exists()


def test_segment_refuses_an_unsafe_manifest_case_id(good_files, tiny_model, tmp_path):
    csv = _manifest(tmp_path / "cohort.csv", ["../escaped"], good_files)
    out = tmp_path / "out"
    code, _, err = V.run_cli(["segment", "-m", str(tiny_model), "-i", str(csv), "-o", str(out), "--device", "cpu"])
    assert code == 2, err
    assert len(V.lines(err)) == 1 and str(csv) in err and "case_id" in err, err
    assert written_files(tmp_path) == [csv]


def test_unsafe_ids_derived_from_file_and_folder_names(tmp_path):
    """nnU-Net, BraTS, ATLAS and single-file ids come from names; a name that is no safe id is refused."""
    nnunet = tmp_path / "nnunet" / "imagesTr"
    for i in range(2):
        V.save_nifti(nnunet / f"bad id_{i:04d}.nii.gz", np.ones((4, 4, 4), np.float32))
    with pytest.raises(InputError, match=r"bad id_0000\.nii\.gz.*'bad id'.*rename"):
        read_nnunet(tmp_path / "nnunet")
    brats = tmp_path / "brats"
    V.write_case(brats, "case one")
    with pytest.raises(InputError, match=r"case one.*'case one'.*rename"):
        read_brats(brats)
    atlas = tmp_path / "atlas" / "sub-a b" / "ses-1" / "anat"
    V.save_nifti(atlas / "sub-a b_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz", np.ones((4, 4, 4), np.float32))
    with pytest.raises(InputError, match=r"'sub-a b'.*rename"):
        read_atlas(tmp_path / "atlas")
    single = V.save_nifti(tmp_path / "one" / ".hidden.nii.gz", np.ones((4, 4, 4), np.float32))
    with pytest.raises(InputError, match=r"'\.hidden'.*rename"):
        records_for_inference([single])


def test_store_with_an_unsafe_patient_id_is_refused(brats_store, tmp_path):
    """A preprocessed store's manifest names files too: an edited one must not lead writes outside -o."""
    import shutil

    from anofpdm_monai.data import PreprocessedStore

    store = tmp_path / "store"
    shutil.copytree(brats_store, store)
    manifest = store / "manifest.csv"
    text = manifest.read_text().splitlines()
    first = text[1].split(",")[0]
    manifest.write_text("\n".join([text[0]] + [line.replace(first, "../../x", 1) for line in text[1:]]) + "\n")
    with pytest.raises(InputError, match=r"manifest\.csv.*'\.\./\.\./x'"):
        PreprocessedStore(store)


def test_writers_refuse_an_unsafe_case_id_directly(tmp_path):
    """Defence in depth: the functions that turn an id into a path refuse it, whoever calls them."""
    from anofpdm_monai.data import case_done
    from anofpdm_monai.io import check_case_id

    for bad in BAD_IDS:
        with pytest.raises(InputError):
            check_case_id(bad, "somewhere")
        with pytest.raises(InputError):
            case_done(tmp_path, bad)
    for good in ("BraTS2021_00000", "sub-r001s001_ses-2", "P.01", "007"):
        assert check_case_id(good, "somewhere") == good


# --- duplicates ------------------------------------------------------------------------------------------------


def test_manifest_with_a_duplicated_case_id_is_refused(good_files, tmp_path):
    csv = _manifest(tmp_path / "cohort.csv", ["p1", "p2", "p1", "p3", "p3"], good_files)
    out = tmp_path / "store"
    code, _, err = V.run_cli(["preprocess", "-i", str(csv), "-o", str(out), "--dataset", "manifest", "--size", "64"])
    assert code == 2, err
    (line,) = V.lines(err)
    assert str(csv) in line and "duplicate" in line and "p1" in line and "p3" in line and "p2" not in line, line
    assert written_files(out) == []


def test_nnunet_files_of_one_case_id_in_two_folders_are_refused(tmp_path):
    images, _ = V.brain_and_lesion()
    files = []
    for folder in ("a", "b"):
        for i in range(4):
            files.append(V.save_nifti(tmp_path / folder / f"P_{i:04d}.nii.gz", images[i].astype(np.int16)))
    with pytest.raises(InputError, match=r"P_0000\.nii\.gz.*duplicate.*'P'.*a/P_0000.*b/P_0000"):
        records_for_inference(files)


def test_the_same_file_name_in_two_folders_is_refused(tmp_path):
    a = V.save_nifti(tmp_path / "a" / "scan.nii.gz", np.ones((4, 4, 4), np.float32))
    b = V.save_nifti(tmp_path / "b" / "scan.nii.gz", np.ones((4, 4, 4), np.float32))
    with pytest.raises(InputError, match=r"duplicate.*'scan'"):
        records_for_inference([a, b])


def _atlas_file(root: Path, subject: str, session: str) -> Path:
    return V.save_nifti(
        root / subject / session / "anat" / f"{subject}_{session}_space-MNI152NLin2009aSym_T1w.nii.gz",
        np.ones((4, 4, 4), np.float32),
    )


def test_atlas_subject_with_two_sessions_gets_two_ids(tmp_path):
    _atlas_file(tmp_path, "sub-r001s001", "ses-1")
    _atlas_file(tmp_path, "sub-r001s001", "ses-2")
    _atlas_file(tmp_path, "sub-r001s002", "ses-1")
    records = read_atlas(tmp_path)
    ids = sorted(r.case_id for r in records)
    assert ids == ["sub-r001s001_ses-1", "sub-r001s001_ses-2", "sub-r001s002"], ids
    by_id = {r.case_id: r for r in records}
    assert "ses-2" in str(by_id["sub-r001s001_ses-2"].channels["t1"])
    files = [r.channels["t1"] for r in records]
    assert sorted(r.case_id for r in records_for_inference(files)) == ids


def test_atlas_subject_twice_without_a_session_is_refused(tmp_path):
    for folder in ("x", "y"):
        V.save_nifti(tmp_path / folder / "sub-r001s001_space-MNI152NLin2009aSym_T1w.nii.gz", np.ones((4, 4, 4), np.float32))
    with pytest.raises(InputError, match=r"duplicate.*sub-r001s001"):
        read_atlas(tmp_path)


def test_nnunet_dataset_json_keys_and_list_are_checked(tmp_path):
    images, _ = V.brain_and_lesion()
    for i in range(4):
        V.save_nifti(tmp_path / "imagesTr" / f"P_{i:04d}.nii.gz", images[i].astype(np.int16))
    meta = tmp_path / "dataset.json"
    meta.write_text(json.dumps({"channel_names": {"1": "FLAIR", "2": "T1", "3": "T1ce", "4": "T2"}}))
    with pytest.raises(InputError, match=r"dataset\.json.*channel_names.*from \"0\""):
        read_nnunet(tmp_path)
    meta.write_text(json.dumps({"channel_names": ["FLAIR", "T1", "T1ce", "T2"]}))
    with pytest.raises(InputError, match=r"dataset\.json.*channel_names.*list"):
        read_nnunet(tmp_path)
    meta.write_text(json.dumps({"channel_names": {"0": "FLAIR", "1": "T1"}}))
    with pytest.raises(InputError, match=r"dataset\.json.*2 channels.*4"):
        read_nnunet(tmp_path)
    meta.write_text("{not json")
    with pytest.raises(InputError, match=r"dataset\.json.*not valid JSON"):
        read_nnunet(tmp_path)


# --- what segment -i accepts -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    for seed, case in enumerate(("S0", "S1")):
        V.write_case(root, case, seed=seed)
    return root


def test_segment_two_case_folders(small_cohort, tiny_model, tmp_path):
    out = tmp_path / "out"
    code, _, err = V.run_cli(["segment", "-m", str(tiny_model), "-i", str(small_cohort / "S0"), str(small_cohort / "S1"),
                              "-o", str(out), "--device", "cpu"])  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["S0.nii.gz", "S0_anomaly.nii.gz", "S1.nii.gz", "S1_anomaly.nii.gz"]


def test_segment_a_manifest(small_cohort, tiny_model, tmp_path):
    """A manifest CSV as -i; its columns may come in another order than the model's channels."""
    channels = {c: small_cohort / "S1" / f"S1_{c}.nii.gz" for c in reversed(V.CHANNELS)}
    csv = _manifest(tmp_path / "cohort.csv", ["S1"], channels)
    out = tmp_path / "out"
    code, _, err = V.run_cli(["segment", "-m", str(tiny_model), "-i", str(csv), "-o", str(out), "--device", "cpu"])
    assert code == 0, err
    direct = tmp_path / "direct"
    code, _, err = V.run_cli(["segment", "-m", str(tiny_model), "-i", str(small_cohort / "S1"), "-o", str(direct), "--device", "cpu"])
    assert code == 0, err
    a, b = (nib_data(folder / "S1_anomaly.nii.gz") for folder in (out, direct))
    assert np.array_equal(a, b), "the manifest's channels were not put in the model's order"


def test_segment_the_same_case_folder_twice_is_refused(small_cohort, tiny_model, tmp_path):
    out = tmp_path / "out"
    code, _, err = V.run_cli(["segment", "-m", str(tiny_model), "-i", str(small_cohort / "S0"), str(small_cohort / "S0"),
                              "-o", str(out), "--device", "cpu"])  # fmt: skip
    assert code == 2 and "duplicate case id 'S0'" in err and len(V.lines(err)) == 1, err
    assert not out.exists()


def nib_data(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)
