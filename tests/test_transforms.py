"""The preprocessing chain of ALGORITHM.md section 1 and its inverse, on small hand-made volumes."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from anofpdm_monai.io import InputError
from anofpdm_monai.transforms import (
    LoadCased,
    PercentileNormalised,
    RegisterToTemplated,
    brain_square_box,
    build_chain,
    crop_planes,
    from_ras,
    preprocess_case,
    scale_slices,
    slices_to_volume,
)


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def _rotation(ax_deg: float, az_deg: float) -> np.ndarray:
    ax, az = math.radians(ax_deg), math.radians(az_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def _affine(matrix: np.ndarray, origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = origin
    return affine


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


# --- orientation -----------------------------------------------------------------------------


def test_lps_input_comes_out_ras_with_world_position_kept(tmp_path):
    shape = (20, 24, 10)
    affine = _affine(np.diag([-2.0, -1.5, 3.0]), origin=(30.0, 25.0, -12.0))  # LPS voxel order
    volume = np.full(shape, 10.0, dtype=np.float32)
    ijk = (3, 5, 7)
    volume[ijk] = 1000.0
    path = _save(tmp_path / "lps.nii.gz", volume, affine)

    data = build_chain()({"image": [str(path)], "label": None})
    out = data["image"]
    assert tuple(out.shape) == (1, *shape)
    out_affine = np.asarray(out.affine, dtype=np.float64)
    assert np.all(np.diag(out_affine)[:3] > 0), f"not RAS: {out_affine}"
    assert nib.aff2axcodes(out_affine) == ("R", "A", "S")
    new_ijk = np.unravel_index(int(out[0].argmax()), shape)
    assert new_ijk == (shape[0] - 1 - ijk[0], shape[1] - 1 - ijk[1], ijk[2]), "L and P axes flipped, S kept"
    world_before = affine @ np.array([*ijk, 1.0])
    world_after = out_affine @ np.array([*new_ijk, 1.0])
    np.testing.assert_allclose(world_after, world_before, atol=1e-4)
    # from_ras is the exact inverse of the reorientation.
    p99 = np.percentile(volume[volume != 0], 99)
    np.testing.assert_allclose(from_ras(out[0].numpy(), affine), volume / p99, rtol=1e-6)


def test_permuted_axes_come_out_ras(tmp_path):
    """A sagittally stored volume (voxel axes A, S, L): the axial slice axis becomes the last axis."""
    shape = (12, 8, 10)
    matrix = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # i -> A, j -> S, k -> L
    affine = _affine(matrix)
    volume = np.ones(shape, dtype=np.float32)
    ijk = (2, 6, 3)
    volume[ijk] = 50.0
    path = _save(tmp_path / "asl.nii.gz", volume, affine)
    out = build_chain()({"image": [str(path)], "label": None})["image"]
    assert tuple(out.shape[1:]) == (10, 12, 8)
    assert nib.aff2axcodes(np.asarray(out.affine)) == ("R", "A", "S")
    new_ijk = np.unravel_index(int(out[0].argmax()), out.shape[1:])
    np.testing.assert_allclose(np.asarray(out.affine) @ [*new_ijk, 1.0], affine @ [*ijk, 1.0], atol=1e-4)


# --- normalisation and resizing --------------------------------------------------------------


def _two_channel_case(rng: np.random.Generator) -> np.ndarray:
    """(2, 16, 16, 6) with a zero background, slice 0 empty, channels on very different scales."""
    x = np.zeros((2, 16, 16, 6), dtype=np.float32)
    x[0, 2:14, 3:15, 1:] = rng.uniform(5.0, 400.0, size=(12, 12, 5))
    x[1, 1:12, 2:16, 1:] = rng.uniform(0.01, 3.0, size=(11, 14, 5))
    x[0, 7, 7, 3] = 5000.0  # an outlier the 99th percentile must ignore
    return x


def test_percentile_normalisation_divides_by_p99_of_nonzero_voxels():
    x = _two_channel_case(np.random.default_rng(0))
    data = {"image": MetaTensor(torch.from_numpy(x), affine=torch.eye(4)), "reference": "case"}
    out = PercentileNormalised(99.0)(data)["image"].numpy()
    for c in range(2):
        p99 = np.percentile(x[c][x[c] != 0], 99)
        np.testing.assert_allclose(out[c], x[c] / p99, rtol=1e-5)
        # Including the zero background would give a much lower percentile.
        assert not np.isclose(p99, np.percentile(x[c], 99))
    assert (out[:, x[0] == 0][0] == 0).all(), "background stays zero"
    with pytest.raises(ValueError, match="percentile"):
        PercentileNormalised(0.0)


def test_percentile_normalisation_refuses_an_all_zero_channel():
    x = _two_channel_case(np.random.default_rng(1))
    x[1] = 0.0
    with pytest.raises(InputError, match="channel 1 is all zero"):
        PercentileNormalised()({"image": MetaTensor(torch.from_numpy(x)), "reference": "case"})


def test_scale_slices_min_max_per_slice_and_channel():
    rng = np.random.default_rng(2)
    slices = rng.normal(size=(3, 2, 5, 5)).astype(np.float32) * np.array([1.0, 100.0])[None, :, None, None]
    slices[1, 1] = 7.0  # constant slice-channel
    out = scale_slices(torch.from_numpy(slices)).numpy()
    for n in range(3):
        for c in range(2):
            if (n, c) == (1, 1):
                assert (out[n, c] == -1.0).all()
                continue
            s = slices[n, c]
            np.testing.assert_allclose(out[n, c], (s - s.min()) / (s.max() - s.min()) * 2 - 1, atol=1e-6)
            assert out[n, c].min() == -1.0 and out[n, c].max() == pytest.approx(1.0)


def _block_mean(a: np.ndarray) -> np.ndarray:
    """Mean over 2 x 2 in-plane blocks of (..., X, Y): bilinear (align_corners=False) halving, computed by hand."""
    return 0.25 * (a[..., 0::2, 0::2] + a[..., 1::2, 0::2] + a[..., 0::2, 1::2] + a[..., 1::2, 1::2])


def test_preprocess_case_matches_section_1_computed_by_hand(tmp_path):
    rng = np.random.default_rng(3)
    x = _two_channel_case(rng)
    mask = (rng.random((16, 16, 6)) < 0.5).astype(np.uint8) * rng.choice([1, 2, 4], size=(16, 16, 6)).astype(np.uint8)
    mask[..., 0] = 0
    affine = np.diag([1.0, 1.0, 1.0, 1.0])  # already RAS: no reorientation
    paths = [_save(tmp_path / f"c{c}.nii.gz", x[c], affine) for c in range(2)]
    label = _save(tmp_path / "seg.nii.gz", mask, affine)

    case = preprocess_case(paths, label, image_size=8, allowed_labels=(1, 2, 4))

    np.testing.assert_array_equal(case.geometry.slice_indices, [1, 2, 3, 4, 5])  # the empty slice 0 is dropped
    # Independent computation: /p99 of non-zero voxels per channel, 2x2 block mean, min-max per slice and channel.
    expected = np.empty((5, 2, 8, 8))
    for c in range(2):
        p99 = np.percentile(x[c][x[c] != 0], 99)
        for n, z in enumerate(range(1, 6)):
            small = _block_mean(x[c, :, :, z] / p99)
            expected[n, c] = (small - small.min()) / (small.max() - small.min()) * 2.0 - 1.0
    assert case.images.shape == (5, 2, 8, 8) and case.images.dtype == torch.float32
    np.testing.assert_allclose(case.images.numpy(), expected, atol=1e-5)
    assert case.images.min() == -1.0 and case.images.max() == pytest.approx(1.0)

    # Masks: all labels merged, bilinear halving then > 0.5 (3 or 4 of the 4 pixels; exactly 2 of 4 is 0.5: out).
    fg = (mask > 0).astype(np.float64)
    blocks = np.stack([_block_mean(fg[:, :, z]) for z in range(1, 6)])
    assert (blocks == 0.5).any() and (blocks == 0.75).any(), "the random mask exercises both sides of the threshold"
    assert case.masks.dtype == torch.bool and case.masks.shape == (5, 8, 8)
    np.testing.assert_array_equal(case.masks.numpy(), blocks > 0.5)


def test_unexpected_label_values_refused(tmp_path):
    x = np.ones((8, 8, 4), dtype=np.float32)
    seg = np.zeros((8, 8, 4), dtype=np.uint8)
    seg[2, 2, 2] = 3
    image = _save(tmp_path / "t1.nii.gz", x, np.eye(4))
    label = _save(tmp_path / "seg.nii.gz", seg, np.eye(4))
    with pytest.raises(InputError, match=r"unexpected label values \[3\]"):
        LoadCased(allowed_labels=(1, 2, 4))({"image": [image], "label": label})
    # Through the whole chain the error stays an InputError (MONAI's Compose wraps it in a RuntimeError).
    with pytest.raises(InputError, match=r"unexpected label values \[3\]"):
        preprocess_case([image], label, image_size=8, allowed_labels=(1, 2, 4))
    # Without a list of allowed labels every non-zero value is lesion.
    out = LoadCased()({"image": [image], "label": label})
    assert out["label"].shape == (1, 8, 8, 4) and float(out["label"].sum()) == 1.0


# --- round trip onto the input grid ----------------------------------------------------------

ROUND_TRIP_GEOMETRIES = {
    "RAS": (np.diag([1.0, 1.0, 1.0]), (40, 36, 14)),
    "LPS": (np.diag([-1.0, -1.0, 1.0]), (40, 36, 14)),
    "LAS": (np.diag([-1.0, 1.0, 1.0]), (40, 36, 14)),
    "oblique": (_rotation(10.0, 20.0) @ np.diag([1.0, 1.0, 1.2]), (40, 36, 14)),
    "anisotropic 0.9x0.9x3": (np.diag([0.9, 0.9, 3.0]), (44, 40, 12)),
    "LPS oblique anisotropic": (_rotation(-12.0, 15.0) @ np.diag([-0.9, -0.9, 3.0]), (44, 40, 12)),
    "sagittal storage (A, S, L)": (np.array([[0.0, 0.0, -0.9], [0.9, 0.0, 0.0], [0.0, 3.0, 0.0]]), (40, 12, 44)),
}


def _ellipsoid(shape: tuple[int, ...], centre_frac: float, radius_frac: float) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum(((g - centre_frac * (s - 1)) / (radius_frac * s)) ** 2 for g, s in zip(grid, shape)) < 1.0


@pytest.mark.parametrize("crop_margin_mm", [None, 3.0], ids=["whole plane", "brain crop"])
@pytest.mark.parametrize("name", list(ROUND_TRIP_GEOMETRIES))
def test_mask_round_trip_onto_the_input_grid(tmp_path, name, crop_margin_mm):
    matrix, shape = ROUND_TRIP_GEOMETRIES[name]
    affine = _affine(matrix)
    rng = np.random.default_rng(4)
    brain = _ellipsoid(shape, 0.5, 0.46)
    lesion = _ellipsoid(shape, 0.34, 0.2) & brain  # off centre: a flipped axis would miss it entirely
    image = brain * (100.0 + 10.0 * rng.random(shape)) + 80.0 * lesion
    paths = [_save(tmp_path / f"c{c}.nii.gz", (image * (c + 1)).astype(np.float32), affine) for c in range(2)]
    label = _save(tmp_path / "seg.nii.gz", lesion.astype(np.uint8), affine)

    case = preprocess_case(paths, label, image_size=32, crop_margin_mm=crop_margin_mm)
    assert case.masks.any()
    assert (case.geometry.crop_box is None) == (crop_margin_mm is None)
    assert case.geometry.input_shape == shape
    np.testing.assert_allclose(case.geometry.input_affine, affine, atol=1e-5)

    back = slices_to_volume(case.masks, case.geometry, "mask")
    assert back.shape == shape and back.dtype == np.uint8 and set(np.unique(back)) <= {0, 1}
    assert _dice(back, lesion) > 0.8, f"{name}: dice {_dice(back, lesion):.3f}"
    np.testing.assert_allclose(np.argwhere(back).mean(0), np.argwhere(lesion).mean(0), atol=1.0)

    # The map path puts the image itself back where it came from.
    intensity = slices_to_volume(case.images[:, 0], case.geometry, "map")
    assert intensity.shape == shape and intensity.dtype == np.float32
    assert _dice(intensity > 0.0, brain) > 0.8, "brain (near +1) and background (-1) land where they were"


# --- brain crop ------------------------------------------------------------------------------


def test_brain_square_box_is_centred_and_square_in_mm():
    brain = torch.zeros((60, 50, 4), dtype=torch.bool)
    brain[10:30, 5:45, 1:3] = True  # 20 x 40 voxels
    (x0, x1), (y0, y1) = brain_square_box(brain, (1.0, 1.0), margin_mm=2.0)
    assert (x1 - x0, y1 - y0) == (44, 44), "the longer side plus the margin, on both axes"
    assert (x0 + x1) / 2 == 20 and (y0 + y1) / 2 == 25, "centred on the bounding box"
    assert y0 == 3 and y1 == 47, "the longer axis keeps exactly its margin"
    # Anisotropic pixels: the field is square in mm, not in voxels.
    (x0, x1), (y0, y1) = brain_square_box(brain, (0.5, 2.0), margin_mm=0.0)
    assert (x1 - x0) * 0.5 == pytest.approx((y1 - y0) * 2.0) == 80.0
    # No brain at all: the whole plane.
    assert brain_square_box(torch.zeros((6, 7, 2), dtype=torch.bool), (1.0, 1.0), 5.0) == ((0, 6), (0, 7))


def test_crop_planes_zero_pads_where_the_field_leaves_the_volume():
    volume = torch.arange(2 * 4 * 3 * 2, dtype=torch.float32).view(2, 4, 3, 2) + 1
    out = crop_planes(volume, ((-1, 4), (1, 6)))
    assert out.shape == (2, 5, 5, 2)
    assert torch.equal(out[:, 1:5, 0:2], volume[:, 0:4, 1:3])
    assert not out[:, 0].any() and not out[:, :, 2:].any()


def test_brain_crop_inverse_is_exact_when_no_resize_is_needed(tmp_path):
    # 1 mm voxels, brain box 30 x 20 (+ 2 mm margin): a 34 x 34 field; at S = 34 the resize is the identity.
    shape = (48, 40, 6)
    affine = _affine(np.diag([-1.0, -1.0, 1.0]))  # LPS storage
    brain = np.zeros(shape, dtype=bool)
    brain[8:38, 12:32, :] = True
    rng = np.random.default_rng(0)
    lesion = brain & (rng.random(shape) < 0.2)  # scattered single voxels: any offset or flip would show
    image = brain * (100.0 + 10.0 * rng.random(shape))
    path = _save(tmp_path / "t1.nii.gz", image.astype(np.float32), affine)
    label = _save(tmp_path / "seg.nii.gz", lesion.astype(np.uint8), affine)
    case = preprocess_case([path], label, image_size=34, crop_margin_mm=2.0)
    (x0, x1), (y0, y1) = case.geometry.crop_box
    assert (x1 - x0, y1 - y0) == (34, 34)
    assert case.geometry.slice_voxel_mm == pytest.approx((1.0, 1.0, 1.0))
    assert preprocess_case([path], label, image_size=17, crop_margin_mm=2.0).geometry.slice_voxel_mm == pytest.approx((2.0, 2.0, 1.0))
    back = slices_to_volume(case.masks, case.geometry, "mask")
    np.testing.assert_array_equal(back, lesion.astype(np.uint8))


def test_brain_crop_keeps_the_atlas_grid_aspect(tmp_path):
    # ATLAS v2.0 grid (197 x 233 x 189 in MNI space) with an elongated brain: the whole-plane chain stretches
    # it by 233/197 along X; the crop keeps a circle round.
    shape = (197, 233, 8)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape[:2]], indexing="ij")
    disc = ((grid[0] - 98) ** 2 + (grid[1] - 116) ** 2) < 60**2
    brain = np.repeat(disc[..., None], shape[2], axis=2)
    path = _save(tmp_path / "t1.nii.gz", (brain * 100.0).astype(np.float32), _affine(np.eye(3)))
    for margin, expect in ((None, 233 / 197), (5.0, 1.0)):
        case = preprocess_case([path], None, image_size=64, crop_margin_mm=margin)
        inside = (case.images[shape[2] // 2, 0] > 0).numpy()
        rows, cols = np.nonzero(inside)
        aspect = (rows.max() - rows.min() + 1) / (cols.max() - cols.min() + 1)
        assert aspect == pytest.approx(expect, abs=0.05), (margin, aspect)
        if margin is not None:
            assert inside.mean() > 0.6, "the brain fills the field"


def test_slices_to_volume_rejects_unknown_kind(tmp_path):
    x = np.zeros((8, 8, 4), dtype=np.float32)
    x[2:6, 2:6] = 1.0
    case = preprocess_case([_save(tmp_path / "a.nii.gz", x, np.eye(4))], None, image_size=8)
    assert case.masks is None
    with pytest.raises(ValueError, match="kind"):
        slices_to_volume(case.images[:, 0], case.geometry, "labels")


# --- registration ----------------------------------------------------------------------------

SHIFT = np.array([3, -2, 1])


def _registration_pair(tmp_path: Path) -> tuple[Path, Path, Path, np.ndarray, np.ndarray]:
    shape = (40, 40, 24)
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))

    def blob(centre, radius):
        return np.exp(-((g - np.array(centre, dtype=np.float32)[:, None, None, None]) ** 2).sum(0) / (2 * radius**2))

    brain = (((g[0] - 20) / 14) ** 2 + ((g[1] - 19) / 12) ** 2 + ((g[2] - 12) / 9) ** 2) < 1
    image = brain * (100 + 300 * blob((14, 16, 12), 3) + 150 * blob((26, 24, 10), 5) + 80 * blob((20, 12, 15), 2))
    lesion = blob((14, 16, 12), 3) > 0.5
    template = np.zeros_like(image)  # the same anatomy moved by SHIFT voxels
    template[3:, :-2, 1:] = image[:-3, 2:, :-1]
    affine = _affine(np.eye(3), origin=(-20.0, -20.0, -12.0))
    moving = _save(tmp_path / "img.nii.gz", image.astype(np.float32), affine)
    fixed = _save(tmp_path / "template.nii.gz", template.astype(np.float32), affine)
    label = _save(tmp_path / "seg.nii.gz", lesion.astype(np.uint8), affine)
    return moving, fixed, label, lesion, template


def test_registration_recovers_a_translation_and_maps_back(tmp_path):
    import SimpleITK as sitk

    moving_path, fixed_path, label_path, lesion, template = _registration_pair(tmp_path)
    data = LoadCased()({"image": [moving_path], "label": label_path})
    registered = RegisterToTemplated(fixed_path, iterations=30)(data)
    reg = registered["registration"]
    transform = sitk.AffineTransform(3)
    transform.SetFixedParameters(reg["fixed_parameters"])
    transform.SetParameters(reg["parameters"])
    fixed, moving = sitk.ReadImage(str(fixed_path)), sitk.ReadImage(str(moving_path))
    # A template voxel p shows the anatomy of input voxel p - SHIFT.
    for p in [(20, 20, 12), (14, 18, 10), (26, 22, 14)]:
        q = moving.TransformPhysicalPointToContinuousIndex(
            transform.TransformPoint(fixed.TransformContinuousIndexToPhysicalPoint([float(v) for v in p]))
        )
        np.testing.assert_allclose(q, np.array(p) - SHIFT, atol=1.0)
    on_template = registered["image"][0].numpy()
    assert on_template.shape == template.shape
    unregistered_error = np.abs(nib.load(str(moving_path)).get_fdata() - template).mean()
    assert np.abs(on_template - template).mean() < 0.5 * unregistered_error
    assert _dice(registered["label"][0].numpy() > 0, np.roll(lesion, SHIFT, axis=(0, 1, 2))) > 0.7

    # The whole chain with registration, and back onto the input's own grid.
    case = preprocess_case([moving_path], label_path, image_size=32, register_to=str(fixed_path))
    assert case.geometry.registration is not None
    back = slices_to_volume(case.masks, case.geometry, "mask")
    assert back.shape == lesion.shape
    assert _dice(back, lesion) > 0.7


@pytest.mark.parametrize("n", [1, 2, 3, 1001, 200_003])
def test_quantile_is_torch_quantile_bit_for_bit(n):
    """The percentile normalisation's selection-based quantile gives torch.quantile's value exactly (same masks)."""
    from anofpdm_monai.transforms import quantile

    values = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 100
    for q in (0.0, 0.5, 0.99, 0.995, 1.0):
        assert torch.equal(quantile(values, q), torch.quantile(values, q)), (n, q)
