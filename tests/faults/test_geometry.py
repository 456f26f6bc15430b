"""Guarantee 3: outputs sit on the input's own grid, and a lesion stays at its world position.

Inputs: RAS, LPS, LAS with anisotropic 0.9 x 0.9 x 3 mm voxels, an oblique affine whose first two
voxel axes are swapped relative to RAS, and a file whose qform (a plain LPS 1 mm grid) differs from its
sform (oblique, codes 1 and 2). ``anofpdm segment`` must write mask and map with the input's shape,
affine, qform, sform and their codes; and, at the inverse level (the tiny model is untrained, so its
masks mean nothing), a lesion planted in the input's label, sent through the model's preprocessing
(VolumeInferer.preprocess) and back (slices_to_volume, save_like), lands on the same world positions.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anofpdm_monai.inferers import VolumeInferer
from anofpdm_monai.io import save_like
from anofpdm_monai.transforms import slices_to_volume

from . import volumes as V


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(linear: np.ndarray, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


SWAP_XY = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])  # voxel i runs along A, voxel j along L
OBLIQUE = _affine(_rotation(0.25, -0.15, 0.3) @ SWAP_XY @ np.diag([1.1, 0.95, 2.0]), [12.0, -30.0, 7.5])
# name -> (sform, qform or None for the same)
GEOMETRIES = {
    "ras": (_affine(np.eye(3), [-20.0, -24.0, -3.0]), None),
    "lps": (V.LPS, None),
    "las_aniso": (_affine(np.diag([-0.9, 0.9, 3.0]), [18.0, -21.6, -9.0]), None),
    "oblique": (OBLIQUE, None),
    "qform_sform": (OBLIQUE, _affine(_rotation(0.0, 0.0, 0.1) @ np.diag([-1.0, -1.0, 1.0]), [19.5, 23.5, -2.5])),
}
PLANTED = (slice(8, 12), slice(30, 34), 2)  # off-centre on every axis: a flip or a swap moves it


def _write(root: Path, name: str, seg: np.ndarray | None = None):
    sform, qform = GEOMETRIES[name]
    kw = {"qform": qform, "scode": 2} if qform is not None else {}
    return V.write_case(root, name, sform, seed=len(name), seg=seg, **kw)


@pytest.fixture(scope="module")
def segmented(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("geometry_raw")
    out = tmp_path_factory.mktemp("geometry_out")
    for name in GEOMETRIES:
        _write(root, name)
    code, _, err = V.run_cli(["segment", "-m", str(tiny_model), "-i", str(root), "-o", str(out), "--device", "cpu"])
    assert code == 0, err
    return root, out


def test_the_inputs_are_what_they_claim():
    codes = {n: nib.aff2axcodes(a) for n, (a, _) in GEOMETRIES.items()}
    assert codes["ras"] == ("R", "A", "S") and codes["lps"] == ("L", "P", "S") and codes["las_aniso"] == ("L", "A", "S")
    assert codes["oblique"][:2] in (("A", "L"), ("A", "R"), ("P", "L"), ("P", "R"))  # first voxel axis is not x
    assert np.allclose(np.linalg.norm(GEOMETRIES["las_aniso"][0][:3, :3], axis=0), [0.9, 0.9, 3.0])
    linear = OBLIQUE[:3, :3] / np.linalg.norm(OBLIQUE[:3, :3], axis=0)
    assert np.abs(linear).max(axis=0).min() < 0.97, "not oblique"


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_segment_outputs_keep_the_input_grid(segmented, name):
    root, out = segmented
    source = nib.load(str(root / name / f"{name}_flair.nii.gz"))
    for filename, dtype in ((f"{name}.nii.gz", np.uint8), (f"{name}_anomaly.nii.gz", np.float32)):
        image = nib.load(str(out / filename))
        assert image.shape == source.shape
        assert image.get_data_dtype() == dtype
        assert np.array_equal(image.affine, source.affine)
        for get in ("get_qform", "get_sform"):
            got, code = getattr(image, get)(coded=True)
            want, want_code = getattr(source, get)(coded=True)
            assert int(code) == int(want_code), f"{filename} {get} code {code} != {want_code}"
            assert np.allclose(got, want, atol=1e-5), f"{filename} {get} differs"
        assert np.allclose(image.header.get_zooms(), source.header.get_zooms())
    sform, qform = GEOMETRIES[name]
    if qform is not None:  # the test means something only if the two differ
        assert not np.allclose(source.get_qform(), source.get_sform())


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_planted_lesion_keeps_its_world_position(tiny_model, tmp_path, name):
    planted = np.zeros(V.SHAPE, np.uint8)
    planted[PLANTED] = 1
    channels, seg = _write(tmp_path, name, seg=planted)
    inferer = VolumeInferer(tiny_model, device="cpu")
    case = inferer.preprocess(list(channels.values()), seg)
    assert case.masks.any(), "the planted lesion vanished in preprocessing"
    volume = slices_to_volume(case.masks.float(), case.geometry, "mask")
    source = nib.load(str(channels["flair"]))
    written = nib.load(str(save_like(volume, source, tmp_path / "out.nii.gz", np.uint8)))

    def world(mask: np.ndarray, affine: np.ndarray) -> set[tuple[float, ...]]:
        ijk = np.argwhere(mask > 0)
        xyz = nib.affines.apply_affine(affine, ijk)
        return {tuple(np.round(p, 3)) for p in xyz}

    want = world(planted, source.affine)
    got = world(np.asarray(written.dataobj), written.affine)
    assert got == want, f"{len(got ^ want)} voxels differ between the planted and the returned lesion (world mm)"
