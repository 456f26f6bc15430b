"""Guarantee 15: headers that lie about geometry, units, extensions or size cost their own case only, in bounded memory.

The per-case faults (NaN srow, a zero affine column, NaN pixdim with only the qform, pixdim 1e-30,
metres, a non-finite scl_inter, an axis of length 0, an extension bomb) run through preprocess, segment
and evaluate in ``test_bad_volumes.py``. Here: the memory bounds, the spatial unit honoured, the per-case
voxel limit, and FreeSurfer ``.mgz`` / ANALYZE ``.hdr`` inputs written back as NIfTI on their own grid.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from anofpdm_monai.io import MAX_VOXELS_ENV, InputError, load_nifti
from anofpdm_monai.readers import records_for_inference
from anofpdm_monai.transforms import preprocess_case

from . import volumes as V


def peak_of(call) -> float:
    """Peak traced allocation (bytes) of ``call()``; an InputError it raises is returned, not raised."""
    tracemalloc.start()
    try:
        try:
            call()
        except InputError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_extension_bomb_is_refused_before_nibabel_reads_it(tmp_path):
    channels, seg = V.write_case(tmp_path, "A")
    path = V.spoil_extension_bomb(channels, seg)
    assert path.stat().st_size < 200_000
    with pytest.raises(InputError, match=r"extensions"):
        load_nifti(path)
    assert peak_of(lambda: load_nifti(path)) < 5e6


def test_tiny_voxels_are_refused_before_the_crop_margin_allocates(tmp_path):
    channels, seg = V.write_case(tmp_path, "A")
    for path in channels.values():  # every channel at 0.001 mm: the 5 mm margin would be 5,000 voxels a side
        V.spoil_header(sform_code=0, qform_code=1, pixdim_xyz=[0.001, 0.001, 0.001])({"flair": path}, seg)
    with pytest.raises(InputError, match=r"voxel size \(0\.001, 0\.001, 0\.001\) mm"):
        preprocess_case(list(channels.values()), None, image_size=64, crop_margin_mm=5.0)
    assert peak_of(lambda: preprocess_case(list(channels.values()), None, image_size=64, crop_margin_mm=5.0)) < 20e6


def test_the_spatial_unit_is_honoured(tmp_path):
    """0.001 m voxels are 1 mm voxels: the case preprocesses exactly as its mm twin."""
    mm, _ = V.write_case(tmp_path / "mm", "A")
    metres, _ = V.write_case(tmp_path / "m", "A")
    for path in metres.values():
        image = nib.load(str(path))
        affine = image.affine.copy()
        affine[:3] /= 1000.0
        V.spoil_header(srow_x=affine[0], srow_y=affine[1], srow_z=affine[2], pixdim_xyz=[0.001] * 3,
                       xyzt_units=1, qform_code=0)({"flair": path}, None)  # fmt: skip
    a = preprocess_case(list(mm.values()), None, image_size=64, crop_margin_mm=5.0)
    b = preprocess_case(list(metres.values()), None, image_size=64, crop_margin_mm=5.0)
    assert b.geometry.slice_voxel_mm == pytest.approx(a.geometry.slice_voxel_mm)
    assert np.array_equal(a.images.numpy(), b.images.numpy())


def test_the_voxel_limit_holds_per_case(tmp_path, monkeypatch):
    channels, seg = V.write_case(tmp_path, "A")  # 40 x 48 x 4 = 7,680 voxels per file, 38,400 for the case
    monkeypatch.setenv(MAX_VOXELS_ENV, "20000")
    load_nifti(channels["flair"])  # each file is within the limit
    with pytest.raises(InputError, match=r"the case's 5 files claim 38400 voxels together.*limit of 20000 voxels per case"):
        preprocess_case(list(channels.values()), seg, image_size=64)


def test_five_d_singleton_is_a_volume_and_zero_axis_says_so(tmp_path):
    images, _ = V.brain_and_lesion()
    five = V.save_nifti(tmp_path / "five.nii.gz", images[0][..., None, None])
    assert load_nifti(five)[0].shape == V.SHAPE


@pytest.mark.parametrize("kind", ["mgz", "analyze"])
def test_freesurfer_and_analyze_inputs_are_written_as_nifti_on_their_grid(tiny_model_d1, tmp_path, kind):
    channels, _ = V.write_case(tmp_path / "raw", "A")
    converted = {}
    for name, path in channels.items():
        image = nib.load(str(path))
        data = np.asarray(image.dataobj).astype(np.float32)
        if kind == "mgz":
            converted[name] = tmp_path / f"A_{name}.mgz"
            nib.save(nib.MGHImage(data, image.affine), str(converted[name]))
        else:
            converted[name] = tmp_path / f"A_{name}.hdr"
            nib.save(nib.AnalyzeImage(data, image.affine), str(converted[name]))
    table = tmp_path / "m.csv"
    pd.DataFrame([{"case_id": "A", **{c: str(p) for c, p in converted.items()}}]).to_csv(table, index=False)
    out = tmp_path / "out"
    code, _, err = V.run_cli(["segment", "-m", str(tiny_model_d1), "-i", str(table), "-o", str(out), "--device", "cpu"])
    assert code == 0, err
    reference = nib.load(str(converted["flair"]))
    for name in ("A.nii.gz", "A_anomaly.nii.gz"):
        written = nib.load(str(out / name))
        assert written.shape == reference.shape
        assert np.allclose(written.affine, reference.affine, atol=1e-5)


def test_a_single_hdr_or_mgz_file_is_named_after_its_stem(tmp_path):
    images, _ = V.brain_and_lesion()
    nib.save(nib.AnalyzeImage(images[0], V.LPS), str(tmp_path / "scan.hdr"))
    nib.save(nib.MGHImage(images[0], V.LPS), str(tmp_path / "brain.mgz"))
    ids = [r.case_id for r in records_for_inference([tmp_path / "scan.hdr", tmp_path / "brain.mgz"])]
    assert ids == ["scan", "brain"]
