"""Tests of the calibration on validation slices (ALGORITHM.md section 6)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anofpdm_monai.calibration import (
    Calibration,
    DivergenceCurve,
    calibrate,
    plot_calibration,
    select_budget,
    select_guidance,
    select_threshold_01,
)
from anofpdm_monai.config import DiffusionConfig
from anofpdm_monai.forward_process import run_forward_process
from anofpdm_monai.networks import HEALTHY, UNHEALTHY, build_scheduler
from anofpdm_monai.segmentation import health_similarity

ABAR = build_scheduler(DiffusionConfig()).alphas_cumprod
QUANTILES = 0.005 + np.arange(100) * 0.09 / 99


# ---------------------------------------------------------------- thr_01


def test_select_threshold_01_by_hand():
    healthy = np.linspace(0.90, 0.99, 10)  # quantile q of these is 0.90 + 0.09 q for q < 1/9
    unhealthy = [0.5, 0.6, 0.905]
    thr, accuracy = select_threshold_01(healthy, unhealthy)
    # errors: healthy 0.90 < thr always (1); unhealthy 0.905 > thr unless thr >= 0.905.
    # first candidate with 0.90 + 0.09 q >= 0.905 is q = 0.005 + 56 * 0.09 / 99.
    assert thr == pytest.approx(0.90 + 0.09 * QUANTILES[56])
    assert QUANTILES[55] * 0.09 + 0.90 < 0.905 <= thr
    # rule "unhealthy iff sim <= thr": healthy 0.90 is wrong, the 12 others right
    assert accuracy == pytest.approx(12 / 13)


def test_select_threshold_01_ties_go_to_the_smallest_quantile():
    healthy = np.linspace(0.90, 0.99, 10)
    thr, accuracy = select_threshold_01(healthy, [0.1, 0.2])  # every candidate makes one error
    assert thr == pytest.approx(0.90 + 0.09 * 0.005)
    assert accuracy == pytest.approx(11 / 12)


@pytest.mark.parametrize("healthy, unhealthy, missing", [([], [0.5], "no healthy"), ([0.9], [], "no unhealthy")])
def test_select_threshold_01_needs_both_classes(healthy, unhealthy, missing):
    with pytest.raises(ValueError, match=missing) as info:
        select_threshold_01(healthy, unhealthy)
    assert "n_val" in str(info.value) and info.value.arguments == ("n_val",)  # the CLI says --n-val


# ---------------------------------------------------------------- w*


def test_select_guidance_99_percent_rule():
    assert select_guidance([0.5, 1, 2, 3], [0.80, 0.90, 0.895, 0.85]) == 2
    # a dip at w = 2 (below 99 % of 0.90) does not stop a later w = 3 that is within 99 % again
    assert select_guidance([1, 2, 3], [0.90, 0.80, 0.895]) == 3
    # unsorted grids are sorted together with their accuracies
    assert select_guidance([3, 1, 2, 0.5], [0.85, 0.90, 0.895, 0.80]) == 2
    # a steady rise keeps the largest; a single candidate is selected
    assert select_guidance([1, 2, 3], [0.7, 0.8, 0.9]) == 3
    assert select_guidance([5.0], [0.5]) == 5.0
    # exactly 99 % counts as within
    assert select_guidance([1, 2], [1.0, 0.99]) == 2


def test_select_guidance_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        select_guidance([], [])
    with pytest.raises(ValueError, match="same length"):
        select_guidance([1, 2], [0.9])
    with pytest.raises(ValueError, match="duplicates"):
        select_guidance([1, 1], [0.9, 0.8])


def test_select_budget_takes_the_most_accurate_and_ties_to_the_larger():
    assert select_budget([100, 300, 600], [0.80, 0.90, 0.85]) == 300
    assert select_budget([600, 100, 300], [0.90, 0.90, 0.70]) == 600  # tie: the larger budget
    assert select_budget([600], [0.1]) == 600
    with pytest.raises(ValueError, match="equal length"):
        select_budget([100, 200], [0.9])


# ---------------------------------------------------------------- calibrate end to end


class LabelPredictor:
    """Random nonlinear predictor whose healthy branch differs from null more on bright pixels."""

    def __init__(self, channels: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(channels, channels, 3, 3, generator=g) * 0.3
        self.calls = 0

    def __call__(self, x, t, labels):
        self.calls += 1
        eps = torch.tanh(F.conv2d(x, self.weight, padding=1)) + 0.5 * x
        return eps + 0.3 * (labels == HEALTHY).float().view(-1, 1, 1, 1) * torch.relu(x)


def validation_set(count_each=4, channels=2, size=8):
    g = torch.Generator().manual_seed(3)
    slices = (torch.rand(2 * count_each, channels, size, size, generator=g) - 0.5) * 1.2
    slices[count_each:, :, 2:6, 2:6] = 0.95  # "lesions" on the unhealthy half
    labels = torch.tensor([HEALTHY] * count_each + [UNHEALTHY] * count_each)
    return slices, labels


def test_calibrate_matches_separate_per_w_runs(tmp_path):
    slices, labels = validation_set()
    predictor = LabelPredictor(2)
    grid = [2.0, 0.5, 1.0]  # unsorted on purpose
    kwargs = dict(steps=6, stride=2, encoding="ddim", map_channels=(1, 0))
    calibration, curves = calibrate(
        predictor, ABAR, slices, labels, w_grid=grid, batch_size=5, generator=torch.Generator().manual_seed(9),
        progress=False, map_channel_names=["t2", "flair"], **kwargs,
    )  # fmt: skip
    assert predictor.calls == 2 * 3  # two batches x three visited steps, whatever the grid size

    # independent: one G = 1 run per w over the same batches and noise
    sims, dmaxes = [], []
    for w in sorted(grid):
        generator = torch.Generator().manual_seed(9)
        parts = [
            run_forward_process(predictor, slices[s : s + 5], ABAR, guidance_scales=[w], generator=generator, **kwargs)
            for s in (0, 5)
        ]
        sims.append(torch.cat([health_similarity(p.mse_h[0], p.mse_u[0]) for p in parts]))
        dmaxes.append(torch.cat([p.dmax[0] for p in parts]))
    expected = [select_threshold_01(s[labels == 0].numpy(), s[labels == 1].numpy()) for s in sims]
    assert calibration.w_grid == [0.5, 1.0, 2.0]
    assert calibration.thresholds == pytest.approx([thr for thr, _ in expected], abs=1e-6)
    assert calibration.accuracy == pytest.approx([acc for _, acc in expected])
    w_star = select_guidance(calibration.w_grid, calibration.accuracy)
    g = calibration.w_grid.index(w_star)
    assert calibration.w == w_star and calibration.thr_01 == calibration.thresholds[g]
    assert calibration.D == pytest.approx(dmaxes[g][labels == 1].amax(0).tolist(), rel=1e-5)
    assert (calibration.n_val, calibration.n_val_healthy, calibration.n_val_unhealthy) == (8, 4, 4)
    assert calibration.map_channels == ["t2", "flair"] and calibration.map_channel_indices == [1, 0]
    assert (calibration.steps, calibration.stride, calibration.encoding) == (6, 2, "ddim")

    assert [c.label for c in curves] == [HEALTHY] * 3 + [UNHEALTHY] * 3
    assert [c.index for c in curves] == [0, 1, 2, 4, 5, 6]
    for curve in curves:
        assert np.asarray(curve.divergence).shape == (3, 2) and curve.timesteps == [0, 2, 4]
        divergence = np.asarray(curve.divergence)
        assert curve.end_step == [curve.timesteps[i] for i in divergence.argmax(0)]

    path = tmp_path / "model" / "calibration.json"
    calibration.save(path)
    assert Calibration.load(path) == calibration
    assert [p.name for p in path.parent.iterdir()] == ["calibration.json"]  # no temporary left
    plot = tmp_path / "calibration.png"
    plot_calibration(calibration, curves, plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_over_budgets_equals_separate_runs_per_budget():
    """Each candidate budget gets exactly what a calibration with that budget alone gives.

    DDIM draws noise at the first visited step only, so the random numbers match across batches
    (DDPM draws per step: a standalone smaller budget would draw fewer numbers per batch).
    """
    slices, labels = validation_set()
    grid = [0.5, 1.0, 2.0]
    kwargs = dict(stride=2, encoding="ddim", map_channels=(0, 1), batch_size=3, progress=False)
    predictor = LabelPredictor(2)
    joint, curves = calibrate(
        predictor, ABAR, slices, labels, w_grid=grid, steps=[8, 4, 6], generator=torch.Generator().manual_seed(1), **kwargs
    )  # fmt: skip
    assert predictor.calls == 3 * 4  # three batches x the four visited steps of the largest budget only
    assert joint.steps_grid == [4, 6, 8]
    alone = {
        n: calibrate(LabelPredictor(2), ABAR, slices, labels, w_grid=grid, steps=n, generator=torch.Generator().manual_seed(1), **kwargs)[0]
        for n in (4, 6, 8)
    }  # fmt: skip
    for row, n in zip(joint.accuracy_by_steps, joint.steps_grid):
        assert row == pytest.approx(alone[n].accuracy)
    best = alone[select_budget(joint.steps_grid, [alone[n].accuracy[grid.index(alone[n].w)] for n in (4, 6, 8)])]
    assert joint.steps == best.steps
    assert (joint.w, joint.thr_01) == pytest.approx((best.w, best.thr_01))
    assert joint.D == pytest.approx(best.D, rel=1e-6)
    assert joint.accuracy == pytest.approx(best.accuracy) and joint.thresholds == pytest.approx(best.thresholds)
    assert alone[8].steps_grid == [8] and alone[8].accuracy_by_steps == [alone[8].accuracy]
    for curve in curves:  # full curves, t_e within the selected budget
        assert curve.timesteps == [0, 2, 4, 6] and all(t < joint.steps for t in curve.end_step)


def test_calibrate_budget_errors():
    slices, labels = validation_set(count_each=2)
    with pytest.raises(ValueError, match="duplicates"):
        calibrate(LabelPredictor(2), ABAR, slices, labels, w_grid=[1.0], steps=[4, 4], progress=False)
    with pytest.raises(ValueError, match="steps is empty"):
        calibrate(LabelPredictor(2), ABAR, slices, labels, w_grid=[1.0], steps=[], progress=False)


def test_calibration_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="anofpdm calibrate -m MODEL_DIR -d PREP"):
        Calibration.load(tmp_path / "calibration.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"w": 1.0}))
    with pytest.raises(ValueError, match="not a valid"):
        Calibration.load(bad)


def test_calibrate_bad_inputs():
    slices, labels = validation_set(count_each=2)
    kwargs = dict(steps=2, progress=False)
    with pytest.raises(ValueError, match="w_grid"):
        calibrate(LabelPredictor(2), ABAR, slices, labels, w_grid=[], **kwargs)
    with pytest.raises(ValueError, match="duplicates"):
        calibrate(LabelPredictor(2), ABAR, slices, labels, w_grid=[1.0, 1.0], **kwargs)
    with pytest.raises(ValueError, match="no unhealthy.*n_val"):
        calibrate(LabelPredictor(2), ABAR, slices, torch.full_like(labels, HEALTHY), w_grid=[1.0], **kwargs)
    with pytest.raises(ValueError, match="no healthy.*n_val"):
        calibrate(LabelPredictor(2), ABAR, slices, torch.full_like(labels, UNHEALTHY), w_grid=[1.0], **kwargs)
    with pytest.raises(ValueError, match="labels"):
        calibrate(LabelPredictor(2), ABAR, slices, torch.full_like(labels, 2), w_grid=[1.0], **kwargs)
    with pytest.raises(ValueError, match="labels"):
        calibrate(LabelPredictor(2), ABAR, slices, labels[:-1], w_grid=[1.0], **kwargs)


def test_plot_calibration_without_curves(tmp_path):
    calibration = Calibration(
        w=1.0, thr_01=0.9, D=[0.1], steps=4, stride=1, encoding="ddpm", map_channels=[0], map_channel_indices=[0],
        w_grid=[0.5, 1.0], accuracy=[0.7, 0.8], thresholds=[0.9, 0.9],
    )  # fmt: skip
    plot_calibration(calibration, [DivergenceCurve(0, HEALTHY, [0, 1], [[0.1], [0.2]], [1])], tmp_path / "a.png")
    plot_calibration(calibration, [], tmp_path / "b.png")
    budgets = dataclasses.replace(calibration, steps=2, steps_grid=[2, 4], accuracy_by_steps=[[0.7, 0.8], [0.6, 0.6]])
    plot_calibration(budgets, [DivergenceCurve(0, HEALTHY, [0, 1, 2, 3], [[0.1], [0.2], [0.1], [0.3]], [1])], tmp_path / "c.png")
    for name in ("a.png", "b.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibration_files_without_budget_fields_still_load(tmp_path):
    """calibration.json written before the budget grid existed (no steps_grid) loads with empty defaults."""
    data = Calibration(w=1.0, thr_01=0.9, D=[0.1], steps=4, stride=1, encoding="ddim", map_channels=[0], map_channel_indices=[0]).to_dict()
    del data["steps_grid"], data["accuracy_by_steps"]
    (tmp_path / "calibration.json").write_text(json.dumps(data))
    loaded = Calibration.load(tmp_path / "calibration.json")
    assert loaded.steps == 4 and loaded.steps_grid == [] and loaded.accuracy_by_steps == []


def test_schema_version_older_files_load_and_newer_ones_are_refused_naming_both(tmp_path):
    from anofpdm_monai.calibration import SCHEMA_VERSION
    from anofpdm_monai.io import InputError
    from anofpdm_monai.volume_mode import VolumeCalibration

    calibration = Calibration(w=1.0, thr_01=0.9, D=[0.1], steps=4, stride=1, encoding="ddim", map_channels=[0], map_channel_indices=[0])
    data = calibration.to_dict()
    assert data["schema_version"] == SCHEMA_VERSION and "sections" not in data
    old = {k: v for k, v in data.items() if k != "schema_version"}
    old["volume"] = None  # version 1 wrote the volume family's key, null without it
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = Calibration.load(tmp_path / "old.json")
    assert loaded.schema_version == SCHEMA_VERSION and loaded.section("volume") is None
    volume = dict(map_filter=3, pixel_quantile=0.99, pixel_threshold=1e-4, min_lesion_mm3=20.0, health="dmax",
                  smooth_slices=True, health_threshold=1e-4, accuracy=0.9, mask_accuracy=0.9)  # fmt: skip
    (tmp_path / "v1_volume.json").write_text(json.dumps({**old, "volume": volume}))
    # versions 1 and 2 chose the minimum lesion size by accuracy and did not say so: migrated as such
    migrated = VolumeCalibration(**volume, size_rule="accuracy", fp_rate=None)
    assert Calibration.load(tmp_path / "v1_volume.json").section("volume") == migrated  # typed once, on load
    (tmp_path / "v2_volume.json").write_text(json.dumps({**old, "schema_version": 2, "volume": volume}))
    assert Calibration.load(tmp_path / "v2_volume.json").section("volume") == migrated
    (tmp_path / "v3_volume.json").write_text(json.dumps({**data, "volume": {**volume, "fp_rate": 0.5}}))
    assert Calibration.load(tmp_path / "v3_volume.json").section("volume") == VolumeCalibration(**volume, fp_rate=0.5)
    (tmp_path / "new.json").write_text(json.dumps({**data, "schema_version": SCHEMA_VERSION + 1, "future": 1}))
    with pytest.raises(InputError) as err:
        Calibration.load(tmp_path / "new.json")
    assert str(err.value) == (f"{tmp_path / 'new.json'}: written with schema_version {SCHEMA_VERSION + 1}, but this "
                              f"anofpdm_monai reads up to {SCHEMA_VERSION}; upgrade anofpdm_monai to a release that reads it")  # fmt: skip
    (tmp_path / "bad.json").write_text(json.dumps({**old, "volume": {**volume, "health": "nope"}}))
    with pytest.raises(InputError, match="the 'volume' section is not valid"):
        Calibration.load(tmp_path / "bad.json")
