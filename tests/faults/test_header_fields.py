"""Guarantee 11: the output header keeps the input header's geometry fields as they were.

``save_like`` writes a mask or map on the input's grid. When the input's qform is unset (code 0) its
``pixdim`` and quaternion fields may disagree with the sform, and a sheared sform has no exact
quaternion. Recomputing them would change fields a viewer or a later tool reads; they are copied as
they were instead.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from anofpdm_monai.io import save_like

FIELDS = ("pixdim", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z",
          "qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "xyzt_units", "dim_info")  # fmt: skip
SHEARED = np.array([[1.0, 0.3, 0, -10], [0, 1.0, 0.2, -12], [0, 0, 2.5, 4], [0, 0, 0, 1]])
OBLIQUE = np.array([[0.9, -0.1, 0, 3], [0.1, 0.9, 0, -2], [0, 0, 3.0, 1], [0, 0, 0, 1]])


def _input(kind: str) -> nib.Nifti1Image:
    shape = (6, 5, 4)
    if kind == "qform_unset":  # pixdim says 2 x 2 x 2 mm, the sform 1 x 1 x 3 mm
        image = nib.Nifti1Image(np.ones(shape, np.float32), None)
        image.set_sform(np.diag([1.0, 1.0, 3.0, 1.0]), code=2)
        image.header.set_qform(None, code=0)
        image.header["pixdim"] = [1, 2, 2, 2, 1, 0, 0, 0]
        image.header["quatern_b"], image.header["qoffset_x"] = 0.25, 7.0
    elif kind == "sheared":
        image = nib.Nifti1Image(np.ones(shape, np.float32), SHEARED)
        image.set_sform(SHEARED, code=1)
        image.set_qform(OBLIQUE, code=1)
    else:  # both codes 0
        image = nib.Nifti1Image(np.ones(shape, np.float32), None)
        image.header.set_sform(None, code=0)
        image.header.set_qform(None, code=0)
        image.header["pixdim"] = [1, 0.7, 0.8, 0.9, 1, 0, 0, 0]
    return image


@pytest.mark.parametrize("kind", ["qform_unset", "sheared", "no_codes"])
def test_output_header_keeps_the_input_geometry_fields(tmp_path, kind):
    source = tmp_path / "in.nii.gz"
    nib.save(_input(kind), str(source))
    reference = nib.load(str(source))
    for dtype in (np.uint8, np.float32):
        out = save_like(np.zeros(reference.shape, dtype), reference, tmp_path / f"out_{np.dtype(dtype).name}.nii.gz", dtype)
        written = nib.load(str(out))
        for field in FIELDS:
            assert np.array_equal(written.header[field], reference.header[field]), (kind, field, written.header[field], reference.header[field])
        assert np.allclose(written.affine, reference.affine)
        assert written.get_data_dtype() == np.dtype(dtype)
