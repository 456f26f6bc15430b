"""Tests of anofpdm_monai.baselines: oracle thresholds and the DDIB reconstruction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anofpdm_monai.baselines import (
    apply_threshold,
    best_threshold_dice,
    ddib_reconstruction,
    lesion_polarity,
    tune_pixel_threshold,
)
from anofpdm_monai.networks import HEALTHY, NULL


def _brute_force(values: np.ndarray, labels: np.ndarray, low: bool) -> float:
    best = 0.0
    for thr in np.unique(values):
        pred = values <= thr if low else values >= thr
        best = max(best, 2 * np.sum(pred & labels) / (pred.sum() + labels.sum()))
    return best


def _alphas_cumprod(T: int = 1000) -> torch.Tensor:
    return torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)


def test_best_threshold_hand_values():
    x = np.array([0.1, 0.2, 0.8, 0.9])
    assert tuple(best_threshold_dice(x, np.array([0, 0, 1, 1], bool))) == pytest.approx((0.8, 1.0, "high"))
    hypo = best_threshold_dice(x, np.array([1, 1, 0, 0], bool), direction="best")
    assert (hypo.threshold, hypo.dice, hypo.direction) == (0.2, 1.0, "low")
    # restricted candidates: thr 0.85 -> 2*1/(1+2); thr 0.15 -> 2*2/(3+2)
    cand = best_threshold_dice(x, np.array([0, 0, 1, 1], bool), candidates=[0.15, 0.85])
    assert (cand.threshold, cand.dice) == pytest.approx((0.15, 0.8))


@pytest.mark.parametrize("direction", ["high", "low"])
def test_best_threshold_matches_brute_force(direction):
    rng = np.random.default_rng(0)
    values = np.round(rng.normal(size=400), 2)  # rounding makes ties
    labels = rng.random(400) < 1 / (1 + np.exp(-3 * (values if direction == "high" else -values)))
    result = best_threshold_dice(values, labels, direction=direction)
    assert result.direction == direction
    assert result.dice == pytest.approx(_brute_force(values, labels, low=direction == "low"))
    pred = apply_threshold(values, result.threshold, result.direction)
    assert 2 * np.sum(pred & labels) / (pred.sum() + labels.sum()) == pytest.approx(result.dice)


def test_best_threshold_errors():
    with pytest.raises(ValueError):
        best_threshold_dice(np.arange(3.0), np.zeros(3, bool))
    with pytest.raises(ValueError):
        best_threshold_dice(np.arange(3.0), np.ones(3, bool), direction="up")


def test_tune_pixel_threshold_ignores_background():
    maps = np.array([[[0.1, 0.6], [0.7, 0.05]]])
    masks = np.array([[[False, True], [True, True]]])
    fg = np.array([[[True, True], [True, False]]])  # the faint lesion pixel lies outside the brain
    assert tune_pixel_threshold(torch.from_numpy(maps), masks, fg) == pytest.approx(0.6)  # DICE 1
    assert tune_pixel_threshold(maps, masks) == pytest.approx(0.05)  # all pixels: 6/7 beats 0.6's 4/5


class _ExactPredictor:
    """eps that is exact for a known x0: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t); records calls."""

    def __init__(self, x0: torch.Tensor, abar: torch.Tensor) -> None:
        self.x0, self.abar, self.calls = x0, abar.float(), []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls.append((int(t[0]), labels.tolist()))
        a = self.abar[t].view(-1, 1, 1, 1)
        x0 = self.x0.repeat(x_t.shape[0] // self.x0.shape[0], 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def test_ddib_exact_predictor_reconstructs_x0():
    abar = _alphas_cumprod()
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    predictor = _ExactPredictor(x0, abar)
    out = ddib_reconstruction(predictor, x0, abar, depth=50, w=2.0, stride=10, map_channels=[0, 2])
    assert out.maps.shape == (2, 8, 8)
    assert out.maps.max() < 1e-8
    torch.testing.assert_close(out.reconstruction, x0, atol=1e-4, rtol=0)
    assert out.network_calls == 9 == len(predictor.calls)  # steps 0..40: 4 encoding + 5 decoding
    assert [t for t, _ in predictor.calls] == [0, 10, 20, 30, 40, 30, 20, 10, 0]
    assert all(labels == [NULL] * 2 for _, labels in predictor.calls[:4])
    assert all(labels == [HEALTHY] * 2 + [NULL] * 2 for _, labels in predictor.calls[4:])


def test_ddib_guided_step_hand_value():
    abar = _alphas_cumprod()
    x0 = torch.tensor([[[[0.5, -0.2]], [[0.1, 0.0]]]])  # (1, 2, 1, 2)
    w, eps_c, eps_u = 3.0, 0.4, -0.1

    def predictor(x_t, t, labels):
        return torch.where(labels == HEALTHY, eps_c, eps_u).view(-1, 1, 1, 1).expand_as(x_t)

    out = ddib_reconstruction(predictor, x0, abar, depth=1, w=w, stride=1, map_channels=[1])
    a0 = float(abar[0])
    eps_g = (1 + w) * eps_c - w * eps_u
    expected = ((x0 - math.sqrt(1 - a0) * eps_g) / math.sqrt(a0)).clamp(-1, 1)
    assert out.network_calls == 1
    torch.testing.assert_close(out.reconstruction, expected)
    torch.testing.assert_close(out.maps, (x0[:, 1] - expected[:, 1]) ** 2)


def test_ddib_argument_checks():
    abar = _alphas_cumprod(10)
    x0 = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError):
        ddib_reconstruction(None, x0, abar, depth=11, w=1.0, stride=1, map_channels=[0])
    with pytest.raises(ValueError):
        ddib_reconstruction(None, x0, abar, depth=5, w=1.0, stride=0, map_channels=[0])
    with pytest.raises(ValueError):
        ddib_reconstruction(None, x0, abar, depth=5, w=1.0, stride=1, map_channels=[2])


def test_lesion_polarity_follows_the_sequences():
    assert lesion_polarity(["flair", "t2"]) == "high"  # BraTS map channels: lesions brighter
    assert lesion_polarity(["t1"]) == lesion_polarity(["T1w"]) == "low"  # ATLAS T1w: stroke cavities darker
    assert lesion_polarity(["flair", "t1"]) == "best"  # disagreeing sequences: both directions are tried
    assert lesion_polarity(["0000"]) == lesion_polarity(["t1ce"]) == lesion_polarity([]) == "best"  # unknown
