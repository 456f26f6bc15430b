"""Property test over NIfTI headers: ``anofpdm segment`` keeps the input's geometry, or refuses in one line.

Hypothesis draws small cases (6..20 voxels per axis, so one example costs well under a second with the micro
model) with varied voxel types (uint8, int16, float32, float64), anisotropic pixdims (0.5..4 mm), qform and
sform codes 0..4 (0 included, independently), and affines built from rotations, shears and a flip (left-handed).
All four channel files of a case share one header. For every such input, exactly one of:

* ``segment`` exits 0, and both outputs (``CASE.nii.gz``, ``CASE_anomaly.nii.gz``) have the input's shape,
  affine, qform/sform codes (and coded transforms) and zooms (to 1e-5);
* ``segment`` exits 2 with exactly one line on stderr, naming the file, and no traceback.

Nothing else: no other exit code, no exception out of ``main``. The seed is fixed and the example database is off,
so a run in CI draws the same examples as a run here.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_segment import BRATS, make_model, phantom  # noqa: E402
from test_segment import rotation as rotation_matrix  # noqa: E402

from pipelines.cli import main  # noqa: E402

CASE = "case"
DTYPES = (np.uint8, np.int16, np.float32, np.float64)


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("header_property") / "micro")


# ---------------------------------------------------------------- strategies


@st.composite
def headers(draw) -> dict:
    """One case's header: shape, dtype, pixdims, codes and an affine (rotation @ shear @ flip @ diag(pixdims))."""
    shape = tuple(draw(st.integers(6, 20)) for _ in range(3))
    dtype = draw(st.sampled_from(DTYPES))
    zooms = [draw(st.floats(0.5, 4.0, allow_nan=False, allow_infinity=False)) for _ in range(3)]
    linear = np.diag(zooms)
    flip = draw(st.sampled_from([None, 0, 1, 2]))  # one axis mirrored: a left-handed affine
    if flip is not None:
        linear = np.diag([-1.0 if a == flip else 1.0 for a in range(3)]) @ linear
    shear = np.eye(3)
    if draw(st.booleans()):
        shear[0, 1], shear[0, 2], shear[1, 2] = (draw(st.floats(-0.5, 0.5)) for _ in range(3))
    rotation = np.eye(3)
    for axis in range(3):
        rotation = rotation_matrix(axis, draw(st.floats(-180.0, 180.0))) @ rotation
    affine = np.eye(4)
    affine[:3, :3] = rotation @ shear @ linear
    affine[:3, 3] = [draw(st.floats(-120.0, 120.0)) for _ in range(3)]
    return {
        "shape": shape,
        "dtype": dtype,
        "zooms": zooms,
        "affine": affine,
        "qcode": draw(st.integers(0, 4)),
        "scode": draw(st.integers(0, 4)),
    }


def _write_case(folder: Path, h: dict) -> list[Path]:
    """The four channel files (BraTS names) of a phantom case, all with the header ``h``."""
    channels, _, _ = phantom(shape=h["shape"])
    paths = []
    for name, array in zip(BRATS, channels):
        image = nib.Nifti1Image(array.astype(h["dtype"]), None)
        image.set_sform(h["affine"], code=h["scode"])
        image.set_qform(h["affine"], code=h["qcode"])  # nibabel strips shears from the quaternion
        image.header.set_zooms(h["zooms"])  # pixdim as drawn (with a shear it differs from the column norms)
        path = folder / f"{CASE}_{name}.nii.gz"
        nib.save(image, str(path))
        paths.append(path)
    return paths


# ---------------------------------------------------------------- the property


def _assert_same_geometry(out: nib.Nifti1Image, source: nib.Nifti1Image, what: str) -> None:
    assert out.shape == source.shape, what
    assert np.array_equal(out.affine, source.affine), (what, out.affine, source.affine)
    for (t_out, c_out), (t_in, c_in), kind in ((out.get_qform(coded=True), source.get_qform(coded=True), "qform"),
                                               (out.get_sform(coded=True), source.get_sform(coded=True), "sform")):  # fmt: skip
        assert int(c_out) == int(c_in), (what, kind, c_out, c_in)
        if t_in is None:
            assert t_out is None, (what, kind)
        else:
            np.testing.assert_allclose(t_out, t_in, atol=1e-5, rtol=0, err_msg=f"{what} {kind}")
    np.testing.assert_allclose(out.header.get_zooms(), source.header.get_zooms(), atol=1e-5, rtol=0, err_msg=what)


@seed(0)
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=headers())
def test_segment_keeps_the_geometry_or_refuses_in_one_line(micro_model, h):
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "in", Path(tmp) / "out"  # a cohort folder holding one case folder
        (folder / CASE).mkdir(parents=True)
        paths = _write_case(folder / CASE, h)
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main(["segment", "-m", str(micro_model), "-i", str(folder), "-o", str(out), "--device", "cpu"])
        err = stderr.getvalue()
        assert "Traceback" not in err, err
        assert rc in (0, 2), (rc, err)
        event(f"exit {rc}")  # pytest --hypothesis-show-statistics shows how many examples segmented / were refused
        if rc == 2:
            lines = err.splitlines()
            assert len(lines) == 1, err
            assert any(p.name in lines[0] for p in paths), err
            return
        source = nib.load(str(paths[0]))
        for suffix in ("", "_anomaly"):
            written = nib.load(str(out / f"{CASE}{suffix}.nii.gz"))
            _assert_same_geometry(written, source, f"{CASE}{suffix}.nii.gz")
