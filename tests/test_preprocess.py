"""``anofpdm preprocess``: the store it writes, bad inputs, resuming, wrong --dataset.

Cohorts here are small hand-made BraTS-named folders (32 x 32 x 10, a bright blob as the lesion),
preprocessed at ``--size 16``, so each run takes a fraction of a second.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from anofpdm_monai.data import MANIFEST_COLUMNS, SPLITS, PreprocessedStore, assign_splits
from pipelines.cli import main

SHAPE = (32, 32, 10)
CHANNELS = ("flair", "t1", "t1ce", "t2")
# LPS voxel order, like the BraTS21 files.
AFFINE = np.array([[-1.0, 0, 0, 15.5], [0, -1.0, 0, 15.5], [0, 0, 1.0, -4.5], [0, 0, 0, 1]])


def _save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _paths(root: Path, index: int) -> tuple[str, dict[str, Path], Path]:
    case = f"BraTS2021_{index:05d}"
    folder = root / case
    return case, {c: folder / f"{case}_{c}.nii.gz" for c in CHANNELS}, folder / f"{case}_seg.nii.gz"


def _write_case(root: Path, index: int, lesion: bool = True) -> str:
    """A head-shaped ellipsoid of brain with, optionally, a bright blob labelled 1/2/4."""
    rng = np.random.default_rng(index)
    case, channels, seg_path = _paths(root, index)
    grid = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    brain = ((grid[0] - 15.5) / 13) ** 2 + ((grid[1] - 15.5) / 12) ** 2 + ((grid[2] - 4.5) / 4.6) ** 2 < 1
    centre = (10 + index % 4 * 3, 12 + index % 3 * 2, 5)
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    seg = np.zeros(SHAPE, dtype=np.uint8)
    if lesion:
        seg[(distance < 5) & brain] = 2
        seg[(distance < 3) & brain] = 4
        seg[(distance < 1.5) & brain] = 1
    for k, path in enumerate(channels.values()):
        image = brain * (300 + 50 * k + 30 * rng.standard_normal(SHAPE)) + (seg > 0) * 400
        _save(path, np.clip(image, 0, None).astype(np.int16))
    _save(seg_path, seg)
    return case


def _cohort(root: Path, n: int = 4, healthy: tuple[int, ...] = (3,)) -> list[str]:
    return [_write_case(root, i, lesion=i not in healthy) for i in range(n)]


def _preprocess(raw: Path, store: Path, *extra: str) -> int:
    return main(["preprocess", "-i", str(raw), "-o", str(store), "--dataset", "brats", "--size", "16", *extra])


def _skip_lines(err: str) -> list[str]:
    return [line.strip() for line in err.replace("\r", "\n").splitlines() if line.strip().startswith("skipped ")]


# --- the store -------------------------------------------------------------------------------


def test_store_format(tmp_path, capsys):
    raw, store = tmp_path / "raw", tmp_path / "prep"
    cases = _cohort(raw, n=4, healthy=(3,))
    assert _preprocess(raw, store, "--split", "0.5,0.25,0.25", "--seed", "0") == 0
    out, err = capsys.readouterr()
    assert "4 patients" in out and "0 skipped" in out
    assert _skip_lines(err) == []

    manifest = pd.read_csv(store / "manifest.csv", dtype={"patient": str})
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert sorted(manifest["patient"].unique()) == cases
    settings = json.loads((store / "settings.json").read_text())
    assert settings["split"] == [0.5, 0.25, 0.25] and settings["seed"] == 0
    pre = settings["preprocess"]
    assert pre["image_size"] == 16 and pre["dataset"] == "brats"
    assert pre["channel_names"] == list(CHANNELS) and pre["map_channels"] == ["flair", "t2"]
    assert pre["percentile"] == 99.0 and pre["register_to"] is None
    assert pre["crop_foreground"] is True and pre["crop_margin_mm"] == 5.0, "the brain crop is the default chain"
    skipped = pd.read_csv(store / "skipped.csv")
    assert list(skipped.columns) == ["case_id", "reason"] and skipped.empty
    leftovers = [p for p in store.rglob(".*")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"

    for case in cases:
        images = np.load(store / "images" / f"{case}.npy")
        masks = np.load(store / "masks" / f"{case}.npy")
        meta = json.loads((store / "cases" / f"{case}.json").read_text())
        rows = manifest[manifest["patient"] == case]
        assert images.dtype == np.float16 and images.shape == (len(rows), 4, 16, 16)
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert images.min() == -1.0 and images.max() == 1.0, "each slice is min-max scaled to [-1, 1]"
        assert masks.dtype == np.uint8 and masks.shape == (len(rows), 16, 16)
        assert set(np.unique(masks)) <= {0, 1}
        assert rows["slice"].tolist() == meta["slices"], "manifest rows follow the array rows"
        assert set(meta["sources"]) == set(CHANNELS) and meta["has_label"] is True
        assert len(meta["slice_voxel_mm"]) == 3 and all(v > 0 for v in meta["slice_voxel_mm"])
        # Image-level label == the resized mask has any pixel.
        assert rows["label"].tolist() == [int(m.any()) for m in masks]
        assert rows["lesion_pixels"].tolist() == [int(m.sum()) for m in masks]
        assert rows["split"].nunique() == 1
    assert manifest.loc[manifest["patient"] == cases[3], "label"].eq(0).all(), "the healthy case has no lesion slice"
    assert manifest["label"].sum() > 0 and (manifest["label"] == 0).any()
    # Slices without brain (the outermost of the ellipsoid) were dropped.
    assert manifest.groupby("patient")["slice"].count().max() < SHAPE[2]

    # Patient-level split: no patient in two splits, and the store reads it back.
    splits = manifest.groupby("patient")["split"].agg(set)
    assert all(len(s) == 1 for s in splits)
    assert set(manifest["split"]) <= set(SPLITS)
    opened = PreprocessedStore(store)
    assert opened.num_channels == 4 and opened.config.image_size == 16
    images, masks, labels = opened.load_slices(opened.rows())
    assert images.shape == (len(manifest), 4, 16, 16)
    assert labels.tolist() == masks.flatten(1).any(1).long().tolist()


def test_seeded_patient_split_is_reproducible_and_disjoint(tmp_path):
    patients = [f"p{i:03d}" for i in range(40)]
    a = assign_splits(patients, (0.75, 0.05, 0.20), seed=3)
    assert a == assign_splits(list(reversed(patients)), (0.75, 0.05, 0.20), seed=3), "input order does not matter"
    assert a != assign_splits(patients, (0.75, 0.05, 0.20), seed=4)
    assert set(a) == set(patients)
    counts = pd.Series(a).value_counts().to_dict()
    assert counts == {"train": 30, "val": 2, "test": 8}
    assert assign_splits(["only"] * 1, (0.0, 0.0, 1.0), 0) == {"only": "test"}
    for bad in [(0.5, 0.5, 0.5), (1.2, -0.2, 0.0), (0.5, 0.5)]:
        with pytest.raises(ValueError, match="^split="):
            assign_splits(patients, bad, 0)

    # Same seed, same store manifest.
    raw = tmp_path / "raw"
    _cohort(raw, n=5, healthy=())
    assert _preprocess(raw, tmp_path / "s1", "--seed", "7", "--split", "0.6,0.2,0.2") == 0
    assert _preprocess(raw, tmp_path / "s2", "--seed", "7", "--split", "0.6,0.2,0.2") == 0
    m1 = pd.read_csv(tmp_path / "s1" / "manifest.csv")
    m2 = pd.read_csv(tmp_path / "s2" / "manifest.csv")
    pd.testing.assert_frame_equal(m1, m2)
    assert m1.groupby("split")["patient"].nunique().to_dict() == {"train": 3, "val": 1, "test": 1}


# --- bad inputs ------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _resave(path: Path, change) -> None:
    image = nib.load(str(path))
    array, affine = change(np.asarray(image.dataobj).astype(np.float32), image.affine.copy())
    path.unlink()
    _save(path, array, affine)


def _shift_affine(a, aff):
    aff[0, 3] += 0.5
    return a, aff


def _with_nan(a, aff):
    a[10, 10, 5] = np.nan
    return a, aff


def _four_d(a, aff):
    return np.stack([a, a], axis=-1), aff


BAD_INPUTS = {
    # name: (file to break, how, words the reason must contain)
    "missing channel": ("t1", lambda p: p.unlink(), "file not found"),
    "truncated": ("t2", _truncate, "truncated"),
    "zero bytes": ("t1ce", lambda p: p.write_bytes(b""), "empty file"),
    "not NIfTI (plain text)": ("flair", lambda p: p.write_text("subject,age\nBraTS,40\n"), "not a NIfTI"),
    "not NIfTI (gzip of text)": ("t1", lambda p: p.write_bytes(gzip.compress(b"not an image\n" * 40)), "not a NIfTI"),
    "shape differs": ("t2", lambda p: _resave(p, lambda a, aff: (a[:, :30], aff)), "shape"),
    "affine differs": ("t1", lambda p: _resave(p, _shift_affine), "affine differs"),
    "NaN voxels": ("flair", lambda p: _resave(p, _with_nan), "NaN"),
    "all-zero volume": ("t1ce", lambda p: _resave(p, lambda a, aff: (np.zeros_like(a), aff)), "zero"),
    "4-D file": ("t1ce", lambda p: _resave(p, _four_d), "4-D"),
    "2-D file": ("t2", lambda p: _resave(p, lambda a, aff: (a[:, :, 5], aff)), "2-D"),
    "unexpected label values": ("seg", lambda p: _resave(p, lambda a, aff: (np.where(a == 2, 3, a), aff)), "label values [3]"),
    "mask grid differs": ("seg", lambda p: _resave(p, lambda a, aff: (a[:, :, :8], aff)), "shape"),
}


def _break(raw: Path, index: int, name: str) -> Path:
    channel, how, _ = BAD_INPUTS[name]
    _, channels, seg = _paths(raw, index)
    target = seg if channel == "seg" else channels[channel]
    how(target)
    return target


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_skipped_with_one_line_naming_file_and_reason(tmp_path, capsys, name):
    raw, store = tmp_path / "raw", tmp_path / "prep"
    cases = _cohort(raw, n=3, healthy=())
    target = _break(raw, 1, name)
    reason = BAD_INPUTS[name][2]

    code = _preprocess(raw, store)
    _, err = capsys.readouterr()

    assert code != 0, "a skipped case makes the run fail without --allow-skips"
    lines = _skip_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"skipped {cases[1]}: ")
    assert target.name in lines[0] and reason in lines[0], lines[0]
    skipped = pd.read_csv(store / "skipped.csv")
    assert skipped["case_id"].tolist() == [cases[1]]
    assert target.name in skipped["reason"][0] and reason in skipped["reason"][0]
    # Every other case is finished and in the manifest; the bad one left nothing behind.
    manifest = pd.read_csv(store / "manifest.csv", dtype={"patient": str})
    assert sorted(manifest["patient"].unique()) == [cases[0], cases[2]]
    assert not (store / "cases" / f"{cases[1]}.json").exists()
    assert not (store / "images" / f"{cases[1]}.npy").exists()


def test_all_bad_inputs_in_one_cohort_with_allow_skips(tmp_path, capsys):
    raw, store = tmp_path / "raw", tmp_path / "prep"
    names = list(BAD_INPUTS)
    cases = _cohort(raw, n=len(names) + 2, healthy=())
    targets = {cases[i]: _break(raw, i, name) for i, name in enumerate(names)}
    good = cases[len(names):]

    assert _preprocess(raw, store, "--allow-skips") == 0
    out, err = capsys.readouterr()
    assert f"{len(names)} skipped" in out
    lines = _skip_lines(err)
    assert len(lines) == len(names)
    skipped = pd.read_csv(store / "skipped.csv", dtype=str)
    assert sorted(skipped["case_id"]) == sorted(targets)
    for case, reason in zip(skipped["case_id"], skipped["reason"]):
        assert targets[case].name in reason
        assert "\n" not in reason
    manifest = pd.read_csv(store / "manifest.csv", dtype={"patient": str})
    assert sorted(manifest["patient"].unique()) == good


def test_no_readable_case_is_an_error(tmp_path, capsys):
    raw = tmp_path / "raw"
    _cohort(raw, n=1, healthy=())
    _break(raw, 0, "zero bytes")
    assert _preprocess(raw, tmp_path / "prep", "--allow-skips") == 2
    assert "no case could be preprocessed" in capsys.readouterr().err


def test_wrong_dataset_flag_is_a_clear_error(tmp_path, capsys):
    raw = tmp_path / "raw"
    _cohort(raw, n=1)
    code = main(["preprocess", "-i", str(raw), "-o", str(tmp_path / "prep"), "--dataset", "atlas", "--size", "16"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("anofpdm preprocess: error: ")
    assert "--dataset='brats'" in err  # the reader's dataset='brats', as the flag
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "prep" / "manifest.csv").exists()


# --- resuming --------------------------------------------------------------------------------


def test_rerun_after_interruption_redoes_only_the_unfinished_case(tmp_path, capsys):
    raw, store = tmp_path / "raw", tmp_path / "prep"
    cases = _cohort(raw, n=4)
    assert _preprocess(raw, store) == 0
    first_manifest = (store / "manifest.csv").read_text()
    past = 1_000_000_000  # 2001: any rewrite would move the mtime
    for folder in ("images", "masks"):
        for case in cases:
            os.utime(store / folder / f"{case}.npy", ns=(past * 10**9, past * 10**9))
    # Interrupted while writing case 2: its arrays may exist but its done-marker does not; no manifest yet.
    (store / "cases" / f"{cases[2]}.json").unlink()
    (store / "manifest.csv").unlink()
    capsys.readouterr()

    assert _preprocess(raw, store) == 0
    for folder in ("images", "masks"):
        for case in cases:
            mtime = (store / folder / f"{case}.npy").stat().st_mtime_ns
            if case == cases[2]:
                assert mtime > past * 10**9, f"{folder}/{case}.npy was not redone"
            else:
                assert mtime == past * 10**9, f"{folder}/{case}.npy was rewritten"
    assert (store / "cases" / f"{cases[2]}.json").is_file()
    assert (store / "manifest.csv").read_text() == first_manifest


def test_rerun_with_other_settings_into_the_same_store_is_refused(tmp_path, capsys):
    """Finished cases are kept on a rerun, so a rerun at another size would mix slice sizes in one store."""
    raw, store = tmp_path / "raw", tmp_path / "prep"
    _cohort(raw, n=2)
    assert _preprocess(raw, store) == 0
    settings = (store / "settings.json").read_text()
    capsys.readouterr()
    code = main(["preprocess", "-i", str(raw), "-o", str(store), "--dataset", "brats", "--size", "8"])
    err = capsys.readouterr().err
    assert code != 0 and "image_size" in err and "-o" in err
    assert (store / "settings.json").read_text() == settings
    # Another split or seed only rebuilds the manifest: allowed.
    assert _preprocess(raw, store, "--split", "0.5,0.0,0.5", "--seed", "1") == 0


def test_store_made_before_the_crop_option_is_not_resumed_with_the_crop(tmp_path, capsys):
    """A settings.json without the crop keys was made with the whole-plane chain: resuming it must keep that chain."""
    raw, store = tmp_path / "raw", tmp_path / "prep"
    _cohort(raw, n=2)
    assert _preprocess(raw, store, "--no-crop") == 0
    settings = json.loads((store / "settings.json").read_text())
    assert settings["preprocess"]["crop_foreground"] is False
    for key in ("crop_foreground", "crop_margin_mm"):
        del settings["preprocess"][key]
    (store / "settings.json").write_text(json.dumps(settings))
    capsys.readouterr()
    assert _preprocess(raw, store) != 0
    assert "crop_foreground: False -> True" in capsys.readouterr().err
    assert _preprocess(raw, store, "--no-crop") == 0


def test_two_workers_write_the_same_store(tmp_path, capsys):
    raw = tmp_path / "raw"
    cases = _cohort(raw, n=3)
    _break(raw, 1, "NaN voxels")
    assert _preprocess(raw, tmp_path / "one") == 1
    assert _preprocess(raw, tmp_path / "two", "--workers", "2") == 1
    assert len(_skip_lines(capsys.readouterr().err)) == 2
    assert (tmp_path / "one" / "manifest.csv").read_text() == (tmp_path / "two" / "manifest.csv").read_text()
    for case in (cases[0], cases[2]):
        np.testing.assert_array_equal(
            np.load(tmp_path / "one" / "images" / f"{case}.npy"), np.load(tmp_path / "two" / "images" / f"{case}.npy")
        )


@pytest.mark.parametrize("split", ["0.5,0.5,0.5", "0.8,0.2", "a,b,c"])
def test_bad_split_is_refused_before_any_work(tmp_path, capsys, split):
    raw = tmp_path / "raw"
    _cohort(raw, n=1)
    assert _preprocess(raw, tmp_path / "prep", "--split", split) == 2
    err = capsys.readouterr().err
    assert "--split" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "prep").exists(), "nothing was preprocessed"
