"""The comparison systems of the paper's Table 1 as pure functions of callables, and their tuning.

Every function takes the networks as callables (the package's ``predict_eps(x, t, labels)`` of
:mod:`anofpdm_monai.guidance`, a classifier ``classifier(x, t) -> (N, 2) logits``), never a model
folder; :mod:`anofpdm_monai.baselines` holds the classifier-free ``ddib`` reconstruction they sit
beside. All computation is in float32 on ``x0.device``; predicted x_0 is clipped to [-1, 1]
throughout (:func:`anofpdm_monai.forward_process.predicted_x0`). Visited timesteps are
``0, stride, 2 * stride, ... < depth`` as in ``ddib``: ``depth`` is an exclusive bound, the input is
noised to the highest visited step, and the move down from step 0 lands on the clean image
(alpha-bar 1).

* :func:`anoddpm_reconstruction` -- AnoDDPM (Wyatt et al., CVPR workshops 2022).
* :func:`classifier_guided_reconstruction` -- DDIM with classifier guidance (Wolleb et al., MICCAI 2022).
* :func:`cgcdm_map` -- CG-CDM (Hu et al., MICCAI 2023), on the classifier-free model; its network
  interface is :data:`MixedConditionPredictor` (:class:`InterpolatedConditionPredictor` over MONAI's UNet).
* :func:`tune_on_grid` -- the paper's tuning of such pixel-label-tuned systems: every hyperparameter
  cell and the map threshold by mean per-slice DICE on validation slices, separately for the mixed
  and the unhealthy setup.

Facts found, and choices made where the sources are silent or disagree:

AnoDDPM (paper; AnoDDPM's code; AnoFPDM's reference ``translation_HEALTHY.py``)
    fact: the model is an unconditional DDPM trained on healthy slices only, with the noise it is
    sampled with (Gaussian, or simplex: 6 octaves, persistence 0.8, base frequency 2^-6).
    fact: the input is noised to depth lambda with q(x_t | x_0) using that noise, then brought back by
    DDPM ancestral sampling, every step's added noise of the same kind; the map is the squared error.
    fact (AnoFPDM reference): noised to ``t = sample_steps - 1`` and sampled at every step down to 0
    (``sample_steps`` = 200 for simplex, 300 for Gaussian on BraTS), predicted x_0 clipped.
    choice: the posterior variance is DDPM's "fixed small" beta-tilde (MONAI's ``DDPMScheduler``
    default); with ``stride`` > 1 the posterior is taken between visited steps, i.e. the DDPM respaced
    onto the visited steps (improved-diffusion's respacing). At stride 1 this is MONAI's
    ``DDPMScheduler.step`` exactly (a test checks it); MONAI 1.6's ``step`` always goes to ``t - 1``
    whatever ``num_inference_steps`` says, so it is no strided reference.
    choice: the map is the mean over map channels of the squared error (AnoDDPM sums; a constant factor).

DDIM with classifier guidance (Wolleb et al. 2022, Algorithm 1; MONAI's classifier-guidance tutorial)
    fact: DDIM encoding (eta = 0) of x_0 with the diffusion model to noise level L, then DDIM decoding
    with eps_hat = eps - s * sqrt(1 - abar_t) * grad_x log p_phi(healthy | x_t, t); the classifier is
    noise-conditional (MONAI's tutorial: ``DiffusionModelEncoder``, called at the step's timestep);
    map = |x_0 - reconstruction| (Wolleb sums over channels).
    fact (published settings): Wolleb BraTS L = 500, s = 100; MONAI tutorial L = 200, s = 6;
    AnoFPDM's reference grid-searches L (200) and s (1000) and, unlike Wolleb, noises with q(x_t | x_0)
    instead of the DDIM encoding.
    choice: the diffusion model's eps is its unconditional (NULL) branch; guidance is added to the raw
    network eps, and x_0 predicted from the guided eps is clipped before the DDIM move (the move
    re-derives eps from the clipped x_0, as guided-diffusion's ``ddim_sample`` does); the map is the
    mean over map channels of the absolute error.

CG-CDM (Hu et al. 2023; their code github.com/xhu248/cond_ddpm_wsss, ``scripts/image_p_seg.py``
``main_ddim_guided``, run by ``run_wsss.sh``)
    fact: the input is noised ONCE with q(x_t | x_0), Gaussian, to t = 400 of T = 4000 (linear betas
    scaled by 1000 / T: the same alpha-bar, 0.896, as t = 100 of the usual T = 1000 schedule); then
    only 10 deterministic DDIM steps (eta = 0, clipped x_0), one timestep each, follow.
    fact: two trajectories start from that same x_t: one conditioned on the image label y = 1
    (lesion), one on the interpolated condition embedding 0.95 * e_1 + 0.05 * e_0 (built by
    overwriting a copy of the UNet's label embedding), i.e. y = 1 - delta with delta = 0.05.
    fact: after each step the difference of the two states, x_(t-1)(y = 1) - x_(t-1)(y = 1 - delta), is
    accumulated (a finite-difference derivative of the denoising output w.r.t. the condition);
    the sum over channels (signed) is min-max normalised per slice (batch size 1), then thresholded
    with Otsu per slice (optionally keeping the largest component).
    fact: "CG": with ``--guided`` both trajectories also get classifier guidance (guided-diffusion's
    ``condition_score``, classifier_scale 10), towards y = 1 for the first and y = 0 for the second.
    fact: their model has no null class and they ran on lesion slices only (label known).
    choice: the first trajectory is conditioned on UNHEALTHY and the second on (1 - delta) UNHEALTHY
    + delta HEALTHY for EVERY slice (no label is known at test time); the network is called at the
    timestep that matches its input (their first call is labelled one below); the accumulated
    difference is divided by delta (the true derivative scale; no effect after normalisation);
    the map is the mean over map channels, optionally of its absolute value (``absolute``: for
    hypointense lesions, e.g. T1w stroke, whose derivative is negative), then min-max normalised per
    slice; binarisation is by the tuned global threshold of :func:`tune_on_grid` (like every
    pixel-label-tuned row), not Otsu. On T = 1000 the equivalent of their start is ``depth = 101``
    (noised to t = 100), with ``steps = 10`` one-step moves (theirs span ~2.5 steps of T = 1000).

Tuning (AnoFPDM paper: every hyperparameter of the comparison systems and the threshold by grid
search on 1,000 mixed validation slices with pixel labels, per setup)
    choice: DICE per slice with an empty prediction on an empty truth counting 1 (ALGORITHM.md
    section 7), averaged over all slices (mixed) or over slices with lesion (unhealthy); the masks are
    ``map >= threshold`` on every pixel (as ``evaluate`` applies them); candidate thresholds are
    quantiles of the maps' foreground values plus one above the largest value (predict nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from anofpdm_monai.baselines import check_reconstruction_args, unguided_eps
from anofpdm_monai.forward_process import ddim_step, predicted_x0
from anofpdm_monai.guidance import EpsPredictor
from anofpdm_monai.networks import HEALTHY, UNHEALTHY
from anofpdm_monai.noise import NOISE_KINDS, draw_noise

SETUPS = ("mixed", "unhealthy")
CGCDM_DELTA = 0.05
"""Hu et al.'s condition step: their second trajectory's embedding is 0.95 e_1 + 0.05 e_0."""
CGCDM_STEPS = 10
"""Hu et al.'s number of denoising steps."""

Generators = torch.Generator | Sequence[torch.Generator] | None
Classifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``classifier(x_t (N, C, S, S), t (N,) long) -> (N, 2) logits``, class HEALTHY (0) and UNHEALTHY (1)."""
MixedConditionPredictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``eps(x_t (N, C, S, S), t (N,) long, y (N,) float) -> (N, C, S, S)``: the noise predicted under the
condition embedding ``y * e_UNHEALTHY + (1 - y) * e_HEALTHY`` (y = 1: unhealthy, y = 0: healthy)."""


@dataclass
class ReconstructionResult:
    """Outcome of a reconstruction system.

    Attributes:
        maps: (B, S, S) anomaly maps (mean over the map channels of the per-pixel error).
        reconstruction: (B, C, S, S) healthy reconstruction in [-1, 1].
        network_calls: batched diffusion-network calls spent; each covers every slice of the batch,
            so this is also the number of calls per slice.
        classifier_calls: batched classifier gradient evaluations (forward + backward) spent.
    """

    maps: torch.Tensor
    reconstruction: torch.Tensor
    network_calls: int
    classifier_calls: int = 0


@dataclass
class CGCDMResult:
    """Outcome of :func:`cgcdm_map`.

    Attributes:
        maps: (B, S, S) maps min-max normalised to [0, 1] per slice (all zero for a constant map).
        derivative: (B, M, S, S) the accumulated finite-difference derivative per map channel, before
            the channel mean and the normalisation.
        network_calls: batched calls (each on 2 B inputs: both conditions).
        classifier_calls: batched classifier gradient evaluations (on 2 B inputs each).
    """

    maps: torch.Tensor
    derivative: torch.Tensor
    network_calls: int
    classifier_calls: int = 0


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


def _map_error(x0: torch.Tensor, reconstruction: torch.Tensor, map_channels: Sequence[int], power: int) -> torch.Tensor:
    """(B, S, S) mean over the map channels of ``|x0 - reconstruction| ** power``."""
    channels = list(map_channels)
    return (x0[:, channels].float() - reconstruction[:, channels]).abs().pow(power).mean(dim=1)


def _abar(alphas_cumprod: torch.Tensor) -> list[float]:
    return alphas_cumprod.detach().double().cpu().tolist()


def classifier_log_prob_gradient(classifier: Classifier, x_t: torch.Tensor, t: int, target: torch.Tensor) -> torch.Tensor:
    """grad_x log p_phi(target | x_t, t), per slice, from one forward and backward pass.

    Args:
        classifier: ``classifier(x (N, C, S, S), t (N,) long) -> (N, 2) logits``.
        x_t: (N, C, S, S) noised slices.
        t: their timestep.
        target: (N,) long class per slice (HEALTHY or UNHEALTHY).

    Returns:
        (N, C, S, S) float32 gradient. The classifier's parameters get no gradient.
    """
    steps = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    with torch.enable_grad():
        x_in = x_t.detach().float().requires_grad_(True)
        logits = classifier(x_in, steps)
        if logits.shape != (x_t.shape[0], 2):
            raise ValueError(f"classifier returned shape {tuple(logits.shape)}; it must give (N, 2) logits for N = {x_t.shape[0]}")
        log_p = torch.log_softmax(logits.float(), dim=-1).gather(1, target.view(-1, 1).to(logits.device))
        (grad,) = torch.autograd.grad(log_p.sum(), x_in)
    return grad


# ---------------------------------------------------------------------------
# AnoDDPM
# ---------------------------------------------------------------------------


def ddpm_posterior_step(
    x_t: torch.Tensor, x0_hat: torch.Tensor, abar_t: float, abar_to: float, noise: torch.Tensor | None
) -> torch.Tensor:
    """One ancestral DDPM move from noise level ``abar_t`` down to ``abar_to`` (respaced posterior).

    With ``alpha = abar_t / abar_to`` and ``beta = 1 - alpha`` (DDPM's beta_t when the steps are
    adjacent), x_to ~ q(x_to | x_t, x0_hat) = N(mu, var):
    ``mu = sqrt(abar_to) beta / (1 - abar_t) x0_hat + sqrt(alpha) (1 - abar_to) / (1 - abar_t) x_t``,
    ``var = (1 - abar_to) / (1 - abar_t) beta`` (fixed small). ``abar_to = 1`` gives ``x0_hat``.

    Args:
        x_t: (B, C, S, S) input.
        x0_hat: (B, C, S, S) clipped prediction of x_0.
        abar_t: alpha-bar of the input, in (0, 1).
        abar_to: alpha-bar of the target, in (abar_t, 1].
        noise: (B, C, S, S) unit-variance noise, or None for the posterior mean.
    """
    alpha = abar_t / abar_to
    beta = 1.0 - alpha
    mean = (math.sqrt(abar_to) * beta / (1.0 - abar_t)) * x0_hat + (math.sqrt(alpha) * (1.0 - abar_to) / (1.0 - abar_t)) * x_t
    if noise is None or abar_to >= 1.0:
        return mean
    return mean + math.sqrt((1.0 - abar_to) / (1.0 - abar_t) * beta) * noise


@torch.no_grad()
def anoddpm_reconstruction(
    predict_eps: EpsPredictor,
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    depth: int,
    stride: int = 1,
    map_channels: Sequence[int],
    noise: str = "gaussian",
    generators: Generators = None,
) -> ReconstructionResult:
    """AnoDDPM: noise x0 to a depth with Gaussian or simplex noise, DDPM ancestral sampling back.

    The visited steps are ``0, stride, ... < depth``; x0 is noised with q(x_t | x_0) to the highest
    one, then each visited step t makes one call (label NULL: the model is unconditional) and moves to
    the visited step below by :func:`ddpm_posterior_step`, adding fresh noise of kind ``noise``; the
    move from step 0 lands on the predicted x_0 with no noise. Network calls: ``ceil(depth / stride)``.
    AnoFPDM's reference runs ``depth`` = 200 (simplex) or 300 (Gaussian), stride 1.

    Args:
        predict_eps: ``eps(x_t (N, C, S, S), t (N,) long, labels (N,) long)``, an unconditional model.
        x0: (B, C, S, S) clean slices in [-1, 1].
        alphas_cumprod: (T,) alpha-bar of the DDPM schedule.
        depth: exclusive bound on the visited steps, 1 <= depth <= T (lambda + 1 in AnoDDPM's terms).
        stride: the gap between visited steps (1: every step).
        map_channels: channel indices the map is computed on.
        noise: ``"gaussian"`` or ``"simplex"`` (:func:`anofpdm_monai.noise.simplex_noise`), for the
            first noising and every ancestral step.
        generators: one CPU ``torch.Generator`` per slice, so a slice's result does not depend on its
            batch; a single generator or None (torch's global one) also works. The noise is drawn by
            :func:`anofpdm_monai.noise.draw_noise` (Gaussian on the CPU, simplex fields on ``x0.device``).

    Returns:
        :class:`ReconstructionResult`; ``maps`` = mean over map channels of (x0 - reconstruction)^2.
    """
    check_reconstruction_args(x0, alphas_cumprod, depth, stride, map_channels)
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise={noise!r} must be one of {NOISE_KINDS}")
    abar = _abar(alphas_cumprod)
    steps = list(range(0, depth, stride))
    x0 = x0.float()
    top = steps[-1]
    x = math.sqrt(abar[top]) * x0 + math.sqrt(1.0 - abar[top]) * draw_noise(noise, x0.shape, generators, x0.device)
    for i in range(len(steps) - 1, -1, -1):
        t = steps[i]
        x0_hat = predicted_x0(x, unguided_eps(predict_eps, x, t), abar[t])
        fresh = draw_noise(noise, x0.shape, generators, x0.device) if i > 0 else None
        x = ddpm_posterior_step(x, x0_hat, abar[t], abar[steps[i - 1]] if i > 0 else 1.0, fresh)
    return ReconstructionResult(maps=_map_error(x0, x, map_channels, 2), reconstruction=x, network_calls=len(steps))


# ---------------------------------------------------------------------------
# DDIM with classifier guidance (Wolleb et al.)
# ---------------------------------------------------------------------------


@torch.no_grad()
def classifier_guided_reconstruction(
    predict_eps: EpsPredictor,
    classifier: Classifier,
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    depth: int,
    stride: int = 1,
    scale: float,
    map_channels: Sequence[int],
) -> ReconstructionResult:
    """Wolleb et al.: unguided DDIM encoding to a depth, classifier-guided DDIM decoding towards healthy.

    Encoding: the unconditional (NULL) DDIM inversion, eta = 0, from x0 (the state at step 0) up the
    visited steps ``0, stride, ... < depth`` (one call per move). Decoding, at each visited step t from
    the top down: ``eps_hat = eps - scale * sqrt(1 - abar_t) * grad_x log p_phi(HEALTHY | x_t, t)``,
    then the DDIM move to the visited step below (the clean image from step 0). Deterministic: no
    generator. Calls: ``2 n - 1`` network calls and ``n`` classifier gradients for n visited steps.

    Args:
        predict_eps: ``eps(x_t (N, C, S, S), t (N,) long, labels (N,) long)``; called with NULL.
        classifier: ``classifier(x_t (N, C, S, S), t (N,) long) -> (N, 2) logits`` (HEALTHY = 0).
        x0: (B, C, S, S) clean slices in [-1, 1].
        alphas_cumprod: (T,) alpha-bar of the DDPM schedule.
        depth: exclusive bound on the visited steps (Wolleb's L + 1), 1 <= depth <= T.
        stride: the gap between visited steps.
        scale: the gradient scale s (0: plain DDIM reconstruction, the classifier is not called).
        map_channels: channel indices the map is computed on.

    Returns:
        :class:`ReconstructionResult`; ``maps`` = mean over map channels of |x0 - reconstruction|.
    """
    check_reconstruction_args(x0, alphas_cumprod, depth, stride, map_channels)
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale} must be finite")
    abar = _abar(alphas_cumprod)
    steps = list(range(0, depth, stride))
    x0 = x0.float()
    healthy = torch.full((x0.shape[0],), HEALTHY, dtype=torch.long, device=x0.device)
    calls = classifier_calls = 0
    x = x0
    for t, t_next in zip(steps[:-1], steps[1:]):
        eps = unguided_eps(predict_eps, x, t)
        x = ddim_step(x, predicted_x0(x, eps, abar[t]), eps, abar[t], abar[t_next])
        calls += 1
    for i in range(len(steps) - 1, -1, -1):
        t = steps[i]
        eps = unguided_eps(predict_eps, x, t)
        calls += 1
        if scale != 0.0:
            eps = eps - scale * math.sqrt(1.0 - abar[t]) * classifier_log_prob_gradient(classifier, x, t, healthy)
            classifier_calls += 1
        x = ddim_step(x, predicted_x0(x, eps, abar[t]), eps, abar[t], abar[steps[i - 1]] if i > 0 else 1.0)
    return ReconstructionResult(maps=_map_error(x0, x, map_channels, 1), reconstruction=x, network_calls=calls,
                                classifier_calls=classifier_calls)  # fmt: skip


# ---------------------------------------------------------------------------
# CG-CDM (Hu et al.)
# ---------------------------------------------------------------------------


class InterpolatedConditionPredictor:
    """A :data:`MixedConditionPredictor` over MONAI's ``DiffusionModelUNet`` with class embeddings.

    MONAI's UNet adds ``class_embedding(labels)`` to the time embedding; a forward hook on that
    ``torch.nn.Embedding`` replaces its output by ``y * e_UNHEALTHY + (1 - y) * e_HEALTHY`` for the
    call, so ``y = 1`` and ``y = 0`` give exactly the network's UNHEALTHY and HEALTHY predictions.
    (Hu et al. get the same embedding by overwriting a copy of the network's label embedding.)

    Args:
        network: a network built by :func:`anofpdm_monai.networks.build_network`, in eval mode.
        autocast: run it under bf16 autocast; the output is cast back to float32.
    """

    def __init__(self, network: torch.nn.Module, autocast: bool = False) -> None:
        embedding = getattr(network, "class_embedding", None)
        if not isinstance(embedding, torch.nn.Embedding):
            raise ValueError("network has no class_embedding (torch.nn.Embedding): build it with num_class_embeds")
        self.network = network
        self.autocast = autocast

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) float32 noise for ``x_t`` (N, C, S, S), ``t`` (N,) long, ``y`` (N,) float."""
        embedding = self.network.class_embedding
        weight = y.to(embedding.weight.dtype).view(-1, 1)
        mixed = weight * embedding.weight[UNHEALTHY] + (1.0 - weight) * embedding.weight[HEALTHY]
        handle = embedding.register_forward_hook(lambda module, args, output: mixed.to(output.dtype))
        try:
            labels = torch.full((x_t.shape[0],), HEALTHY, dtype=torch.long, device=x_t.device)
            with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                eps = self.network(x_t, timesteps=t, class_labels=labels)
        finally:
            handle.remove()
        return eps.float()


def _check_cgcdm_args(x0: torch.Tensor, alphas_cumprod: torch.Tensor, depth: int, steps: int, stride: int,
                      delta: float, scale: float, classifier: Classifier | None, map_channels: Sequence[int]) -> None:  # fmt: skip
    check_reconstruction_args(x0, alphas_cumprod, depth, stride, map_channels)
    visited = len(range(0, depth, stride))
    if not 1 <= steps <= visited:
        raise ValueError(f"steps={steps} must lie in [1, {visited}] (the visited steps below depth={depth} at stride={stride})")
    if not 0.0 < delta <= 1.0:
        raise ValueError(f"delta={delta} must lie in (0, 1]")
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale} must be finite")
    if scale != 0.0 and classifier is None:
        raise ValueError(f"scale={scale} needs a classifier; pass classifier=... or scale=0 (CDM without guidance)")


@torch.no_grad()
def cgcdm_map(
    predict_eps_mixed: MixedConditionPredictor,
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    depth: int,
    steps: int = CGCDM_STEPS,
    stride: int = 1,
    delta: float = CGCDM_DELTA,
    map_channels: Sequence[int],
    classifier: Classifier | None = None,
    scale: float = 0.0,
    absolute: bool = False,
    generators: Generators = None,
) -> CGCDMResult:
    """CG-CDM: the derivative of the conditional denoising output w.r.t. the condition, by finite differences.

    x0 is noised once with Gaussian q(x_t | x_0) to the highest visited step of ``0, stride, ... <
    depth``; from that one x_t two deterministic DDIM trajectories (eta = 0) go down the next ``steps``
    visited steps (the clean image after step 0): one with condition y = 1 (UNHEALTHY), one with y =
    1 - delta (the embedding ``(1 - delta) e_UNHEALTHY + delta e_HEALTHY``), both in ONE batched call
    per step. After every move the derivative estimate ``(x(y = 1) - x(y = 1 - delta)) / delta`` is
    accumulated. With a classifier and ``scale`` != 0 (the "CG" of CG-CDM) both trajectories are
    classifier-guided, ``eps - scale * sqrt(1 - abar_t) * grad log p_phi(c | x_t, t)`` with c =
    UNHEALTHY for the first and HEALTHY for the second (one batched gradient per step).

    The map is the mean over the map channels of the accumulated derivative (its absolute value with
    ``absolute``), min-max normalised to [0, 1] per slice. Calls: ``steps`` network calls (and as many
    classifier gradients when guided), each on 2 B inputs. Hu et al.: T = 4000, noised to t = 400, 10
    steps, delta = 0.05, classifier scale 10; on T = 1000 the same alpha-bar is ``depth = 101``.

    Args:
        predict_eps_mixed: ``eps(x_t (N, C, S, S), t (N,) long, y (N,) float)``, a
            :data:`MixedConditionPredictor` (e.g. :class:`InterpolatedConditionPredictor`).
        x0: (B, C, S, S) clean slices in [-1, 1].
        alphas_cumprod: (T,) alpha-bar of the DDPM schedule.
        depth: exclusive bound on the visited steps; the input is noised to the highest, 1 <= depth <= T.
        steps: number of denoising moves, 1 <= steps <= number of visited steps.
        stride: the gap between visited steps.
        delta: the condition step of the finite difference, in (0, 1].
        map_channels: channel indices the map is computed on.
        classifier: ``classifier(x_t, t) -> (N, 2) logits`` for the guided variant, or None.
        scale: classifier-guidance scale (0: CDM, no classifier call).
        absolute: take the absolute derivative before normalising (lesions of either polarity).
        generators: one ``torch.Generator`` per slice for the single noising draw (see
            :func:`anoddpm_reconstruction`).

    Returns:
        :class:`CGCDMResult` with (B, S, S) maps in [0, 1] and the (B, M, S, S) derivative.
    """
    _check_cgcdm_args(x0, alphas_cumprod, depth, steps, stride, delta, scale, classifier, map_channels)
    abar = _abar(alphas_cumprod)
    visited = list(range(0, depth, stride))
    x0 = x0.float()
    b = x0.shape[0]
    top = visited[-1]
    x_t = math.sqrt(abar[top]) * x0 + math.sqrt(1.0 - abar[top]) * draw_noise("gaussian", x0.shape, generators, x0.device)
    x = torch.cat([x_t, x_t])  # [y = 1; y = 1 - delta]
    y = torch.cat([torch.ones(b), torch.full((b,), 1.0 - delta)]).to(x0.device)
    target = torch.cat([torch.full((b,), UNHEALTHY), torch.full((b,), HEALTHY)]).to(x0.device)
    channels = list(map_channels)
    derivative = x0.new_zeros((b, len(channels), *x0.shape[2:]))
    classifier_calls = 0
    for i in range(len(visited) - 1, len(visited) - 1 - steps, -1):
        t = visited[i]
        eps = predict_eps_mixed(x, torch.full((2 * b,), t, dtype=torch.long, device=x.device), y).float()
        if eps.shape != x.shape:
            raise ValueError(f"predict_eps_mixed returned shape {tuple(eps.shape)} for an input of shape {tuple(x.shape)}")
        if scale != 0.0:
            eps = eps - scale * math.sqrt(1.0 - abar[t]) * classifier_log_prob_gradient(classifier, x, t, target)
            classifier_calls += 1
        x = ddim_step(x, predicted_x0(x, eps, abar[t]), eps, abar[t], abar[visited[i - 1]] if i > 0 else 1.0)
        derivative += (x[:b, channels] - x[b:, channels]) / delta
    raw = derivative.mean(dim=1)
    if absolute:
        raw = raw.abs()
    low = raw.amin(dim=(-2, -1), keepdim=True)
    span = raw.amax(dim=(-2, -1), keepdim=True) - low
    maps = torch.where(span > 0, (raw - low) / span.clamp_min(torch.finfo(raw.dtype).tiny), torch.zeros_like(raw))
    return CGCDMResult(maps=maps, derivative=derivative, network_calls=steps, classifier_calls=classifier_calls)


# ---------------------------------------------------------------------------
# Tuning with pixel labels
# ---------------------------------------------------------------------------


def _as_bool(name: str, value: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    array = np.asarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value).astype(bool)
    if array.ndim != 3 or (shape is not None and array.shape != shape):
        raise ValueError(f"{name} must be (N, S, S){f' = {shape}' if shape else ''}, got shape {array.shape}")
    return array


def candidate_thresholds(maps: np.ndarray, foreground: np.ndarray, count: int) -> np.ndarray:
    """(K,) ascending thresholds: ``count`` quantiles of the maps' foreground values (levels 0 to 1), unique,
    plus one above the largest map value (the empty prediction)."""
    values = maps[foreground] if foreground.any() else maps.ravel()
    quantiles = np.unique(np.quantile(values, np.linspace(0.0, 1.0, count)))
    return np.append(quantiles, np.nextafter(maps.max(), np.inf))


def per_slice_dice(maps: np.ndarray, masks: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(N, K) DICE of every slice's mask ``map >= threshold`` for every threshold, 1 where both are empty.

    Exact and vectorised without sorting pixels: each pixel's bin (how many thresholds it reaches) comes
    from one binary search in the K thresholds; per-slice histograms of the bins, of all pixels and of
    lesion pixels, summed from the top give the predicted and true-positive counts of every threshold.

    Args:
        maps: (N, S, S) anomaly maps.
        masks: (N, S, S) bool lesion masks.
        thresholds: (K,) ascending thresholds.
    """
    n = maps.shape[0]
    thr = np.asarray(thresholds, dtype=np.float64)
    k = thr.size
    bins = np.searchsorted(thr, maps.reshape(n, -1).astype(np.float64), side="right")  # thresholds <= value
    index = (np.arange(n)[:, None] * (k + 1) + bins).ravel()
    lesion = masks.reshape(n, -1).ravel()
    hist_all = np.bincount(index, minlength=n * (k + 1)).reshape(n, k + 1)
    hist_pos = np.bincount(index[lesion], minlength=n * (k + 1)).reshape(n, k + 1)
    # value >= thr[j] iff its bin > j: counts over bins j + 1 .. K
    predicted = np.cumsum(hist_all[:, ::-1], axis=1)[:, ::-1][:, 1:].astype(np.float64)
    tp = np.cumsum(hist_pos[:, ::-1], axis=1)[:, ::-1][:, 1:].astype(np.float64)
    positives = hist_pos.sum(axis=1, keepdims=True).astype(np.float64)
    denominator = predicted + positives
    return np.where(denominator > 0, 2.0 * tp / np.maximum(denominator, 1.0), 1.0)


def tune_on_grid(
    compute_maps: Callable[[dict], np.ndarray | torch.Tensor],
    grid: Sequence[Mapping[str, Any]],
    masks: np.ndarray | torch.Tensor | None,
    foreground: np.ndarray | torch.Tensor,
    setups: Sequence[str] = SETUPS,
    *,
    num_thresholds: int = 256,
) -> dict[str, Any]:
    """The paper's tuning of a pixel-label-tuned system: best hyperparameter cell and threshold per setup.

    For every cell of ``grid``, ``compute_maps(cell)`` gives the validation slices' maps; for every
    candidate threshold (:func:`candidate_thresholds`) the masks ``map >= threshold`` are scored by
    DICE per slice (:func:`per_slice_dice`), averaged over all slices for ``"mixed"`` and over the
    slices with lesion for ``"unhealthy"``. Each cell keeps its best threshold per setup (the lowest
    on a tie), and each setup its best cell (the first on a tie).

    Args:
        compute_maps: ``cell -> (N, S, S)`` anomaly maps of the validation slices, higher = more anomalous.
        grid: the hyperparameter cells, e.g. ``[{"depth": 200, "scale": 100}, ...]``; at least one.
        masks: (N, S, S) bool lesion masks of the same slices (pixel labels; required).
        foreground: (N, S, S) bool brain foreground; candidate thresholds are quantiles of its map values.
        setups: any of ``"mixed"`` and ``"unhealthy"``.
        num_thresholds: number of quantile levels tried.

    Returns:
        ``{setup: {"params": cell, "threshold": float, "dice": float}, ..., "grid": [{"params": cell,
        setup: {"threshold": float, "dice": float}, ...} per cell, in grid order]}``.

    Raises:
        ValueError: ``masks`` is None or holds no lesion pixel (this tuning needs pixel labels), the grid
            is empty, a setup is unknown, or shapes disagree.
    """
    if masks is None:
        raise ValueError("masks is None: tune_on_grid tunes with pixel labels; give the validation slices' lesion masks")
    truth = _as_bool("masks", masks)
    if not truth.any():
        raise ValueError("masks hold no lesion pixel: tune_on_grid needs validation slices with pixel labels of lesions")
    fg = _as_bool("foreground", foreground, truth.shape)
    if not grid:
        raise ValueError("grid is empty: give at least one hyperparameter cell (a dict, e.g. {} for none)")
    unknown = [s for s in setups if s not in SETUPS]
    if unknown or not setups:
        raise ValueError(f"setups={list(setups)} must be a non-empty subset of {SETUPS}")
    lesion = truth.any(axis=(1, 2))
    selection = {"mixed": np.ones_like(lesion), "unhealthy": lesion}
    cells = []
    for cell in grid:
        maps = compute_maps(dict(cell))
        maps = np.asarray(maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else maps, dtype=np.float64)
        if maps.shape != truth.shape:
            raise ValueError(f"compute_maps({dict(cell)}) returned shape {maps.shape}; masks have shape {truth.shape}")
        if not np.isfinite(maps).all():
            raise ValueError(f"compute_maps({dict(cell)}) returned non-finite values")
        thresholds = candidate_thresholds(maps, fg, num_thresholds)
        dice = per_slice_dice(maps, truth, thresholds)
        row: dict[str, Any] = {"params": dict(cell)}
        for setup in setups:
            mean = dice[selection[setup]].mean(axis=0)
            best = int(np.argmax(mean))
            row[setup] = {"threshold": float(thresholds[best]), "dice": float(mean[best])}
        cells.append(row)
    result: dict[str, Any] = {}
    for setup in setups:
        best = max(cells, key=lambda r: r[setup]["dice"])  # max keeps the first on a tie
        result[setup] = {"params": best["params"], **best[setup]}
    result["grid"] = cells
    return result
