"""Tests of the guidance helpers and the forward-process engine (ALGORITHM.md sections 3-4)."""

from __future__ import annotations

import gc
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler

from anofpdm_monai.config import DiffusionConfig
from anofpdm_monai.forward_process import ForwardProcessResult, run_forward_process
from anofpdm_monai.guidance import guided_eps, predict_cond_and_null
from anofpdm_monai.networks import HEALTHY, NULL, UNHEALTHY, build_scheduler

ABAR = build_scheduler(DiffusionConfig()).alphas_cumprod
TENSOR_FIELDS = ("mse_h", "mse_u", "divergence", "end_index", "dmax", "aggregated_map", "last_map", "timesteps")


class Recorder:
    """Wraps a predictor, counting calls and storing (x, t, labels, eps) of each."""

    def __init__(self, predict, store: bool = True) -> None:
        self.predict = predict
        self.store = store
        self.calls: list[tuple[torch.Tensor, ...]] = []
        self.count = 0

    def __call__(self, x, t, labels):
        eps = self.predict(x, t, labels)
        self.count += 1
        if self.store:
            self.calls.append((x.clone(), t.clone(), labels.clone(), eps.clone()))
        return eps


def analytic_predictor(x0: torch.Tensor):
    """Exact noise for clean image x0, whatever the label."""

    def predict(x, t, labels):
        a = ABAR[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0.repeat(2, 1, 1, 1)) / (1 - a).sqrt()

    return predict


class RandomPredictor:
    """A fixed, random, nonlinear, label- and time-dependent predictor."""

    def __init__(self, channels: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels, channels, 3, 3, generator=g) * 0.3
        self.embedding = torch.randn(3, channels, generator=g) * 0.5

    def __call__(self, x, t, labels):
        h = F.conv2d(x, self.weight, padding=1) * (1 + t.float() / 100)[:, None, None, None]
        return torch.tanh(h + self.embedding[labels][:, :, None, None]) + 0.5 * x


def make_x0(batch=2, channels=2, size=8, seed=1, limit=0.9):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, channels, size, size, generator=g) * 2 - 1) * limit


def seeded(seed=123):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- guidance


def test_predict_cond_and_null_one_call_with_labels_in_order():
    x = make_x0(batch=3)
    seen = []

    def predict(x_in, t, labels):
        seen.append((x_in.shape, t.clone(), labels.clone()))
        return labels.float()[:, None, None, None].expand_as(x_in) + 10 * t.float()[:, None, None, None]

    eps_c, eps_u = predict_cond_and_null(predict, x, 7)
    assert len(seen) == 1
    assert seen[0][0] == (6, *x.shape[1:])
    assert seen[0][2].tolist() == [HEALTHY] * 3 + [NULL] * 3
    assert seen[0][1].tolist() == [7] * 6
    assert torch.all(eps_c == HEALTHY + 70) and torch.all(eps_u == NULL + 70)
    eps_c, _ = predict_cond_and_null(predict, x, torch.tensor([1, 2, 3]), label=UNHEALTHY)
    assert eps_c[:, 0, 0, 0].tolist() == [UNHEALTHY + 10, UNHEALTHY + 20, UNHEALTHY + 30]


def test_guided_eps_is_eq6():
    eps_c, eps_u = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    assert guided_eps(eps_c, eps_u, 2.0).tolist() == [3 * 1.0 - 2 * 3.0, 3 * 2.0 + 2 * 1.0]
    assert torch.equal(guided_eps(eps_c, eps_u, 0.0), eps_c)


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("stride", [1, 3])
def test_analytic_predictor_is_exact_and_ddim_inversion_follows_closed_form(stride):
    x0 = make_x0()
    recorder = Recorder(analytic_predictor(x0))
    scales = [0.0, 1.0, 5.0]
    result = run_forward_process(
        recorder, x0, ABAR, guidance_scales=scales, steps=12, stride=stride, map_channels=(0, 1), generator=seeded()
    )
    assert result.divergence.abs().max() < 1e-10
    assert result.mse_h.abs().max() < 1e-10
    assert result.mse_u.abs().max() < 1e-10
    noise0 = torch.randn(x0.shape, generator=seeded())
    for x, t, _, _ in recorder.calls:
        a = ABAR[t[0]].double()
        expected = a.sqrt() * x0 + (1 - a).sqrt() * noise0
        torch.testing.assert_close(x[: x0.shape[0]], expected.float(), atol=1e-5, rtol=0)
    assert len(recorder.calls) == math.ceil(12 / stride)


def region_predictor(x0: torch.Tensor, region: torch.Tensor, bump: float):
    """Exact null branch; the healthy branch moves the HGP by ``bump`` inside ``region``, all steps."""
    exact = analytic_predictor(x0)

    def predict(x, t, labels):
        a = ABAR[t].view(-1, 1, 1, 1)
        healthy = (labels == HEALTHY).view(-1, 1, 1, 1)
        shift = bump * region / ((1 - a) / a).sqrt()
        return exact(x, t, labels) + torch.where(healthy, shift, torch.zeros_like(shift))

    return predict


def test_divergence_is_hand_computed_for_a_region_predictor():
    size, w = 8, 1.5
    x0 = torch.zeros(1, 1, size, size)
    region = torch.zeros(size, size)
    region[2:4, 5:8] = 1.0
    result = run_forward_process(
        region_predictor(x0, region, 0.2), x0, ABAR, guidance_scales=[w], steps=4, generator=seeded()
    )
    # HGP = x0 - (1 + w) * 0.2 inside the 6-pixel region, UGP = x0.
    expected_d = 6 / 64 * ((1 + w) * 0.2) ** 2
    torch.testing.assert_close(result.divergence, torch.full_like(result.divergence, expected_d), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.mse_h, result.divergence)
    peak = result.aggregated_map[0, 0, 0]
    assert bool((peak[region.bool()] > 0.08).all()) and float(peak[~region.bool()].abs().max()) < 1e-10


# ---------------------------------------------------------------- streaming vs brute force


def brute_force(calls, x0, scales, map_channels, include_end_step):
    """Statistics from every stored step (what the reference does)."""
    batch = x0.shape[0]
    w = torch.tensor(scales).view(-1, 1, 1, 1, 1)
    xh_steps, xu_steps = [], []
    for x, t, _, eps in calls:
        a = float(ABAR[t[0]])
        x_t, eps_c, eps_u = x[:batch], eps[:batch], eps[batch:]
        eps_g = (1 + w) * eps_c - w * eps_u
        xh_steps.append(((x_t - math.sqrt(1 - a) * eps_g) / math.sqrt(a)).clamp(-1, 1)[:, :, list(map_channels)])
        xu_steps.append(((x_t - math.sqrt(1 - a) * eps_u) / math.sqrt(a)).clamp(-1, 1)[:, list(map_channels)])
    xh = torch.stack(xh_steps)  # (K, G, B, M, S, S)
    xu = torch.stack(xu_steps)[:, None]  # (K, 1, B, M, S, S)
    x0m = x0[:, list(map_channels)]
    sam = (xh - x0m) ** 2
    mse_h = sam.mean((-2, -1)).permute(1, 2, 0, 3)
    mse_u = ((xu - x0m) ** 2).mean((-2, -1)).expand(-1, len(scales), -1, -1).permute(1, 2, 0, 3)
    d = ((xh - xu) ** 2).mean((-2, -1))  # (K, G, B, M)
    end = d.argmax(0)
    aggregated = torch.zeros(sam.shape[1:])
    last = torch.zeros(sam.shape[1:])
    for g in range(len(scales)):
        for b in range(batch):
            for m in range(len(map_channels)):
                stop = int(end[g, b, m]) + (1 if include_end_step else 0)
                if stop > 0:
                    aggregated[g, b, m] = sam[:stop, g, b, m].mean(0)
                last[g, b, m] = sam[int(end[g, b, m]), g, b, m]
    return dict(mse_h=mse_h, mse_u=mse_u, divergence=d.permute(1, 2, 0, 3), end_index=end,
                dmax=d.max(0).values, aggregated_map=aggregated, last_map=last)  # fmt: skip


@pytest.mark.parametrize("encoding", ["ddim", "ddpm"])
@pytest.mark.parametrize("include_end_step", [True, False])
def test_streaming_equals_brute_force(encoding, include_end_step):
    x0 = make_x0(channels=3)
    scales, channels = [0.5, 3.0], (0, 2)
    recorder = Recorder(RandomPredictor(3))
    result = run_forward_process(
        recorder, x0, ABAR, guidance_scales=scales, steps=14, stride=2, encoding=encoding,
        map_channels=channels, include_end_step=include_end_step, generator=seeded(),
    )  # fmt: skip
    expected = brute_force(recorder.calls, x0, scales, channels, include_end_step)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(result, name), value, msg=name)
    # the streamed run must exercise both a first-step and a later end step somewhere to be meaningful
    assert int(result.end_index.max()) > 0


def test_aggregated_map_excluding_end_step_is_zero_when_end_step_is_first():
    x0 = torch.zeros(1, 1, 8, 8)
    region = torch.ones(8, 8)

    def predict(x, t, labels):  # divergence largest at t = 0, then decreasing
        a = ABAR[t].view(-1, 1, 1, 1)
        bump = torch.where(t == 0, 0.5, 0.1).view(-1, 1, 1, 1) * region / ((1 - a) / a).sqrt()
        return analytic_predictor(x0)(x, t, labels) + torch.where((labels == HEALTHY).view(-1, 1, 1, 1), bump, 0.0)

    kwargs = dict(guidance_scales=[1.0], steps=3, generator=seeded())
    excluded = run_forward_process(predict, x0, ABAR, include_end_step=False, **kwargs)
    included = run_forward_process(predict, x0, ABAR, include_end_step=True, **kwargs)
    assert excluded.end_index.item() == 0
    assert torch.equal(excluded.aggregated_map, torch.zeros_like(excluded.aggregated_map))
    expected = torch.full_like(included.aggregated_map, 1.0)  # SAM_0 = ((1 + w) * 0.5)^2
    torch.testing.assert_close(included.aggregated_map, expected, atol=1e-5, rtol=0)


def test_end_step_is_the_first_maximum_on_ties():
    # w = 0 and a label-blind predictor: HGP == UGP bit for bit, d == 0 at every step
    x0 = make_x0()
    recorder = Recorder(lambda x, t, labels: torch.tanh(x))
    result = run_forward_process(recorder, x0, ABAR, guidance_scales=[0.0], steps=5, generator=seeded())
    assert torch.equal(result.divergence, torch.zeros_like(result.divergence))
    assert result.end_index.tolist() == [[[0], [0]]]
    x, _, _, eps = recorder.calls[0]
    a = float(ABAR[0])
    first_sam = ((x[:2] - math.sqrt(1 - a) * eps[:2]) / math.sqrt(a)).clamp(-1, 1)[:, :1] - x0[:, :1]
    torch.testing.assert_close(result.last_map[0], first_sam**2)
    torch.testing.assert_close(result.aggregated_map[0], first_sam**2)


def test_ddim_trajectory_is_the_reference_inversion_of_the_recorded_calls():
    x0 = make_x0()
    recorder = Recorder(RandomPredictor(2))
    run_forward_process(recorder, x0, ABAR, guidance_scales=[1.0], steps=9, stride=3, generator=seeded())
    batch = x0.shape[0]
    for (x_prev, t_prev, _, eps_prev), (x, t, _, _) in zip(recorder.calls, recorder.calls[1:]):
        a_prev, a = float(ABAR[t_prev[0]]), float(ABAR[t[0]])
        xu = ((x_prev[:batch] - math.sqrt(1 - a_prev) * eps_prev[batch:]) / math.sqrt(a_prev)).clamp(-1, 1)
        eps = (x_prev[:batch] / math.sqrt(a_prev) - xu) / math.sqrt(1 / a_prev - 1)
        torch.testing.assert_close(x[:batch], math.sqrt(a) * xu + math.sqrt(1 - a) * eps)


def test_ddpm_draws_fresh_noise_every_step():
    x0 = make_x0()
    recorder = Recorder(RandomPredictor(2))
    run_forward_process(
        recorder, x0, ABAR, guidance_scales=[1.0], steps=6, stride=2, encoding="ddpm", generator=seeded()
    )
    generator = seeded()
    for x, t, _, _ in recorder.calls:
        a = float(ABAR[t[0]])
        noise = torch.randn(x0.shape, generator=generator)
        torch.testing.assert_close(x[: x0.shape[0]], math.sqrt(a) * x0 + math.sqrt(1 - a) * noise)


# ---------------------------------------------------------------- MONAI inversion variant


def test_monai_inversion_matches_monai_reversed_step():
    x0 = make_x0()
    recorder = Recorder(RandomPredictor(2))
    stride = 10
    run_forward_process(
        recorder, x0, ABAR, guidance_scales=[1.0], steps=40, stride=stride, inversion="monai", generator=seeded()
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=True)
    scheduler.set_timesteps(1000 // stride)
    batch = x0.shape[0]
    for (x_prev, t_prev, _, eps_prev), (x, _, _, _) in zip(recorder.calls, recorder.calls[1:]):
        expected, _ = scheduler.reversed_step(eps_prev[batch:], int(t_prev[0]), x_prev[:batch])
        torch.testing.assert_close(x[:batch], expected, atol=1e-5, rtol=1e-5)


def test_reference_and_monai_inversions_differ_only_when_the_ugp_is_clipped():
    x0 = make_x0()
    kwargs = dict(guidance_scales=[1.0], steps=3)
    exact = {}
    for inversion in ("reference", "monai"):
        recorder = Recorder(analytic_predictor(x0))
        run_forward_process(recorder, x0, ABAR, inversion=inversion, generator=seeded(), **kwargs)
        exact[inversion] = torch.stack([call[0] for call in recorder.calls])
    torch.testing.assert_close(exact["reference"], exact["monai"])  # no clipping: same trajectory

    def far_out(x, t, labels):  # the predicted x_0 lies far below -1: the UGP is clipped
        return torch.full_like(x, 300.0)

    clipped = {}
    for inversion in ("reference", "monai"):
        recorder = Recorder(far_out)
        run_forward_process(recorder, x0, ABAR, inversion=inversion, generator=seeded(), **kwargs)
        clipped[inversion] = torch.stack([call[0] for call in recorder.calls])
    assert torch.equal(clipped["reference"][0], clipped["monai"][0])  # same first noising
    assert (clipped["reference"][1] - clipped["monai"][1]).abs().max() > 0.1


# ---------------------------------------------------------------- cost and memory


@pytest.mark.parametrize("encoding", ["ddim", "ddpm"])
@pytest.mark.parametrize("stride", [1, 3])
def test_one_network_call_per_visited_step(encoding, stride):
    recorder = Recorder(RandomPredictor(2))
    result = run_forward_process(
        recorder, make_x0(), ABAR, guidance_scales=[0.5, 1.0, 2.0], steps=10, stride=stride, encoding=encoding
    )
    visited = math.ceil(10 / stride)
    assert recorder.count == visited == result.network_calls
    assert result.timesteps.tolist() == list(range(0, 10, stride))
    assert result.divergence.shape == (3, 2, visited, 1)


def live_tensor_bytes() -> int:
    """Bytes of all distinct tensor storages reachable by the garbage collector."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def live_bytes_at_last_step(steps: int) -> int:
    """Run the engine, auditing the live tensor bytes during the last network call."""
    x0 = make_x0(batch=2, channels=1, size=16)
    audit = {}

    def predict(x, t, labels):
        if int(t[0]) == steps - 1:
            audit["bytes"] = live_tensor_bytes()
        return torch.zeros_like(x)

    run_forward_process(predict, x0, ABAR, guidance_scales=[1.0], steps=steps, generator=seeded())
    return audit["bytes"]


def test_memory_does_not_grow_with_the_number_of_steps():
    image_bytes = 2 * 1 * 16 * 16 * 4
    short, long = live_bytes_at_last_step(20), live_bytes_at_last_step(200)
    # only the (G, B, K, M) curves grow: 3 curves x 180 extra steps x 2 slices x 4 bytes
    assert abs(long - short) <= 3 * 180 * 2 * 4 + image_bytes
    # the audit would see a leak of one image per extra step
    baseline = live_tensor_bytes()
    leak = [torch.zeros(2, 1, 16, 16) for _ in range(180)]
    assert live_tensor_bytes() - baseline >= len(leak) * image_bytes


# ---------------------------------------------------------------- several w at once, reproducibility


@pytest.mark.parametrize("encoding", ["ddim", "ddpm"])
def test_multiple_guidance_scales_equal_separate_runs(encoding):
    x0 = make_x0()
    scales = [0.0, 1.0, 4.0]
    kwargs = dict(steps=8, stride=2, encoding=encoding, map_channels=(1, 0))
    joint = run_forward_process(RandomPredictor(2), x0, ABAR, guidance_scales=scales, generator=seeded(), **kwargs)
    for g, w in enumerate(scales):
        single = run_forward_process(RandomPredictor(2), x0, ABAR, guidance_scales=[w], generator=seeded(), **kwargs)
        selected = joint.select(g)
        assert isinstance(selected, ForwardProcessResult) and selected.guidance_scales.tolist() == [w]
        for name in TENSOR_FIELDS:
            torch.testing.assert_close(getattr(selected, name), getattr(single, name), msg=name)
    assert not torch.allclose(joint.divergence[0], joint.divergence[2])


@pytest.mark.parametrize("encoding", ["ddim", "ddpm"])
def test_same_seed_is_bit_identical(encoding):
    x0 = make_x0()
    kwargs = dict(guidance_scales=[1.0, 2.0], steps=6, encoding=encoding)
    first = run_forward_process(RandomPredictor(2), x0, ABAR, generator=seeded(7), **kwargs)
    second = run_forward_process(RandomPredictor(2), x0, ABAR, generator=seeded(7), **kwargs)
    other = run_forward_process(RandomPredictor(2), x0, ABAR, generator=seeded(8), **kwargs)
    for name in TENSOR_FIELDS:
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not torch.equal(first.mse_u, other.mse_u)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x0=make_x0(limit=1.0) * 1.01 + 0.01), "x0"),
        (dict(x0=torch.full((1, 2, 8, 8), float("nan"))), "x0"),
        (dict(x0=torch.zeros(2, 8, 8)), "x0"),
        (dict(steps=0), "steps"),
        (dict(steps=1001), "steps"),
        (dict(stride=0), "stride"),
        (dict(guidance_scales=[]), "guidance_scales"),
        (dict(encoding="ddjm"), "encoding"),
        (dict(inversion="diffusers"), "inversion"),
        (dict(map_channels=(2,)), "map_channels"),
        (dict(map_channels=(-1,)), "map_channels"),
        (dict(map_channels=()), "map_channels"),
    ],
)
def test_bad_arguments_raise(change, match):
    kwargs = dict(x0=make_x0(), guidance_scales=[1.0], steps=4)
    kwargs.update(change)
    x0 = kwargs.pop("x0")
    with pytest.raises(ValueError, match=match):
        run_forward_process(RandomPredictor(2), x0, ABAR, **kwargs)


def test_x0_within_tolerance_is_accepted():
    x0 = torch.full((1, 1, 8, 8), 1.0 + 5e-5)
    result = run_forward_process(RandomPredictor(1), x0, ABAR, guidance_scales=[1.0], steps=2)
    assert result.network_calls == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x0 = make_x0()
    predictor = RandomPredictor(2)
    cpu = run_forward_process(predictor, x0, ABAR, guidance_scales=[1.0], steps=6, encoding="ddpm", generator=seeded())
    cuda_predictor = RandomPredictor(2)
    cuda_predictor.weight, cuda_predictor.embedding = predictor.weight.cuda(), predictor.embedding.cuda()
    generator = torch.Generator(device="cuda").manual_seed(123)
    gpu = run_forward_process(
        cuda_predictor, x0.cuda(), ABAR, guidance_scales=[1.0], steps=6, encoding="ddpm", generator=generator
    )
    assert gpu.aggregated_map.is_cuda and gpu.timesteps.is_cuda
    assert gpu.divergence.shape == cpu.divergence.shape
    assert torch.isfinite(gpu.divergence).all()


# ---------------------------------------------------------------- per-slice generators, hook, DDIM step


@pytest.mark.parametrize("encoding", ["ddim", "ddpm"])
def test_per_slice_generators_make_outputs_independent_of_the_batching(encoding):
    x0 = make_x0(batch=5, channels=2)
    predictor = RandomPredictor(2)
    kwargs = dict(guidance_scales=[1.0, 3.0], steps=9, stride=2, encoding=encoding, map_channels=(0, 1))
    whole = run_forward_process(predictor, x0, ABAR, generator=[seeded(100 + i) for i in range(5)], **kwargs)
    parts = [
        run_forward_process(predictor, x0[a:b], ABAR, generator=[seeded(100 + i) for i in range(a, b)], **kwargs)
        for a, b in ((0, 2), (2, 5))
    ]
    joined = ForwardProcessResult.concatenate(parts)
    for name in TENSOR_FIELDS:
        torch.testing.assert_close(getattr(joined, name), getattr(whole, name), rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="one per slice"):
        run_forward_process(predictor, x0, ABAR, generator=[seeded(0)], **kwargs)


def test_concatenate_refuses_parts_of_different_runs():
    x0 = make_x0(batch=2)
    a = run_forward_process(RandomPredictor(2), x0, ABAR, guidance_scales=[1.0], steps=4, generator=seeded())
    b = run_forward_process(RandomPredictor(2), x0, ABAR, guidance_scales=[2.0], steps=4, generator=seeded())
    with pytest.raises(ValueError, match="not one run"):
        ForwardProcessResult.concatenate([a, b])


def test_callback_sees_every_visited_step_with_the_engine_statistics():
    x0 = make_x0(batch=3, channels=2)
    seen = []
    result = run_forward_process(
        RandomPredictor(2), x0, ABAR, guidance_scales=[0.5, 2.0], steps=7, stride=3, map_channels=(1,),
        generator=seeded(), callback=seen.append,
    )  # fmt: skip
    assert [s.t for s in seen] == [0, 3, 6] and [s.index for s in seen] == [0, 1, 2]
    for s in seen:
        assert s.xh_m.shape == (2, 3, 1, 8, 8) and s.xu_m.shape == (3, 1, 8, 8)
        torch.testing.assert_close(((s.xh_m - s.x0_m).square()).mean((-2, -1)), result.mse_h[:, :, s.index])
        torch.testing.assert_close(((s.xh_m - s.xu_m).square()).mean((-2, -1)), result.divergence[:, :, s.index])


def test_ddim_step_down_to_the_clean_level_returns_the_prediction_and_up_and_down_invert():
    from anofpdm_monai.forward_process import ddim_step, predicted_x0

    x0 = make_x0(batch=2, limit=0.5)
    eps = torch.randn(x0.shape, generator=seeded())
    a_lo, a_hi = float(ABAR[50]), float(ABAR[200])
    x_t = math.sqrt(a_lo) * x0 + math.sqrt(1 - a_lo) * eps
    x0_hat = predicted_x0(x_t, eps, a_lo)
    torch.testing.assert_close(ddim_step(x_t, x0_hat, eps, a_lo, 1.0), x0_hat)
    up = ddim_step(x_t, x0_hat, eps, a_lo, a_hi)  # the inversion: same x0 and eps at a higher noise level
    torch.testing.assert_close(up, math.sqrt(a_hi) * x0 + math.sqrt(1 - a_hi) * eps, rtol=0, atol=1e-5)
    down = ddim_step(up, predicted_x0(up, eps, a_hi), eps, a_hi, a_lo)
    torch.testing.assert_close(down, x_t, rtol=0, atol=1e-5)
