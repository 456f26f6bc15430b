"""Tests of anofpdm_monai.reconstruction: AnoDDPM, classifier-guided DDIM, CG-CDM and the grid tuning."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

import anofpdm_monai.noise as noise_module
from anofpdm_monai.config import NetworkConfig
from anofpdm_monai.networks import HEALTHY, NULL, UNHEALTHY, NoisePredictor, build_network
from anofpdm_monai.reconstruction import (
    InterpolatedConditionPredictor,
    anoddpm_reconstruction,
    cgcdm_map,
    classifier_guided_reconstruction,
    per_slice_dice,
    tune_on_grid,
)

T = 1000
ABAR = DDPMScheduler(num_train_timesteps=T).alphas_cumprod  # linear betas 1e-4 to 0.02


def _x0(batch: int = 4, channels: int = 2, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand((batch, channels, size, size), generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


def _gens(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class _Pointwise:
    """A closed-form eps predictor whose x_0 guess is 0.6 tanh(x_t): no per-slice state; records calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], list[int]]] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls.append((t.tolist(), labels.tolist()))
        a = ABAR.to(x_t.device)[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * 0.6 * torch.tanh(x_t)) / (1 - a).sqrt()


class _Exact:
    """eps that is exact for known clean slices x0 (B, C, S, S)."""

    def __init__(self, x0: torch.Tensor) -> None:
        self.x0, self.calls = x0, 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        a = ABAR[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()


class _BrightnessClassifier:
    """Logits (-k m, k m) for the slice mean m: brighter slices look unhealthy. Records the timesteps."""

    def __init__(self, k: float = 20.0) -> None:
        self.k, self.steps = k, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.steps.append(int(t[0]))
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-self.k * m, self.k * m], dim=1)


# ---------------------------------------------------------------------------
# AnoDDPM
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["gaussian", "simplex"])
def test_anoddpm_shapes_calls_seed_and_batch_independence(noise):
    x0 = _x0()
    pred = _Pointwise()
    full = anoddpm_reconstruction(pred, x0, ABAR, depth=30, stride=4, map_channels=[1], noise=noise, generators=_gens(range(4)))
    assert full.maps.shape == (4, 8, 8) and full.reconstruction.shape == x0.shape
    assert full.network_calls == len(pred.calls) == math.ceil(30 / 4)
    assert [c[0][0] for c in pred.calls] == [28, 24, 20, 16, 12, 8, 4, 0]  # top down
    assert all(set(c[1]) == {NULL} for c in pred.calls)  # the model is unconditional
    torch.testing.assert_close(full.maps, (x0[:, 1] - full.reconstruction[:, 1]).square())
    again = anoddpm_reconstruction(_Pointwise(), x0, ABAR, depth=30, stride=4, map_channels=[1], noise=noise, generators=_gens(range(4)))
    assert torch.equal(again.maps, full.maps)
    other = anoddpm_reconstruction(_Pointwise(), x0, ABAR, depth=30, stride=4, map_channels=[1], noise=noise, generators=_gens(range(10, 14)))
    assert not torch.allclose(other.maps, full.maps)
    parts = [anoddpm_reconstruction(_Pointwise(), x0[i:j], ABAR, depth=30, stride=4, map_channels=[1], noise=noise,
                                    generators=_gens(range(i, j))) for i, j in ((0, 1), (1, 4))]  # fmt: skip
    torch.testing.assert_close(torch.cat([p.maps for p in parts]), full.maps)


def test_anoddpm_simplex_draws_simplex_noise_for_every_step(monkeypatch):
    drawn = []
    real = noise_module.simplex_noise

    def counting(shape, generator=None, **kwargs):
        drawn.append(tuple(shape))
        return real(shape, generator, **kwargs)

    monkeypatch.setattr(noise_module, "simplex_noise", counting)
    x0 = _x0(batch=2)
    anoddpm_reconstruction(_Pointwise(), x0, ABAR, depth=10, stride=2, map_channels=[0], noise="gaussian", generators=_gens([0, 1]))
    assert drawn == []
    anoddpm_reconstruction(_Pointwise(), x0, ABAR, depth=10, stride=2, map_channels=[0], noise="simplex", generators=_gens([0, 1]))
    assert drawn == [tuple(x0.shape)] * 5  # the first noising and the 4 moves that add noise (none from step 0)


def test_anoddpm_equals_monai_ddpm_scheduler_at_stride_1():
    x0 = _x0(batch=1)
    depth, pred, g = 12, _Pointwise(), torch.Generator().manual_seed(5)
    sched = DDPMScheduler(num_train_timesteps=T)  # variance "fixed_small", clip_sample=True
    x = ABAR[depth - 1].sqrt() * x0 + (1 - ABAR[depth - 1]).sqrt() * torch.randn(x0.shape, generator=g)
    for t in range(depth - 1, -1, -1):
        x, _ = sched.step(pred(x, torch.tensor([t]), torch.tensor([NULL])), t, x, generator=g)
    ours = anoddpm_reconstruction(_Pointwise(), x0, ABAR, depth=depth, map_channels=[0], generators=_gens([5]))
    torch.testing.assert_close(ours.reconstruction, x, atol=1e-4, rtol=1e-4)  # MONAI's float32 coefficients


def test_anoddpm_stride_is_the_ddpm_respaced_onto_the_visited_steps():
    x0 = _x0(batch=1)
    visited = list(range(0, 40, 7))
    abar_v = ABAR[visited]
    sched = DDPMScheduler(num_train_timesteps=len(visited))  # then respaced by hand, as improved-diffusion does
    sched.alphas_cumprod = abar_v
    sched.betas = 1 - abar_v / torch.cat([torch.ones(1), abar_v[:-1]])
    sched.alphas = 1 - sched.betas
    pred, g = _Pointwise(), torch.Generator().manual_seed(2)
    x = abar_v[-1].sqrt() * x0 + (1 - abar_v[-1]).sqrt() * torch.randn(x0.shape, generator=g)
    for i in range(len(visited) - 1, -1, -1):
        x, _ = sched.step(pred(x, torch.tensor([visited[i]]), torch.tensor([NULL])), i, x, generator=g)
    ours = anoddpm_reconstruction(_Pointwise(), x0, ABAR, depth=40, stride=7, map_channels=[0], generators=_gens([2]))
    torch.testing.assert_close(ours.reconstruction, x, atol=1e-4, rtol=1e-4)  # MONAI's float32 coefficients


def test_anoddpm_exact_model_reconstructs_and_bad_arguments_fail():
    x0 = _x0()
    result = anoddpm_reconstruction(_Exact(x0), x0, ABAR, depth=50, stride=5, map_channels=[0, 1], noise="simplex",
                                    generators=_gens(range(4)))  # fmt: skip
    assert float(result.maps.max()) < 1e-8
    with pytest.raises(ValueError, match="noise"):
        anoddpm_reconstruction(_Exact(x0), x0, ABAR, depth=5, map_channels=[0], noise="perlin")
    with pytest.raises(ValueError, match="generators"):
        anoddpm_reconstruction(_Exact(x0), x0, ABAR, depth=5, map_channels=[0], generators=_gens([0, 1]))


# ---------------------------------------------------------------------------
# DDIM with classifier guidance
# ---------------------------------------------------------------------------


def test_classifier_guided_exact_model_without_guidance_reconstructs():
    x0 = _x0()
    pred, clf = _Exact(x0), _BrightnessClassifier()
    result = classifier_guided_reconstruction(pred, clf, x0, ABAR, depth=60, stride=10, scale=0.0, map_channels=[0])
    assert float(result.maps.max()) < 1e-5
    assert (result.network_calls, pred.calls, result.classifier_calls, clf.steps) == (11, 11, 0, [])


def test_classifier_guidance_pushes_towards_healthy():
    x0 = _x0()
    means = []
    for scale in (0.0, 2.0, 8.0):
        clf = _BrightnessClassifier()
        result = classifier_guided_reconstruction(_Exact(x0), clf, x0, ABAR, depth=60, stride=10, scale=scale, map_channels=[0, 1])
        means.append(float(result.reconstruction.mean()))
        torch.testing.assert_close(result.maps, (x0 - result.reconstruction).abs().mean(dim=1))
        if scale:
            assert result.classifier_calls == 6 and clf.steps == [50, 40, 30, 20, 10, 0]  # decoding, top down
    assert means[0] > means[1] > means[2]  # the classifier calls darker slices healthy


def test_classifier_guided_batch_independence():
    x0 = _x0()
    full = classifier_guided_reconstruction(_Pointwise(), _BrightnessClassifier(), x0, ABAR, depth=40, stride=8, scale=3.0,
                                            map_channels=[0])  # fmt: skip
    parts = [classifier_guided_reconstruction(_Pointwise(), _BrightnessClassifier(), x0[i:j], ABAR, depth=40, stride=8,
                                              scale=3.0, map_channels=[0]) for i, j in ((0, 3), (3, 4))]  # fmt: skip
    torch.testing.assert_close(torch.cat([p.maps for p in parts]), full.maps)
    with pytest.raises(ValueError, match="logits"):
        classifier_guided_reconstruction(_Pointwise(), lambda x, t: x.mean(dim=(2, 3)).repeat(1, 2)[:, :3], x0, ABAR,
                                         depth=5, scale=1.0, map_channels=[0])  # fmt: skip


# ---------------------------------------------------------------------------
# CG-CDM
# ---------------------------------------------------------------------------


class _MixedBlob:
    """Mixed-condition eps that is exact for the image ``base + y * blob``: the condition only changes the blob."""

    def __init__(self, base: torch.Tensor, blob: torch.Tensor) -> None:
        self.base, self.blob, self.calls = base, blob, []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((t.tolist(), y.tolist()))
        a = ABAR[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * (self.base + y.view(-1, 1, 1, 1) * self.blob)) / (1 - a).sqrt()


def _blob(sign: float = 1.0) -> torch.Tensor:
    blob = torch.zeros(1, 2, 8, 8)
    blob[:, :, 2:5, 3:6] = 0.3 * sign
    blob[:, :, 3, 4] = 0.5 * sign
    return blob


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cgcdm_finds_where_the_condition_acts(sign):
    blob = _blob(sign)
    base = torch.full((1, 2, 8, 8), -0.2)
    pred = _MixedBlob(base, blob)
    result = cgcdm_map(pred, base.expand(2, -1, -1, -1), ABAR, depth=101, map_channels=[0, 1], absolute=True,
                       generators=_gens([0, 1]))  # fmt: skip
    assert result.maps.shape == (2, 8, 8) and result.derivative.shape == (2, 2, 8, 8)
    assert result.network_calls == len(pred.calls) == 10 and result.classifier_calls == 0
    assert [c[0][0] for c in pred.calls] == list(range(100, 90, -1))
    assert pred.calls[0][1] == pytest.approx([1.0, 1.0, 0.95, 0.95])  # both conditions in one call
    outside = blob[0, 0] == 0
    assert torch.all(result.maps[:, outside] == 0) and torch.all(result.maps[:, 3, 4] == 1)
    signed = cgcdm_map(_MixedBlob(base, blob), base.expand(2, -1, -1, -1), ABAR, depth=101, map_channels=[0],
                       generators=_gens([0, 1]))  # fmt: skip
    # the signed map puts a dark lesion at the minimum (float cancellation in x(1) - x(0.95): atol)
    torch.testing.assert_close(signed.maps, result.maps if sign > 0 else 1 - result.maps, atol=1e-3, rtol=0)


def test_cgcdm_seed_batch_independence_and_guidance():
    x0 = _x0()
    pred = _MixedBlob(torch.zeros(1, 2, 8, 8), _blob())

    def run(x, seeds, **kw):
        return cgcdm_map(pred, x, ABAR, depth=60, steps=4, stride=3, map_channels=[0], generators=_gens(seeds), **kw)

    full = run(x0, range(4))
    assert torch.equal(run(x0, range(4)).maps, full.maps)
    torch.testing.assert_close(torch.cat([run(x0[:1], [0]).maps, run(x0[1:], [1, 2, 3]).maps]), full.maps)
    clf = _BrightnessClassifier()
    guided = run(x0, range(4), classifier=clf, scale=5.0)
    assert guided.classifier_calls == 4 and clf.steps == [57, 54, 51, 48]
    assert not torch.allclose(guided.derivative, full.derivative)
    with pytest.raises(ValueError, match="classifier"):
        run(x0, range(4), scale=5.0)
    with pytest.raises(ValueError, match="steps"):
        cgcdm_map(pred, x0, ABAR, depth=10, steps=11, map_channels=[0])


def test_interpolated_condition_predictor_mixes_the_class_embeddings():
    cfg = NetworkConfig(image_size=16, in_channels=1, channels=(8, 8), attention_levels=(False, False), num_head_channels=8,
                        norm_num_groups=4)  # fmt: skip
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():  # MONAI zero-initialises the output layer; make every weight count
            p.add_(torch.randn_like(p) * 0.1)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 300])
    mixed, plain = InterpolatedConditionPredictor(net), NoisePredictor(net)
    for y, label in ((1.0, UNHEALTHY), (0.0, HEALTHY)):
        torch.testing.assert_close(mixed(x, t, torch.full((2,), y)), plain(x, t, torch.full((2,), label)))
    half = copy.deepcopy(net)
    with torch.no_grad():
        half.class_embedding.weight[NULL] = net.class_embedding.weight[[HEALTHY, UNHEALTHY]].mean(dim=0)
    torch.testing.assert_close(mixed(x, t, torch.full((2,), 0.5)), NoisePredictor(half)(x, t, torch.full((2,), NULL)))
    assert not net.class_embedding._forward_hooks  # the hook is removed after the call
    with pytest.raises(ValueError, match="class_embedding"):
        InterpolatedConditionPredictor(torch.nn.Conv2d(1, 1, 1))


# ---------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------


def _brute_dice(maps: np.ndarray, masks: np.ndarray, thr: float) -> np.ndarray:
    pred = maps >= thr
    inter = (pred & masks).sum(axis=(1, 2))
    total = pred.sum(axis=(1, 2)) + masks.sum(axis=(1, 2))
    return np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))


def test_per_slice_dice_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    maps = np.round(rng.random((7, 6, 6)), 1)
    masks = rng.random((7, 6, 6)) < 0.3
    masks[2] = False
    thresholds = np.array([-1.0, 0.0, 0.3, 0.35, 0.5, 1.0, 2.0])
    got = per_slice_dice(maps, masks, thresholds)
    want = np.stack([_brute_dice(maps, masks, t) for t in thresholds], axis=1)
    np.testing.assert_allclose(got, want)


def _lesion_slices(n: int = 12, size: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(0, n, 2):  # half the slices carry a square lesion
        r, c = rng.integers(0, size - 4, 2)
        masks[i, r : r + 4, c : c + 4] = True
    return masks


def test_tune_on_grid_picks_the_known_best_cell():
    masks = _lesion_slices()
    fg = np.ones_like(masks)
    seen = []

    def compute(cell):
        seen.append(cell)
        noise = np.random.default_rng(cell["seed"]).normal(size=masks.shape)
        return cell["signal"] * masks + noise

    grid = [{"signal": s, "seed": i} for i, s in enumerate((0.5, 6.0, 2.0))]
    result = tune_on_grid(compute, grid, masks, fg)
    assert seen == grid and [r["params"] for r in result["grid"]] == grid
    for setup in ("mixed", "unhealthy"):
        assert result[setup]["params"] == grid[1]
        best = result["grid"][1][setup]
        rows = slice(None) if setup == "mixed" else masks.any(axis=(1, 2))
        assert _brute_dice(compute(grid[1]), masks, best["threshold"])[rows].mean() == pytest.approx(best["dice"])
        assert result[setup]["dice"] == best["dice"] > max(result["grid"][i][setup]["dice"] for i in (0, 2))


def test_tune_on_grid_tunes_each_setup_on_its_slices():
    masks = _lesion_slices(n=8)
    masks[[2, 4, 6]] = False  # 1 of 8 slices with lesion
    maps = masks * 1.0
    maps[~masks.any(axis=(1, 2)), 0, 0] = 2.0  # every healthy slice has a bright false spot
    result = tune_on_grid(lambda cell: maps, [{}], masks, np.ones_like(masks))
    assert result["mixed"]["threshold"] > 2.0 and result["mixed"]["dice"] == pytest.approx(7 / 8)  # predict nothing
    assert result["unhealthy"]["threshold"] <= 1.0 and result["unhealthy"]["dice"] == pytest.approx(1.0)
    only = tune_on_grid(lambda cell: maps, [{}], masks, np.ones_like(masks), setups=("unhealthy",))
    assert set(only) == {"unhealthy", "grid"}


def test_tune_on_grid_refuses_without_pixel_labels():
    masks = _lesion_slices()
    fg = np.ones_like(masks)
    with pytest.raises(ValueError, match="masks"):
        tune_on_grid(lambda cell: masks * 1.0, [{}], None, fg)
    with pytest.raises(ValueError, match="masks"):
        tune_on_grid(lambda cell: masks * 1.0, [{}], np.zeros_like(masks), fg)
    with pytest.raises(ValueError, match="grid"):
        tune_on_grid(lambda cell: masks * 1.0, [], masks, fg)
    with pytest.raises(ValueError, match="setups"):
        tune_on_grid(lambda cell: masks * 1.0, [{}], masks, fg, setups=("healthy",))
    with pytest.raises(ValueError, match="shape"):
        tune_on_grid(lambda cell: masks[:3] * 1.0, [{}], masks, fg)
