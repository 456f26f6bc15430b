from __future__ import annotations

import nibabel as nib
import numpy as np

from anofpdm_monai.readers import read_atlas, read_brats
from data_prep.phantom import BRATS_SHAPE, PhantomCase, generate_cohort


def test_brats_layout_names_shapes_spacing_labels(brats_cohort):
    cases = sorted(p.name for p in brats_cohort.iterdir() if p.is_dir())
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
    generate_cohort(tmp_path, "atlas", cases=1, healthy_fraction=0.0, seed=7, progress=False, whole_head=False)
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


# --- lesion kinds (issue 12) ---------------------------------------------------------------------
import json  # noqa: E402

import pytest  # noqa: E402
from scipy.ndimage import label as connected_components  # noqa: E402

from data_prep.phantom import MS_VOLUME_MM3, load_lesion_metadata, parse_lesions  # noqa: E402

KIND_CASES = {"tumour": 2, "ms": 10, "infiltrative": 2}


@pytest.fixture(scope="module")
def kind_cases():
    """One BraTS-layout case per lesion kind: (images, labels, phantom)."""
    cases = {}
    for kind, n in KIND_CASES.items():
        phantom = PhantomCase("brats", n, seed=11, kind=kind)
        images, labels = phantom.generate()
        cases[kind] = (images, labels, phantom)
    return cases


def _paste_tissue(phantom):
    return [phantom._paste(phantom.tissue[i].numpy()) for i in range(3)]  # wm, gm, csf


@pytest.mark.parametrize("kind", list(KIND_CASES))
def test_each_kind_has_labels_inside_the_brain(kind_cases, kind):
    images, labels, phantom = kind_cases[kind]
    assert labels.any()
    expected = {0, 1, 2, 4} if kind == "tumour" else {0, 2}
    assert set(np.unique(labels)) <= expected
    assert (images["flair"][labels > 0] > 0).all(), "ground truth inside the brain"
    assert all(info["kind"] == kind for info in phantom.lesion_info)
    total_ml = sum(info["volume_ml"] for info in phantom.lesion_info)
    assert total_ml == pytest.approx((labels > 0).sum() / 1000.0, rel=0.05)


def test_ms_plaques_small_ovoid_in_white_matter(kind_cases):
    _, labels, phantom = kind_cases["ms"]
    lesion = labels > 0
    wm, gm, csf = _paste_tissue(phantom)
    assert (wm[lesion] > gm[lesion]).mean() > 0.55, "plaques lie mostly in white matter"
    components, n = connected_components(lesion)
    assert n >= 3
    sizes = np.bincount(components.ravel())[1:]
    diameters = (6.0 * sizes / np.pi) ** (1.0 / 3.0)  # 1 mm voxels
    assert diameters.min() >= 1.5 and diameters.max() <= 17.0, diameters
    # issue 27: each plaque is grown to its drawn volume (log-uniform 30-1,500 mm^3), small ones included
    low, high = MS_VOLUME_MM3
    assert sizes.max() <= high and (sizes >= low).mean() >= 0.8, sizes
    assert (sizes < 100).any(), sizes
    assert sorted(sizes.tolist()) == sorted(round(info["volume_ml"] * 1000) for info in phantom.lesion_info)


def test_infiltrative_has_soft_borders(kind_cases):
    from scipy.ndimage import binary_dilation, binary_erosion

    images, labels, phantom = kind_cases["infiltrative"]
    flair = images["flair"].astype(float)
    wm, _, _ = _paste_tissue(phantom)
    lesion = labels > 0
    white = (wm > 0.9) & (flair > 0)
    centre = binary_erosion(lesion, iterations=4) & white
    border = lesion & ~binary_erosion(lesion, iterations=1) & white
    outside = binary_dilation(lesion, iterations=6) & ~binary_dilation(lesion, iterations=4) & white
    reference = np.median(flair[outside])
    centre_contrast = np.median(flair[centre]) / reference - 1
    border_contrast = np.median(flair[border]) / reference - 1
    assert centre_contrast > 0.08
    assert border_contrast < 0.75 * centre_contrast, (border_contrast, centre_contrast)


@pytest.mark.parametrize("kind", list(KIND_CASES))
def test_lesion_intensity_overlaps_normal_tissue(kind_cases, kind):
    images, labels, _ = kind_cases[kind]
    flair = images["flair"]
    brain, lesion = flair > 0, labels > 0
    normal, inside = flair[brain & ~lesion], flair[lesion]
    assert (inside <= normal.max()).mean() > 0.25, "lesion range overlaps the normal range"
    if kind != "tumour":  # today's tumours keep their (brighter) oedema; the new kinds overlap more
        low, high = np.percentile(normal, [1, 99])
        assert ((inside >= low) & (inside <= high)).mean() > 0.25
        assert (normal >= np.median(inside)).mean() > 0.02


def test_stroke_intensity_overlaps_normal_tissue():
    images, labels = PhantomCase("atlas", 2, seed=3).generate()
    t1 = images["t1"]
    brain, lesion = t1 > 0, labels > 0
    assert (t1[brain & ~lesion] <= np.median(t1[lesion])).mean() > 0.02


def test_metadata_names_kind_per_case_and_is_strict_json(tmp_path):
    ids = generate_cohort(tmp_path, "brats", cases=3, healthy_fraction=1 / 3, seed=2, workers=2,
                          progress=False, lesions="ms,infiltrative")  # fmt: skip
    text = (tmp_path / "phantom_lesions.json").read_text()
    metadata = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert metadata == load_lesion_metadata(tmp_path)
    assert sorted(metadata) == sorted(ids)
    assert sorted(m["kind"] for m in metadata.values()).count("healthy") == 1
    for case_id, entry in metadata.items():
        seg = np.asarray(nib.load(tmp_path / case_id / f"{case_id}_seg.nii.gz").dataobj)
        if entry["kind"] == "healthy":
            assert entry["lesions"] == [] and not seg.any()
            continue
        assert entry["kind"] in ("ms", "infiltrative") and entry["lesions"]
        assert set(np.unique(seg)) == {0, 2}
        for lesion in entry["lesions"]:
            assert lesion["kind"] == entry["kind"] and lesion["volume_ml"] >= 0
            i, j, k = lesion["centre_voxel"]
            assert 0 <= i < BRATS_SHAPE[0] and 0 <= j < BRATS_SHAPE[1] and 0 <= k < BRATS_SHAPE[2]
    assert load_lesion_metadata(tmp_path / "nowhere") == {}


def test_lesion_names_validated_per_layout():
    assert parse_lesions("brats", None) == ("tumour", "ms", "infiltrative")
    assert parse_lesions("atlas", None) == ("stroke",)
    assert parse_lesions("brats", "ms, tumour") == ("ms", "tumour")
    with pytest.raises(ValueError, match="allowed: tumour, ms, infiltrative"):
        parse_lesions("brats", "tumour,glioma")
    with pytest.raises(ValueError, match="allowed: stroke"):
        generate_cohort("/nonexistent", "atlas", cases=1, lesions="tumour", progress=False)
    with pytest.raises(ValueError):
        PhantomCase("brats", 1, seed=0, kind="stroke")


def test_atlas_default_stays_stroke(tmp_path):
    generate_cohort(tmp_path, "atlas", cases=1, healthy_fraction=0.0, seed=7, progress=False)
    metadata = load_lesion_metadata(tmp_path)
    assert [m["kind"] for m in metadata.values()] == ["stroke"]
