"""The preprocessing chain of ALGORITHM.md section 1 as MONAI transforms, and its inverse.

Forward (``preprocess_case``): load and validate every channel (:class:`LoadCased`),
optional affine registration to a template with SimpleITK (:class:`RegisterToTemplated`),
orientation to RAS (MONAI ``Orientationd``), per-volume percentile normalisation
(:class:`PercentileNormalised`), optionally a crop of the axial planes to the brain's bounding box
padded to a square field in mm (:func:`brain_square_box`, :func:`crop_planes`), then axial brain
slices resized to S x S and scaled per slice and channel to [-1, 1] (:func:`scale_slices`).

Inverse (``slices_to_volume``): per-slice outputs go back through the resize, the crop, the
orientation and the registration onto the input's own voxel grid. A :class:`CaseGeometry` carries
what the inverse needs.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, Orientationd

from anofpdm_monai.config import PreprocessConfig
from anofpdm_monai.io import InputError, affine_mm, check_case_voxels, check_field_voxels, check_label_values, load_nifti

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference between two channels' affines (entries, mm) still taken as the same grid."""


@dataclass
class CaseGeometry:
    """What it takes to put per-slice outputs back on the input's voxel grid.

    Attributes:
        reference: path of the first channel file (its header is copied onto outputs).
        input_shape: (X, Y, Z) of the input files.
        input_affine: (4, 4) affine of the input files.
        ras_shape: (X, Y, Z) after registration and RAS orientation.
        slice_indices: axial (last-axis) indices of the RAS volume that were kept as brain slices.
        registration: SimpleITK transform parameters when the case was registered, else None.
        crop_box: ``((x0, x1), (y0, y1))``, the square field (RAS voxel indices, end exclusive; it may
            reach beyond the volume, where it is zero-padded) that was resized to S x S, or None
            when the whole axial plane was (the paper's chain).
        slice_voxel_mm: size in mm of a pixel of the S x S slices along (X, Y) and the slice
            spacing (Z), i.e. the voxel of the stacked slices; post-processing in physical units
            uses it.
    """

    reference: Path
    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    ras_shape: tuple[int, int, int]
    slice_indices: np.ndarray
    registration: dict[str, Any] | None = None
    crop_box: tuple[tuple[int, int], tuple[int, int]] | None = None
    slice_voxel_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)


class LoadCased(MapTransform):
    """Load a case's channel files into one (C, X, Y, Z) MetaTensor, checking they share one grid.

    Input dict: ``{"image": [path, ...], "label": path | None}``. Output: ``image`` (C, X, Y, Z)
    float32 MetaTensor with the first channel's affine, ``label`` (1, X, Y, Z) or absent, and
    ``reference`` (the first channel's path).
    """

    def __init__(self, allowed_labels: Sequence[int] | None = None) -> None:
        super().__init__(keys=["image"])
        self.allowed_labels = None if allowed_labels is None else set(int(v) for v in allowed_labels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        paths = [Path(p) for p in d["image"]]
        check_case_voxels([*paths, *([d["label"]] if d.get("label") is not None else [])])
        arrays, first = [], None
        for path in paths:
            array, image = load_nifti(path)
            if first is None:
                first = (path, image)
            else:
                _check_same_grid(first, (path, image))
            if not np.any(array):  # checked per file so that the message names the empty channel
                raise InputError(f"{path}: every voxel is zero; this volume holds no image; re-export it or leave this case out")
            arrays.append(array)
        ref_path, ref_image = first
        affine = torch.as_tensor(affine_mm(ref_image), dtype=torch.float64)  # in mm, whatever the header's unit
        stacked = np.stack(arrays)
        d["image"] = MetaTensor(torch.from_numpy(stacked), affine=affine)
        d["reference"] = ref_path
        if d.get("label") is not None:
            label_path = Path(d["label"])
            label, label_image = load_nifti(label_path)
            _check_same_grid(first, (label_path, label_image))
            unique = check_label_values(label_path, label)
            values = set(unique.astype(int).tolist())
            if self.allowed_labels is not None and not values <= self.allowed_labels | {0}:
                raise InputError(
                    f"{label_path}: unexpected label values {sorted(values - self.allowed_labels - {0})}; "
                    f"expected {sorted(self.allowed_labels | {0})} (all non-zero labels are merged into one lesion class); "
                    "relabel the mask to those values or leave this case out"
                )
            d["label"] = MetaTensor(torch.from_numpy((label > 0).astype(np.float32))[None], affine=affine)
        else:
            d.pop("label", None)
        return d


def _check_same_grid(first: tuple[Path, nib.Nifti1Image], other: tuple[Path, nib.Nifti1Image]) -> None:
    (p0, im0), (p1, im1) = first, other
    if im0.shape[:3] != im1.shape[:3]:
        raise InputError(
            f"{p1}: shape {im1.shape[:3]} differs from {p0.name} {im0.shape[:3]}; all channels of a case must share one grid "
            "(resample them onto one grid first)"
        )
    diff = float(np.abs(affine_mm(im0) - affine_mm(im1)).max())
    if diff > AFFINE_TOLERANCE_MM:
        raise InputError(
            f"{p1}: affine differs from {p0.name} by up to {diff:.3g} mm (tolerance {AFFINE_TOLERANCE_MM} mm); "
            "all channels of a case must share one grid (resample them onto one grid first)"
        )


class RegisterToTemplated(MapTransform):
    """Affine registration of the case to a template with SimpleITK; resamples image and label onto it.

    The first channel drives a Mattes mutual-information affine registration; the transform is
    stored under ``registration`` so that :func:`slices_to_volume` can map outputs back.
    """

    def __init__(self, template: str | Path, iterations: int = 100) -> None:
        super().__init__(keys=["image"])
        self.template = Path(template)
        self.iterations = iterations

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        import SimpleITK as sitk

        d = dict(data)
        fixed = sitk.ReadImage(str(self.template), sitk.sitkFloat32)
        moving_ref = sitk.ReadImage(str(d["reference"]), sitk.sitkFloat32)
        transform = register_affine(fixed, moving_ref, self.iterations)
        channels = [
            _resample_array(c.numpy(), moving_ref, fixed, transform, sitk.sitkLinear) for c in d["image"].as_tensor()
        ]
        fixed_affine = torch.as_tensor(nib.load(str(self.template)).affine, dtype=torch.float64)
        d["image"] = MetaTensor(torch.from_numpy(np.stack(channels)), affine=fixed_affine)
        if "label" in d:
            label = _resample_array(d["label"][0].numpy(), moving_ref, fixed, transform, sitk.sitkNearestNeighbor)
            d["label"] = MetaTensor(torch.from_numpy(label)[None], affine=fixed_affine)
        d["registration"] = {
            "template": str(self.template),
            "parameters": list(transform.GetParameters()),
            "fixed_parameters": list(transform.GetFixedParameters()),
        }
        return d


def register_affine(fixed: Any, moving: Any, iterations: int = 100) -> Any:
    """Affine SimpleITK transform mapping points of ``fixed`` to ``moving`` (Mattes MI, multi-resolution)."""
    import SimpleITK as sitk

    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.05, seed=0)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, iterations)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2])
    method.SetSmoothingSigmasPerLevel([2, 1])
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(fixed, moving)


def _to_sitk(array: np.ndarray, like: Any) -> Any:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)).astype(np.float32))
    image.CopyInformation(like)
    return image


def _resample_array(array: np.ndarray, source: Any, target: Any, transform: Any, interpolator: int) -> np.ndarray:
    """Resample an (X, Y, Z) array on ``source``'s grid onto ``target``'s grid; ``transform`` maps target to source points."""
    import SimpleITK as sitk

    out = sitk.Resample(_to_sitk(array, source), target, transform, interpolator, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0).astype(np.float32)


class PercentileNormalised(MapTransform):
    """Divide each channel by a percentile of its non-zero (brain) voxels (ALGORITHM.md section 1)."""

    def __init__(self, percentile: float = 99.0) -> None:
        super().__init__(keys=["image"])
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile={percentile} must lie in (0, 100]")
        self.percentile = percentile

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d["image"]
        scaled = []
        for c, channel in enumerate(image.as_tensor()):
            brain = channel[channel != 0]
            if brain.numel() == 0:
                raise InputError(f"{d.get('reference')}: channel {c} is all zero after loading; it holds no image")
            scale = torch.quantile(brain.float()[:: max(1, brain.numel() // 2_000_000)], self.percentile / 100.0)
            scaled.append(channel / scale.clamp_min(1e-8))
        d["image"] = MetaTensor(torch.stack(scaled), affine=image.affine)
        return d


def scale_slices(slices: torch.Tensor) -> torch.Tensor:
    """Min-max each slice and channel to [0, 1], then map to [-1, 1] (ALGORITHM.md section 1).

    Args:
        slices: (N, C, S, S) float.

    Returns:
        (N, C, S, S) in [-1, 1]; a constant slice-channel maps to -1.
    """
    flat = slices.flatten(2)
    lo = flat.min(dim=2, keepdim=True).values
    hi = flat.max(dim=2, keepdim=True).values
    unit = (flat - lo) / (hi - lo).clamp_min(1e-8)
    return (unit * 2.0 - 1.0).view_as(slices)


def resize_slices(volume: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize the axial slices of a (C, X, Y, Z) volume to (Z, C, size, size)."""
    slices = volume.permute(3, 0, 1, 2).float()
    return F.interpolate(slices, size=(size, size), mode=mode, align_corners=False, antialias=False)


def brain_square_box(
    brain: torch.Tensor, spacing: Sequence[float], margin_mm: float
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The axial field that holds the brain: its bounding box plus a margin, widened to a square in mm.

    Args:
        brain: (X, Y, Z) bool, the brain (non-zero) voxels of the RAS volume.
        spacing: (sx, sy) voxel size in mm along X and Y.
        margin_mm: added on every side of the bounding box before squaring.

    Returns:
        ``((x0, x1), (y0, y1))``, end exclusive, centred on the bounding box; the field is
        ``x1 - x0`` by ``y1 - y0`` voxels, the same length in mm along both axes (to the nearest
        voxel), and may reach beyond the volume. The whole plane when ``brain`` is empty.
    """
    plane = brain.any(dim=2)
    if not plane.any():
        return (0, int(brain.shape[0])), (0, int(brain.shape[1]))
    box = []
    for axis in (0, 1):
        hit = torch.nonzero(plane.any(dim=1 - axis)).flatten()
        box.append((int(hit.min()), int(hit.max()) + 1))
    side_mm = max((hi - lo) * float(s) + 2.0 * margin_mm for (lo, hi), s in zip(box, spacing))
    field = []
    for (lo, hi), s in zip(box, spacing):
        n = max(int(round(side_mm / float(s))), hi - lo)
        start = (lo + hi - n) // 2
        field.append((start, start + n))
    return field[0], field[1]


def crop_planes(volume: torch.Tensor, box: tuple[tuple[int, int], tuple[int, int]]) -> torch.Tensor:
    """Cut the field ``box`` out of the axial planes of a (C, X, Y, Z) volume, zero where it leaves the volume.

    Returns:
        (C, x1 - x0, y1 - y0, Z), same dtype as ``volume``.
    """
    (x0, x1), (y0, y1) = box
    c, x, y, z = volume.shape
    out = volume.new_zeros((c, x1 - x0, y1 - y0, z))
    sx, sy = slice(max(x0, 0), min(x1, x)), slice(max(y0, 0), min(y1, y))
    out[:, sx.start - x0 : sx.stop - x0, sy.start - y0 : sy.stop - y0] = volume[:, sx, sy]
    return out


def uncrop_planes(planes: torch.Tensor, box: tuple[tuple[int, int], tuple[int, int]], plane_shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`crop_planes` for (N, x1 - x0, y1 - y0) planes: (N, X, Y), zero outside the field."""
    (x0, x1), (y0, y1) = box
    x, y = plane_shape
    out = planes.new_zeros((planes.shape[0], x, y))
    sx, sy = slice(max(x0, 0), min(x1, x)), slice(max(y0, 0), min(y1, y))
    out[:, sx, sy] = planes[:, sx.start - x0 : sx.stop - x0, sy.start - y0 : sy.stop - y0]
    return out


def build_chain(percentile: float = 99.0, register_to: str | None = None, allowed_labels: Sequence[int] | None = None) -> Compose:
    """The MONAI transform chain up to (and including) normalisation, for one case dict."""
    transforms: list[Any] = [LoadCased(allowed_labels=allowed_labels)]
    if register_to:
        transforms.append(RegisterToTemplated(register_to))
    transforms += [
        Orientationd(keys=["image", "label"], axcodes="RAS", allow_missing_keys=True, labels=RAS_LABELS),
        PercentileNormalised(percentile),
    ]
    return Compose(transforms)


@dataclass
class PreprocessedCase:
    """One case after the chain: slices (N, C, S, S) in [-1, 1], masks (N, S, S) bool or None, geometry."""

    images: torch.Tensor
    masks: torch.Tensor | None
    geometry: CaseGeometry


def preprocess_case(
    channel_paths: Sequence[str | Path],
    label_path: str | Path | None,
    *,
    image_size: int,
    percentile: float = 99.0,
    min_brain_fraction: float = 0.05,
    register_to: str | None = None,
    allowed_labels: Sequence[int] | None = None,
    crop_margin_mm: float | None = None,
) -> PreprocessedCase:
    """Run the whole chain of ALGORITHM.md section 1 on one case.

    ``crop_margin_mm``: None resizes the whole axial plane to S x S (the paper's chain); a number
    first crops the planes to :func:`brain_square_box` with that margin. Which slices are brain
    slices (``min_brain_fraction``) is decided on the whole plane either way.

    Returns:
        brain slices resized to ``image_size`` and scaled to [-1, 1], their masks (resize bilinear then > 0.5),
        and the :class:`CaseGeometry` to invert it.
    """
    chain = build_chain(percentile, register_to, allowed_labels)
    try:
        data = chain({"image": [str(p) for p in channel_paths], "label": label_path})
    except RuntimeError as err:  # MONAI's Compose wraps every error in "applying transform ..."
        cause = _input_error_cause(err)
        if cause is None:
            raise
        raise cause from None
    image = data["image"].as_tensor().float()
    brain_fraction = (image != 0).any(dim=0).float().mean(dim=(0, 1))  # (Z,)
    keep = torch.nonzero(brain_fraction >= min_brain_fraction).flatten()
    if keep.numel() == 0:
        raise InputError(
            f"{data['reference']}: no slice has brain tissue (>= {min_brain_fraction:.0%} non-zero pixels); "
            "check that this is a brain volume with zero background (skull-stripped), or leave this case out"
        )
    planes = image[..., keep]
    label_planes = data["label"].as_tensor()[..., keep] if "label" in data else None
    box = None
    if crop_margin_mm is not None:
        box = brain_square_box((image != 0).any(dim=0), np.linalg.norm(np.asarray(data["image"].affine)[:3, :2], axis=0), crop_margin_mm)
        check_field_voxels(data["reference"], box, planes.shape, crop_margin_mm)
        planes = crop_planes(planes, box)
        label_planes = None if label_planes is None else crop_planes(label_planes, box)
    spacing = np.linalg.norm(np.asarray(data["image"].affine)[:3, :3], axis=0)
    field_voxels = planes.shape[1:3]
    slice_voxel_mm = tuple(float(spacing[i] * field_voxels[i] / image_size) for i in (0, 1)) + (float(spacing[2]),)
    slices = scale_slices(resize_slices(planes, image_size))
    masks = None if label_planes is None else resize_slices(label_planes, image_size)[:, 0] > 0.5
    reference = nib.load(str(data["reference"]))
    geometry = CaseGeometry(
        reference=Path(data["reference"]),
        input_shape=tuple(int(s) for s in reference.shape[:3]),
        input_affine=np.asarray(reference.affine, dtype=np.float64),
        ras_shape=tuple(int(s) for s in image.shape[1:]),
        slice_indices=keep.numpy(),
        registration=data.get("registration"),
        crop_box=box,
        slice_voxel_mm=slice_voxel_mm,
    )
    return PreprocessedCase(slices, masks, geometry)


def preprocess_with(
    config: PreprocessConfig,
    channel_paths: Sequence[str | Path],
    label_path: str | Path | None,
    allowed_labels: Sequence[int] | None = None,
) -> PreprocessedCase:
    """:func:`preprocess_case` with the settings of a store or model folder (the one way the pipeline calls it)."""
    return preprocess_case(
        channel_paths,
        label_path,
        image_size=config.image_size,
        percentile=config.percentile,
        min_brain_fraction=config.min_brain_fraction,
        register_to=config.register_to,
        allowed_labels=allowed_labels,
        crop_margin_mm=config.crop_margin_mm if config.crop_foreground else None,
    )


def _input_error_cause(err: BaseException) -> InputError | None:
    """The :class:`InputError` behind a MONAI-wrapped exception, if there is one."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, InputError):
        cause = cause.__cause__
    return cause


def slices_to_volume(values: torch.Tensor, geometry: CaseGeometry, kind: str) -> np.ndarray:
    """Put per-slice outputs back onto the input's voxel grid (the inverse of :func:`preprocess_case`).

    Args:
        values: (N, S, S) per brain slice, in the order of ``geometry.slice_indices``.
        geometry: from :func:`preprocess_case`.
        kind: ``"map"`` (bilinear, float32) or ``"mask"`` (bilinear of the 0/1 mask then >= 0.5, uint8).

    Returns:
        (X, Y, Z) array on the input grid; slices without brain are zero.
    """
    if kind not in ("map", "mask"):
        raise ValueError(f"kind={kind!r}; choose 'map' or 'mask'")
    x, y, z = geometry.ras_shape
    if geometry.crop_box is None:
        planes = F.interpolate(values.float()[:, None], size=(x, y), mode="bilinear", align_corners=False)[:, 0]
    else:
        (x0, x1), (y0, y1) = geometry.crop_box
        field = F.interpolate(values.float()[:, None], size=(x1 - x0, y1 - y0), mode="bilinear", align_corners=False)[:, 0]
        planes = uncrop_planes(field, geometry.crop_box, (x, y))
    ras = torch.zeros((x, y, z), dtype=torch.float32)
    ras[..., torch.as_tensor(geometry.slice_indices, dtype=torch.long)] = planes.permute(1, 2, 0)
    ras_np = ras.numpy()
    if geometry.registration is None:
        volume = from_ras(ras_np, geometry.input_affine)
    else:
        volume = _unregister(ras_np, geometry)
    if kind == "mask":
        return (volume >= 0.5).astype(np.uint8)
    return volume.astype(np.float32)


def from_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder an array laid out in RAS (as MONAI's Orientation made it) back to the voxel order of ``affine``."""
    ras_to_input = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.io_orientation(affine)
    )
    return nib.orientations.apply_orientation(array, ras_to_input)


def _unregister(ras_array: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
    """Map an array on the RAS-oriented template grid back onto the input grid with the inverse registration."""
    import SimpleITK as sitk

    reg = geometry.registration
    template = nib.load(reg["template"])
    on_template = from_ras(ras_array, template.affine)
    fixed = sitk.ReadImage(reg["template"], sitk.sitkFloat32)
    moving = sitk.ReadImage(str(geometry.reference), sitk.sitkFloat32)
    transform = sitk.AffineTransform(3)
    transform.SetFixedParameters(reg["fixed_parameters"])
    transform.SetParameters(reg["parameters"])
    return _resample_array(on_template, fixed, moving, transform.GetInverse(), sitk.sitkLinear)
