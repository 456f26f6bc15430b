from __future__ import annotations

import nibabel as nib
import numpy as np

from data_prep.phantom import BRATS_SHAPE, PhantomCase, generate_cohort
from data_prep.readers import read_atlas, read_brats


def test_brats_layout_names_shapes_spacing_labels(brats_cohort):
    cases = sorted(p.name for p in brats_cohort.iterdir())
    assert cases == [f"BraTS2021_{i:05d}" for i in range(4)]
    lesion_cases = 0
    for case in cases:
        folder = brats_cohort / case
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted(f"{case}_{s}.nii.gz" for s in ("flair", "t1", "t1ce", "t2", "seg"))
        for path in folder.iterdir():
            image = nib.load(path)
            assert image.shape == BRATS_SHAPE
            assert np.allclose(image.header.get_zooms(), 1.0)
        seg = np.asarray(nib.load(folder / f"{case}_seg.nii.gz").dataobj)
        assert set(np.unique(seg)) <= {0, 1, 2, 4}
        lesion_cases += bool(seg.any())
        flair = np.asarray(nib.load(folder / f"{case}_flair.nii.gz").dataobj)
        assert (flair[seg > 0] > 0).all(), "lesions lie inside the skull-stripped brain"
        assert flair[0, 0, 0] == 0, "background is zero (skull-stripped)"
    assert lesion_cases == 3


def test_atlas_layout(tmp_path):
    generate_cohort(tmp_path, "atlas", cases=1, healthy_fraction=0.0, seed=7, progress=False)
    anat = tmp_path / "ATLAS_2/Training/R001/sub-r001s001/ses-1/anat"
    t1 = anat / "sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz"
    mask = anat / "sub-r001s001_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz"
    for path in (t1, mask):
        image = nib.load(path)
        assert image.shape == (197, 233, 189)
        assert np.allclose(image.header.get_zooms(), 1.0)
    labels = np.asarray(nib.load(mask).dataobj)
    assert set(np.unique(labels)) == {0, 1}
    image = np.asarray(nib.load(t1).dataobj).astype(float)
    brain = image > 0
    # Stroke lesions are T1-hypointense: darker than the brain's median.
    assert np.median(image[labels > 0]) < np.median(image[brain])
    records = read_atlas(tmp_path)
    assert [r.case_id for r in records] == ["sub-r001s001"] and records[0].label == mask


def test_same_seed_same_case_different_seed_different_anatomy():
    a, la = PhantomCase("atlas", 1, seed=3).generate()
    b, lb = PhantomCase("atlas", 1, seed=3).generate()
    c, _ = PhantomCase("atlas", 1, seed=4).generate()
    assert np.array_equal(a["t1"], b["t1"]) and np.array_equal(la, lb)
    assert not np.array_equal(a["t1"], c["t1"])


def test_brats_reader_records(brats_cohort):
    records = read_brats(brats_cohort)
    assert len(records) == 4
    assert list(records[0].channels) == ["flair", "t1", "t1ce", "t2"]
    assert all(r.label is not None and r.label.name.endswith("_seg.nii.gz") for r in records)
