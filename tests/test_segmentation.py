"""Tests of the per-slice decisions (ALGORITHM.md section 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from anofpdm_monai.calibration import Calibration
from anofpdm_monai.config import DiffusionConfig
from anofpdm_monai.forward_process import run_forward_process
from anofpdm_monai.networks import HEALTHY, build_scheduler
from anofpdm_monai.segmentation import (
    anomaly_map,
    decide_slices,
    dynamic_threshold,
    health_similarity,
    min_component_area,
    predict_unhealthy,
    keep_components,
    rowwise_quantile,
)

ABAR = build_scheduler(DiffusionConfig()).alphas_cumprod


def make_calibration(thr_01: float, D: list[float]) -> Calibration:
    return Calibration(
        w=1.0, thr_01=thr_01, D=D, steps=10, stride=2, encoding="ddim", map_channels=[0, 2], map_channel_indices=[0, 2]
    )


# ---------------------------------------------------------------- unit decisions


def test_health_similarity_is_cosine_of_channel_means():
    mse_h = torch.tensor([[[1.0, 3.0], [2.0, 2.0], [0.0, 2.0]]])  # (B=1, K=3, M=2): means 2, 2, 1
    mse_u = torch.tensor([[[1.0, 1.0], [0.0, 4.0], [3.0, 3.0]]])  # means 1, 2, 3
    expected = (2 * 1 + 2 * 2 + 1 * 3) / (np.sqrt(4 + 4 + 1) * np.sqrt(1 + 4 + 9))
    torch.testing.assert_close(health_similarity(mse_h, mse_u), torch.tensor([expected], dtype=torch.float32))
    stacked = health_similarity(torch.stack([mse_h, mse_u]), torch.stack([mse_u, mse_u]))  # (G=2, B=1)
    assert stacked.shape == (2, 1) and stacked[1, 0] == pytest.approx(1.0)


def test_predict_unhealthy_includes_the_threshold():
    assert predict_unhealthy(torch.tensor([0.5, 0.7, 0.9]), 0.7).tolist() == [True, True, False]


def test_anomaly_map_is_channel_mean_then_zero_padded_median():
    g = torch.Generator().manual_seed(0)
    per_channel = torch.rand(2, 3, 9, 9, generator=g)
    expected = ndimage.median_filter(per_channel.mean(1).numpy(), size=(1, 5, 5), mode="constant", cval=0.0)
    torch.testing.assert_close(anomaly_map(per_channel), torch.from_numpy(expected))


def test_rowwise_quantile_matches_torch_quantile():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(4, 37, generator=g)
    q = torch.tensor([0.9, 0.94, 0.98, 0.5])
    expected = torch.stack([torch.quantile(values[i], q[i]) for i in range(4)])
    torch.testing.assert_close(rowwise_quantile(values, q), expected)


def test_dynamic_threshold_by_hand():
    # pixels 0..99 on a 10 x 10 slice; channel 1 is twice channel 0
    base = torch.arange(100.0).view(1, 1, 10, 10)
    per_channel = torch.cat([base, 2 * base], dim=1)
    # r = [0.25 -> 0.25, 3.0 -> clamp 1], q = [0.96, 0.90]
    quantile, threshold = dynamic_threshold(per_channel, torch.tensor([[0.5, 6.0]]), [2.0, 2.0])
    torch.testing.assert_close(quantile, torch.tensor([[0.96, 0.90]]))
    expected = (0.96 * 99 + 2 * 0.90 * 99) / 2  # quantile of 0..99 at q is 99 q
    torch.testing.assert_close(threshold, torch.tensor([expected]))
    # rounding to 2 decimals: 0.123 -> 0.12, q = 0.98 - 0.0096
    quantile, _ = dynamic_threshold(per_channel[:, :1], torch.tensor([[0.123]]), [1.0])
    torch.testing.assert_close(quantile, torch.tensor([[0.98 - 0.08 * 0.12]]))
    with pytest.raises(ValueError, match="D"):
        dynamic_threshold(per_channel, torch.tensor([[0.5, 6.0]]), [2.0])
    with pytest.raises(ValueError, match="D"):
        dynamic_threshold(per_channel, torch.tensor([[0.5, 6.0]]), [2.0, 0.0])


def test_keep_components_planar_is_8_connected_and_keeps_min_size():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 2, 2] = True  # one diagonal component of 3 pixels
    mask[0, 5:7, 5:7] = True  # a 2 x 2 block of 4 pixels
    kept = keep_components(mask, 4, unit="voxels", planar=True)
    assert kept[0, 5:7, 5:7].all() and int(kept.sum()) == 4 and kept.dtype == torch.bool
    assert torch.equal(keep_components(mask, 3, unit="voxels", planar=True), mask)  # the diagonal counts as one of 3
    assert not keep_components(mask, 5, unit="voxels", planar=True).any()
    assert torch.equal(keep_components(mask, 0, unit="voxels", planar=True), mask)
    # the paper's rule (area <= max_area removed) is min_size = max_area + 1
    assert torch.equal(keep_components(mask, 3 + 1, unit="voxels", planar=True), kept)


def test_keep_components_in_mm3_counts_voxel_volume_and_planes_stay_apart():
    volume = np.zeros((6, 6, 6), dtype=np.uint8)
    volume[0:2, 0:2, 0:2] = 1  # 8 voxels
    volume[4, 4, 4] = 1  # 1 voxel
    kept = keep_components(volume, 16.0, unit="mm3", voxel_mm3=2.0)  # 8 voxels x 2 mm^3 = 16 mm^3: kept
    assert kept.dtype == np.uint8 and int(kept.sum()) == 8 and kept[4, 4, 4] == 0
    assert not keep_components(volume, 16.5, unit="mm3", voxel_mm3=2.0).any()
    # planar: the 2 x 2 x 2 block is two 4-pixel parts, one per plane of the last two axes
    planes = torch.from_numpy(volume.astype(bool))
    assert int(keep_components(planes, 4, unit="voxels", planar=True).sum()) == 8
    assert not keep_components(planes, 5, unit="voxels", planar=True).any()
    assert int(keep_components(planes, 5, unit="voxels").sum()) == 8  # as one (6, 6, 6) volume the block is one of 8
    with pytest.raises(ValueError, match="voxel_mm3"):
        keep_components(volume, 1.0, unit="mm3")



def test_min_component_area_scales_with_s_squared():
    assert min_component_area(128) == 40
    assert min_component_area(64) == 10
    assert min_component_area(256) == 160
    assert min_component_area(16) == 1 and min_component_area(8) == 1


# ---------------------------------------------------------------- end to end on a region predictor

SIZE, STRIDE, W = 16, 2, 1.0
H = torch.tensor(
    [
        [0.1, 0.3, 0.5, 0.2, 0.4],  # map channel 0: t_e at index 2 (t = 4)
        [0.9, 0.9, 0.9, 0.9, 0.9],  # not a map channel: must not matter
        [0.2, 0.6, 0.1, 0.3, 0.5],  # map channel 2: t_e at index 1 (t = 2)
    ]
)
REGION = (slice(6, 10), slice(3, 7))  # 4 x 4 = 16 of 256 pixels


def region_setup():
    """x0, and a predictor whose HGP is x0 - (1 + w) H[c, i] inside REGION at visited step i; UGP = x0."""
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(1, 3, SIZE, SIZE, generator=g) - 0.5) * 1.6
    x0[..., REGION[0], REGION[1]] = 0.5
    region = torch.zeros(SIZE, SIZE)
    region[REGION] = 1.0

    def predict(x, t, labels):
        a = ABAR[t].view(-1, 1, 1, 1)
        exact = (x - a.sqrt() * x0.repeat(2, 1, 1, 1)) / (1 - a).sqrt()
        shift = H[:, t // STRIDE].T[:, :, None, None] * region / ((1 - a) / a).sqrt()
        return exact + torch.where((labels == HEALTHY).view(-1, 1, 1, 1), shift, torch.zeros_like(shift))

    return x0, predict


def run_region(include_end_step=True):
    x0, predict = region_setup()
    return run_forward_process(
        predict, x0, ABAR, guidance_scales=[W], steps=10, stride=STRIDE, map_channels=(0, 2),
        include_end_step=include_end_step, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip


def expected_mask(values: tuple[float, float], threshold: float) -> np.ndarray:
    """Hand-built map (channel mean of the region values), scipy median, threshold."""
    hand = np.zeros((SIZE, SIZE))
    hand[REGION] = np.mean(values)
    return ndimage.median_filter(hand, size=5, mode="constant", cval=0.0) >= threshold


@pytest.mark.parametrize("variant", ["aggregated", "last"])
def test_segment_region_predictor_by_hand(variant):
    result = run_region()
    # hand computation: d_i[m] = (16 / 256) ((1 + w) H[m, i])^2, t_e = argmax
    scale = (1 + W) ** 2
    dmax = [16 / 256 * scale * 0.5**2, 16 / 256 * scale * 0.6**2]
    assert result.end_step[0, 0].tolist() == [4, 2]
    torch.testing.assert_close(result.dmax[0, 0], torch.tensor(dmax), atol=1e-6, rtol=0)
    if variant == "aggregated":  # mean of SAMs up to and including t_e
        values = (scale * (0.1**2 + 0.3**2 + 0.5**2) / 3, scale * (0.2**2 + 0.6**2) / 2)
    else:  # SAM at t_e
        values = (scale * 0.5**2, scale * 0.6**2)
    # D chosen so that r = [0.50, 0.52]: q = [0.94, 0.9384]; positions q * 255 = 239.7 and 239.292
    # fall between the 240 background zeros and the 16 region values: quantile = frac * value.
    calibration = make_calibration(thr_01=2.0, D=[dmax[0] / 0.5, dmax[1] / 0.52])
    threshold = (0.7 * values[0] + 0.292 * values[1]) / 2
    out = decide_slices(result, calibration, variant=variant)
    torch.testing.assert_close(out.quantile, torch.tensor([[0.94, 0.9384]]), atol=1e-6, rtol=0)
    assert out.threshold.item() == pytest.approx(threshold, rel=1e-4)
    assert out.predicted_unhealthy.tolist() == [True]
    assert out.end_step.tolist() == [[4, 2]]
    mask = expected_mask(values, threshold)
    assert mask.sum() == 4  # the median filter keeps the 2 x 2 core of the 4 x 4 block
    assert np.array_equal(out.masks[0].numpy(), mask)
    peak = np.unravel_index(int(out.maps[0].argmax()), (SIZE, SIZE))
    assert REGION[0].start <= peak[0] < REGION[0].stop and REGION[1].start <= peak[1] < REGION[1].stop


def test_aggregated_map_excluding_end_step_by_hand():
    result = run_region(include_end_step=False)
    scale = (1 + W) ** 2
    region_values = result.aggregated_map[0, 0][:, REGION[0], REGION[1]]
    expected = torch.tensor([scale * (0.1**2 + 0.3**2) / 2, scale * 0.2**2])
    torch.testing.assert_close(region_values.mean((-2, -1)), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(region_values.amax((-2, -1)), region_values.amin((-2, -1)), atol=1e-5, rtol=0)


def test_segment_setups_for_a_slice_predicted_healthy():
    result = run_region()
    healthy = make_calibration(thr_01=-2.0, D=[0.05, 0.05])
    mixed = decide_slices(result, healthy, setup="mixed")
    unhealthy = decide_slices(result, healthy, setup="unhealthy")
    assert mixed.predicted_unhealthy.tolist() == [False]
    assert not mixed.masks.any()
    assert unhealthy.masks.any()
    torch.testing.assert_close(mixed.maps, unhealthy.maps)


def test_segment_bad_arguments():
    x0, predict = region_setup()
    two = run_forward_process(predict, x0, ABAR, guidance_scales=[1.0, 2.0], steps=4, stride=STRIDE)
    calibration = make_calibration(thr_01=0.5, D=[1.0])
    with pytest.raises(ValueError, match="G = 2"):
        decide_slices(two, calibration)
    with pytest.raises(ValueError, match="setup"):
        decide_slices(two.select(0), calibration, setup="healthy")
    with pytest.raises(ValueError, match="variant"):
        decide_slices(two.select(0), calibration, variant="first")
    assert decide_slices(two.select(1), calibration).masks.shape == (1, SIZE, SIZE)


def test_overlay_shows_largest_masks_then_strongest_maps():
    from anofpdm_monai.visualize import overlay_slices

    maps = torch.zeros(5, 4, 4)
    maps[:, 0, 0] = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7])
    masks = torch.zeros(5, 4, 4, dtype=torch.bool)
    masks[3, :2] = True  # 8 pixels
    masks[0, 0] = True  # 4 pixels
    assert overlay_slices(maps, masks, 4).tolist() == [3, 0, 1, 4]  # then by map maximum
    assert overlay_slices(maps, torch.zeros_like(masks), 2).tolist() == [1, 4]


@pytest.mark.parametrize("connectivity", [26, 18, 6])
def test_label_components_at_each_connectivity_is_ndimage_label(connectivity):
    from anofpdm_monai.scoring import components
    from anofpdm_monai.segmentation import VOLUME_CONNECTIVITY, label_components

    mask = np.random.default_rng(connectivity).random((12, 11, 10)) > 0.7
    expected, n = ndimage.label(mask, structure=VOLUME_CONNECTIVITY[connectivity])
    labels, sizes = label_components(mask, connectivity=connectivity)
    np.testing.assert_array_equal(labels, expected)
    assert len(sizes) == n + 1 and sizes[1:].sum() == mask.sum()
    scored, count = components(mask, connectivity)
    np.testing.assert_array_equal(scored, expected)
    assert count == n
    assert label_components(np.zeros((3, 3, 3), bool), connectivity=connectivity)[1].tolist() == [27]
    with pytest.raises(ValueError, match="connectivity"):
        label_components(mask, connectivity=4)
