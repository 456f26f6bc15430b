"""Baselines on the same model and data: intensity thresholding and DDIB-style reconstruction.

* :func:`best_threshold_dice`: the oracle intensity threshold, the cut on pixel
  intensity that maximises pooled (whole-cohort) DICE. It sees pixel labels;
  :func:`lesion_polarity` gives its direction from the sequence (FLAIR/T2 above
  the cut, T1w below).
* :func:`ddib_reconstruction`: the classifier-free "DDIM + classifier-free
  guidance" reconstruction baseline of the paper's Table 1: deterministic
  unguided DDIM inversion of x0 to a depth, then healthy-guided DDIM decoding,
  anomaly map = squared reconstruction error.
* :func:`tune_pixel_threshold`: the pooled-DICE map threshold on validation maps
  with pixel labels, a stand-alone helper (a method tuned so must be flagged
  ``uses_pixel_labels``); ``evaluate`` tunes the registered reconstruction
  methods with :mod:`anofpdm_monai.tuning`
  (:func:`~anofpdm_monai.reconstruction.tune_on_grid`).

Registers the methods ``ddib`` (a :class:`~anofpdm_monai.methods.ReconstructionMethod` tuned over
depth and w, plus its threshold) and ``threshold`` (the oracle) in :mod:`anofpdm_monai.methods`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from anofpdm_monai.forward_process import ddim_step, predicted_x0
from anofpdm_monai.guidance import EpsPredictor, guided_eps, predict_cond_and_null
from anofpdm_monai.methods import MapsResult, MethodContext, ReconstructionMethod, ThresholdMethod, register
from anofpdm_monai.networks import HEALTHY, NULL

Direction = Literal["high", "low", "best"]

# How a lesion departs from normal brain on each sequence (channel names as the readers give them):
# brighter on FLAIR and T2 (oedema, tumour, MS plaques), darker on T1w (stroke cavities, necrosis, MS
# "black holes"). T1ce has none: enhancing rims are bright, necrotic cores dark.
LESION_POLARITY: dict[str, Direction] = {"flair": "high", "t2": "high", "t1": "low", "t1w": "low"}


def lesion_polarity(channels: Sequence[str]) -> Direction:
    """Direction of the oracle threshold on the mean of ``channels`` (map channel names), from the sequences.

    "high" or "low" when every channel has a known polarity (:data:`LESION_POLARITY`) and they agree;
    otherwise "best" (both directions are tried and the labels pick one), e.g. for nnU-Net channels
    named by number.
    """
    found = {LESION_POLARITY.get(str(c).lower()) for c in channels}
    return found.pop() if len(found) == 1 and None not in found else "best"


# ---------------------------------------------------------------------------
# Intensity thresholding
# ---------------------------------------------------------------------------


def _to_numpy(x: np.ndarray | torch.Tensor, dtype) -> np.ndarray:
    """``x`` as a numpy array of ``dtype`` (torch tensors are moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


class ThresholdResult(NamedTuple):
    """Outcome of :func:`best_threshold_dice`.

    Attributes:
        threshold: the intensity cut.
        dice: pooled DICE reached with it, in [0, 1].
        direction: ``"high"`` (lesion where value >= threshold) or ``"low"``
            (lesion where value <= threshold).
    """

    threshold: float
    dice: float
    direction: str


def _best_high_threshold(values: np.ndarray, labels: np.ndarray, candidates: np.ndarray | None) -> tuple[float, float]:
    """Best cut for the rule ``value >= thr``: pooled DICE = 2 TP / (#predicted + #positive).

    Counts above every candidate come from binary searches in the sorted values,
    so the search is exact and O((N + M) log N) for N pixels and M candidates.
    """
    all_sorted = np.sort(values)
    pos_sorted = np.sort(values[labels])
    if candidates is None:
        candidates = np.unique(all_sorted)
    n_pred = all_sorted.size - np.searchsorted(all_sorted, candidates, side="left")
    tp = pos_sorted.size - np.searchsorted(pos_sorted, candidates, side="left")
    dice = 2.0 * tp / (n_pred + pos_sorted.size)
    best = int(np.argmax(dice))
    return float(candidates[best]), float(dice[best])


def best_threshold_dice(
    intensity: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    candidates: Sequence[float] | np.ndarray | None = None,
    direction: Direction = "high",
) -> ThresholdResult:
    """The oracle threshold on pixel values that maximises pooled DICE.

    Args:
        intensity: (N,) pixel values pooled over the cohort (any shape; flattened),
            e.g. FLAIR intensities of the brain foreground, or anomaly-map values.
        labels: (N,) bool lesion mask, same shape as ``intensity``.
        candidates: thresholds to try; None tries every distinct value, which is
            exact (DICE only changes at the data values).
        direction: ``"high"`` predicts lesion where value >= thr (hyperintense,
            e.g. FLAIR), ``"low"`` where value <= thr (hypointense, e.g. T1w
            stroke lesions), ``"best"`` tries both and keeps the better (``"high"``
            on a tie).

    Returns:
        :class:`ThresholdResult` ``(threshold, dice, direction)``.

    Raises:
        ValueError: if shapes differ, there is no positive pixel, values are not
            finite or ``direction`` is unknown.
    """
    x = _to_numpy(intensity, np.float64).ravel()
    y = _to_numpy(labels, bool).ravel()
    if x.shape != y.shape:
        raise ValueError(f"intensity and labels must have the same size, got {x.size} and {y.size}")
    if not y.any():
        raise ValueError("labels hold no positive pixel: the DICE-optimal threshold is undefined")
    if not np.all(np.isfinite(x)):
        raise ValueError("intensity must be finite")
    if direction not in ("high", "low", "best"):
        raise ValueError(f"direction must be 'high', 'low' or 'best', got {direction!r}")
    cand = None if candidates is None else np.asarray(candidates, dtype=np.float64).ravel()
    results = []
    if direction in ("high", "best"):
        thr, dice = _best_high_threshold(x, y, cand)
        results.append(ThresholdResult(thr, dice, "high"))
    if direction in ("low", "best"):
        thr, dice = _best_high_threshold(-x, y, None if cand is None else -cand)
        results.append(ThresholdResult(-thr, dice, "low"))
    return max(results, key=lambda r: r.dice)  # max keeps the first ("high") on a tie


def apply_threshold(
    values: torch.Tensor | np.ndarray, threshold: float, direction: str = "high"
) -> torch.Tensor | np.ndarray:
    """Binarise ``values`` (any shape) with a cut from :func:`best_threshold_dice`.

    Returns:
        bool array of the same shape and type: ``values >= threshold`` for
        ``"high"``, ``values <= threshold`` for ``"low"``.
    """
    if direction == "high":
        return values >= threshold
    if direction == "low":
        return values <= threshold
    raise ValueError(f"direction must be 'high' or 'low', got {direction!r}")


def tune_pixel_threshold(
    maps: np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    foreground: np.ndarray | torch.Tensor | None = None,
) -> float:
    """Map threshold maximising pooled DICE on validation slices (uses pixel labels).

    This is how reconstruction baselines binarise their maps; a method tuned so
    must be flagged ``uses_pixel_labels`` in the summary table. Apply it as
    ``maps >= threshold``.

    Args:
        maps: (N, H, W) anomaly maps of the validation slices.
        masks: (N, H, W) bool lesion masks.
        foreground: (N, H, W) bool brain foreground; only these pixels count.
            None keeps every pixel.

    Returns:
        The threshold.
    """
    m = _to_numpy(maps, np.float64)
    y = _to_numpy(masks, bool)
    if m.shape != y.shape or m.ndim != 3:
        raise ValueError(f"maps and masks must both be (N, H, W), got {m.shape} and {y.shape}")
    if foreground is not None:
        fg = _to_numpy(foreground, bool)
        if fg.shape != m.shape:
            raise ValueError(f"foreground must have shape {m.shape}, got {fg.shape}")
        m, y = m[fg], y[fg]
    return best_threshold_dice(m, y, direction="high").threshold


# ---------------------------------------------------------------------------
# DDIB-style reconstruction
# ---------------------------------------------------------------------------


@dataclass
class DDIBResult:
    """Outcome of :func:`ddib_reconstruction`.

    Attributes:
        maps: (B, S, S) anomaly maps, mean over map channels of (x0 - reconstruction)^2.
        reconstruction: (B, C, S, S) healthy reconstruction in [-1, 1].
        network_calls: batched network calls spent; each covers every slice of the
            batch, so this is also the number of calls per slice.
    """

    maps: torch.Tensor
    reconstruction: torch.Tensor
    network_calls: int


def unguided_eps(predict_eps: EpsPredictor, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """(B, C, S, S) null-class eps from one call on ``x_t`` (B, C, S, S) at timestep ``t``."""
    b = x_t.shape[0]
    labels = torch.full((b,), NULL, dtype=torch.long, device=x_t.device)
    steps = torch.full((b,), t, dtype=torch.long, device=x_t.device)
    return predict_eps(x_t, steps, labels)


def check_reconstruction_args(
    x0: torch.Tensor, alphas_cumprod: torch.Tensor, depth: int, stride: int, map_channels: Sequence[int]
) -> None:
    """Raise a ValueError naming the first invalid argument of a reconstruction baseline (ddib, reconstruction.py)."""
    if x0.ndim != 4:
        raise ValueError(f"x0 must be (B, C, S, S), got shape {tuple(x0.shape)}")
    if not 1 <= depth <= alphas_cumprod.numel():
        raise ValueError(f"depth={depth} must lie in [1, T={alphas_cumprod.numel()}]")
    if stride < 1:
        raise ValueError(f"stride={stride} must be >= 1")
    if not map_channels or any(not 0 <= m < x0.shape[1] for m in map_channels):
        raise ValueError(f"map_channels={list(map_channels)} must be a non-empty subset of range({x0.shape[1]})")


@torch.no_grad()
def ddib_reconstruction(
    predict_eps: EpsPredictor,
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    depth: int,
    w: float,
    stride: int = 1,
    map_channels: Sequence[int],
) -> DDIBResult:
    """Classifier-free DDIB-style reconstruction baseline.

    The visited steps are ``0, stride, 2 * stride, ...`` below ``depth``; x0 is the
    state at the first of them. Encoding: unguided (null-class) DDIM inversion,
    eta = 0, up to the last visited step (one call per move). Decoding: the
    healthy-guided DDIM sampler (strength ``w``, eq. 6) back down the same steps,
    the move from step 0 going to the clean image (alpha-bar 1), one batched
    call (healthy + null) per step. Predicted x0 is clipped to [-1, 1] throughout.
    Network calls: ``2 * n - 1`` for ``n`` visited steps.

    Args:
        predict_eps: ``eps(x_t (N, C, S, S), t (N,) long, labels (N,) long)``.
        x0: (B, C, S, S) clean slices in [-1, 1].
        alphas_cumprod: (T,) alpha-bar of the DDPM schedule.
        depth: encoding depth (exclusive bound on visited steps), 1 <= depth <= T.
        w: guidance strength of the decoding (0 = conditional only).
        stride: k, the gap between visited steps.
        map_channels: channel indices the anomaly map is computed on.

    Returns:
        :class:`DDIBResult` with (B, S, S) maps, the (B, C, S, S) reconstruction
        and the number of network calls.
    """
    check_reconstruction_args(x0, alphas_cumprod, depth, stride, map_channels)
    abar = alphas_cumprod.detach().double().cpu().tolist()
    steps = list(range(0, depth, stride))
    calls = 0
    x = x0.float()
    for t, t_next in zip(steps[:-1], steps[1:]):
        eps = unguided_eps(predict_eps, x, t)
        x = ddim_step(x, predicted_x0(x, eps, abar[t]), eps, abar[t], abar[t_next])
        calls += 1
    for i in range(len(steps) - 1, -1, -1):
        t = steps[i]
        abar_to = abar[steps[i - 1]] if i > 0 else 1.0
        eps_c, eps_u = predict_cond_and_null(predict_eps, x, t, HEALTHY)
        eps = guided_eps(eps_c, eps_u, w)
        x = ddim_step(x, predicted_x0(x, eps, abar[t]), eps, abar[t], abar_to)
        calls += 1
    channels = list(map_channels)
    maps = (x0[:, channels].float() - x[:, channels]).pow(2).mean(dim=1)
    return DDIBResult(maps=maps, reconstruction=x, network_calls=calls)


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

DDIB_DEPTHS = (200, 400)


@torch.no_grad()
def ddib_maps(context: MethodContext, x0: torch.Tensor, seeds: Sequence[int], params: dict) -> MapsResult:
    """The ``ddib`` method's maps hook: :func:`ddib_reconstruction` at ``params`` ``depth`` and ``w`` on the
    main model, at the run's stride (else the DDIM calibration's) on the calibration's map channels
    (deterministic: ``seeds`` are not used)."""
    calibration = context.calibration("ddim")
    result = ddib_reconstruction(
        context.noise_predictor(), x0, context.model.alphas_cumprod.to(x0.device), depth=int(params["depth"]),
        w=float(params["w"]), stride=context.stride, map_channels=calibration.map_channel_indices,
    )  # fmt: skip
    return MapsResult(result.maps, result.network_calls)


def ddib_grid(context: MethodContext) -> dict[str, list]:
    """``ddib``'s default tuning grid: depth in :data:`DDIB_DEPTHS`, w in {1, the DDIM calibration's w*}."""
    return {"depth": list(DDIB_DEPTHS), "w": sorted({1.0, float(context.calibration("ddim").w)})}


register(ReconstructionMethod(
    "ddib", "DDIB-style classifier-free reconstruction on the same model", maps=ddib_maps, grid=ddib_grid,
    footnote="ddib's depth, w and threshold are tuned on validation masks",
))  # fmt: skip
register(ThresholdMethod(
    "threshold", "the oracle intensity threshold of the map channels' mean",
    footnote="threshold is the oracle intensity cut, tuned on the evaluated slices themselves (an upper bound)",
))  # fmt: skip
