"""The volume family's decisions (anofpdm_monai.volume_mode) on hand-made volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anofpdm_monai.forward_process import ForwardProcessResult
from anofpdm_monai.volume_mode import (
    ValidationVolume,
    VolumeCalibration,
    VolumeInputs,
    anchored_mixed_masks,
    best_threshold,
    VolumeComponents,
    calibrate_volume_mode,
    fp_rate_size,
    keep_lesions,
    smooth_along_slices,
    volume_segment,
)

S = 16


def _result(maps: torch.Tensor, dmax: torch.Tensor | None = None) -> ForwardProcessResult:
    """A one-strength forward-process result whose aggregated map (both channels) is ``maps`` (B, S, S)."""
    b = maps.shape[0]
    per_channel = maps[None, :, None].expand(1, b, 2, S, S).clone()
    curve = torch.ones(1, b, 3, 2)
    dmax = torch.zeros(1, b, 2) if dmax is None else dmax.view(1, b, 1).expand(1, b, 2).clone()
    return ForwardProcessResult(
        timesteps=torch.tensor([0, 10, 20]), guidance_scales=torch.tensor([1.0]), mse_h=curve, mse_u=curve,
        divergence=curve, end_index=torch.zeros(1, b, 2, dtype=torch.long), dmax=dmax, maps={"aggregated": per_channel,
        "last": per_channel}, network_calls=3, map_channels=(0, 1),
    )  # fmt: skip


def _brain(b: int) -> torch.Tensor:
    brain = torch.zeros(b, S, S, dtype=torch.bool)
    brain[:, 2:14, 2:14] = True
    return brain


def test_small_lesions_are_measured_in_mm3_of_the_slice_grid():
    masks = torch.zeros(3, S, S, dtype=torch.bool)
    masks[0:2, 4:6, 4:6] = True  # 8 voxels spanning two slices
    masks[2, 6, 6] = True  # 1 voxel touching the corner (5, 5) of slice 1
    idx = np.array([5, 6, 7])
    assert keep_lesions(masks, idx, (1.0, 1.0, 1.0), 2.0).sum() == 9, "one component of 9 voxels (26-connected)"
    masks[2, 6, 6] = False
    masks[2, 12, 12] = True  # now isolated
    kept = keep_lesions(masks, idx, (1.0, 1.0, 1.0), 2.0)
    assert kept.sum() == 8 and not kept[2, 12, 12]
    # The same voxels are 8 x 6 mm^3 = 48 mm^3 at 2 x 1 x 3 mm voxels.
    assert keep_lesions(masks, idx, (2.0, 1.0, 3.0), 48.0).sum() == 8
    assert keep_lesions(masks, idx, (2.0, 1.0, 3.0), 49.0).sum() == 0
    # A gap in the slice indices breaks the connection between two rows of the stack.
    split = keep_lesions(masks[:2], np.array([5, 7]), (1.0, 1.0, 1.0), 5.0)
    assert split.sum() == 0, "two 4-voxel parts, not one of 8"


def test_anchored_mixed_masks_keep_components_reaching_an_unhealthy_slice():
    masks = torch.zeros(4, S, S, dtype=torch.bool)
    masks[0:2, 3:5, 3:5] = True  # spans slices 0 and 1
    masks[3, 9:11, 9:11] = True  # alone in slice 3
    unhealthy = torch.tensor([False, True, False, False])
    kept = anchored_mixed_masks(masks, unhealthy, np.arange(4))
    assert kept[0].sum() == 4, "the thin edge in a predicted-healthy slice stays with its anchored core"
    assert kept[1].sum() == 4 and kept[3].sum() == 0


def test_smoothing_along_slices_weights_present_neighbours_only():
    values = torch.tensor([4.0, 0.0, 8.0, 2.0])
    smooth = smooth_along_slices(values, np.array([0, 1, 2, 10]))
    assert smooth.tolist() == pytest.approx([(0.5 * 4 + 0.25 * 0) / 0.75, 0.25 * 4 + 0.25 * 8, (0.25 * 0 + 0.5 * 8) / 0.75, 2.0])


def test_best_threshold_by_hand():
    threshold, accuracy = best_threshold(np.array([0.1, 0.2, 0.35, 0.4, 0.9]), np.array([0, 0, 1, 0, 1]))
    assert accuracy == pytest.approx(0.8) and threshold == pytest.approx(0.65), "ties go to the higher threshold"
    threshold, accuracy = best_threshold(np.array([1.0, 1.0]), np.array([1, 1]))
    assert accuracy == 1.0 and threshold < 1.0, "everything unhealthy is a candidate"


def _volume(seed: int, lesion_slices: range, value: float = 1.0, noise: float = 0.1) -> ValidationVolume:
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(10, S, S, generator=g) * noise  # healthy tissue
    maps[list(lesion_slices), 6:9, 6:9] = value  # a 3 x 3 lesion over a few slices
    labels = np.zeros(10, dtype=np.int64)
    labels[list(lesion_slices)] = 1
    inputs = VolumeInputs(_brain(10), np.arange(30, 40), (1.0, 1.0, 1.0))
    return ValidationVolume(_result(maps), inputs, labels)


def test_calibration_separates_a_clear_lesion_with_image_labels_only_and_segments_it():
    volumes = [_volume(0, range(3, 6)), _volume(1, range(0, 0)), _volume(2, range(5, 9))]
    calibration = calibrate_volume_mode(volumes)
    assert calibration.mask_accuracy == 1.0 and calibration.accuracy == 1.0
    assert 0.0 < calibration.pixel_threshold < 0.8, "between the healthy tissue and the lesions"
    restored = VolumeCalibration.from_dict(calibration.to_dict())
    assert restored == calibration
    held_out = _volume(7, range(2, 4), value=0.8, noise=0.05)  # quieter than validation: no noise pixel passes
    out = volume_segment(held_out.result, held_out.inputs, calibration, setup="mixed")
    truth = torch.zeros(10, S, S, dtype=torch.bool)
    truth[2:4, 6:9, 6:9] = True
    assert calibration.map_filter in (1, 3), "a 5 x 5 median erases a 3 x 3 lesion: image labels see it"
    assert not (out.masks & ~truth).any()
    assert out.masks.sum() >= 5 * 2, "a 3 x 3 median keeps the centre and edges of a 3 x 3 lesion"
    assert torch.equal(out.mixed_masks, out.masks)
    assert out.predicted_unhealthy.tolist() == [False, False, True, True] + [False] * 6


def test_background_outside_the_brain_never_enters_the_threshold_or_the_mask():
    volume = _volume(0, range(3, 6))
    volume.result.aggregated_map[:, :, :, 0, 0] = 100.0  # a hot corner outside the brain
    calibration = calibrate_volume_mode([volume, _volume(1, range(0, 0))])
    assert calibration.pixel_threshold < 1.0
    out = volume_segment(volume.result, volume.inputs, calibration, setup="unhealthy")
    assert not out.masks[:, 0, 0].any()


def test_calibration_refuses_one_class():
    with pytest.raises(ValueError, match="healthy and unhealthy"):
        calibrate_volume_mode([_volume(1, range(0, 0))])


def test_volume_calibration_checks_its_fields():
    good = dict(map_filter=3, pixel_quantile=0.999, pixel_threshold=0.1, min_lesion_mm3=10.0, health="dmax", smooth_slices=False,
                health_threshold=0.5, accuracy=0.9, mask_accuracy=0.9)  # fmt: skip
    VolumeCalibration(**good)
    for key, bad in (("health", "cosine"), ("pixel_quantile", 1.5), ("pixel_threshold", float("nan")), ("min_lesion_mm3", -1.0),
                     ("map_filter", 4)):
        with pytest.raises(ValueError, match=key):
            VolumeCalibration(**{**good, key: bad})


def _components(mm3: list[float], false_positive: list[bool], healthy_ml: float) -> VolumeComponents:
    return VolumeComponents(np.array([0.0, *mm3]), np.array([False, *false_positive]), np.zeros(0), healthy_ml)


def test_fp_rate_size_takes_the_smallest_size_that_keeps_the_rate_on_healthy_slices():
    # 200 ml of healthy slices; false positives of 5, 12 and 40 mm^3; a 500 mm^3 lesion component (not a false positive)
    components = [_components([5.0, 12.0, 500.0], [True, True, False], 120.0), _components([40.0], [True], 80.0)]
    size, rate, rates = fp_rate_size(components, fp_rate=1.0, sizes=(0.0, 10.0, 20.0, 50.0))
    assert rates == pytest.approx([3 / 2, 2 / 2, 1 / 2, 0.0]), "false positives of at least each size per 100 ml"
    assert (size, rate) == (10.0, pytest.approx(1.0)), "the smallest size at the rate (inclusive)"
    assert fp_rate_size(components, fp_rate=0.0, sizes=(0.0, 10.0, 20.0, 50.0))[0] == 50.0
    size, rate, _ = fp_rate_size(components, fp_rate=0.0, sizes=(0.0, 10.0))
    assert (size, rate) == (10.0, pytest.approx(1.0)), "no candidate meets the rate: the largest, its rate reported"
    with pytest.raises(ValueError, match="ascending"):
        fp_rate_size(components, 1.0, sizes=(10.0, 0.0))


def test_volume_components_count_false_positives_in_slices_labelled_healthy_only():
    volume = _volume(0, range(3, 6))
    raw = torch.zeros(10, S, S, dtype=torch.bool)
    raw[3:5, 6:9, 6:9] = True  # on the labelled lesion: 18 voxels
    raw[5:7, 2:4, 2:4] = True  # reaches lesion slice 5: not a false positive
    raw[8, 10, 10] = True  # a speck in a healthy slice: a false positive of 1 mm^3
    comp = VolumeComponents.of(raw, volume)
    assert sorted(comp.mm3[1:].tolist()) == [1.0, 8.0, 18.0]
    assert comp.mm3[comp.false_positive].tolist() == [1.0]
    assert comp.healthy_ml == pytest.approx(7 * 12 * 12 / 1000.0), "brain of the 7 healthy slices, 1 mm^3 voxels"
    assert comp.slice_largest.tolist() == [0, 0, 0, 18, 18, 8, 8, 0, 1, 0]
