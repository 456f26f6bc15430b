"""The forward-process engine of AnoFPDM: healthy- and unguided predictions along the noising chain.

Implements ALGORITHM.md sections 3-4 with the streaming statistics of section 5:

* at each visited timestep t = 0, k, 2k, ... < N, ONE batched network call on ``[x_t; x_t]`` with
  labels ``[HEALTHY; NULL]`` gives ``eps_c`` and ``eps_u``
  (:func:`anofpdm_monai.guidance.predict_cond_and_null`);
* the healthy-guided prediction (HGP, eq. 7) and the unguided prediction (UGP, eq. 10) of x_0,
  both clipped to [-1, 1];
* per map channel, ``mse_h`` (eq. 16), ``mse_u`` (eq. 17), the divergence ``d`` (eq. 12), and the
  aggregated anomaly map (eq. 20) as the mean of the sub-anomaly maps ``SAM_t = (HGP - x_0)^2``
  (eq. 19) from the first visited step up to the end step ``t_e = argmax_t d`` (eq. 21).

Differences from the reference implementation, all deliberate (see ALGORITHM.md section 4):

* one batched call per visited step (the reference spends four), at the timestep that matches the
  noise level of the input (the reference's guided and unguided calls use one below it);
* the DDIM inversion reuses the unguided branch of the previous step's call;
* statistics are streamed: a running sum of SAMs plus snapshots taken whenever ``d`` reaches a new
  strict maximum, so memory does not grow with the number of steps (the reference keeps every
  step's predictions).

The anomaly maps are registered streaming reducers (:class:`MapReducer`, :func:`register_map_reducer`):
``"aggregated"`` (the AAM, eq. 20) and ``"last"`` (the SAM at t_e, eq. 19) are built in; a new decision
variant that needs another reduction of the SAMs registers its own and finds it in
``ForwardProcessResult.maps`` without an edit of this engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from tqdm.auto import tqdm

from anofpdm_monai.guidance import EpsPredictor, guided_eps, predict_cond_and_null

ENCODINGS = ("ddim", "ddpm")
INVERSIONS = ("reference", "monai")
X0_TOLERANCE = 1e-4


@dataclass
class ForwardProcessResult:
    """Per-slice statistics of one forward process, for G guidance strengths at once.

    Shapes use G guidance strengths, B slices, K visited timesteps, M map channels, S x S pixels.

    Attributes:
        timesteps: (K,) long, the visited timesteps 0, k, 2k, ... < N.
        guidance_scales: (G,) float, the guidance strengths w.
        mse_h: (G, B, K, M) mean squared error of the HGP against x_0 (eq. 16).
        mse_u: (G, B, K, M) mean squared error of the UGP against x_0 (eq. 17); the same for every w.
        divergence: (G, B, K, M) mean squared difference between HGP and UGP, d (eq. 12).
        end_index: (G, B, M) long, index into ``timesteps`` of the end step t_e: the first argmax of d (eq. 21).
        dmax: (G, B, M) the maximum of d over the visited steps.
        maps: ``{reducer name: (G, B, M, S, S)}`` per-channel maps of the registered :class:`MapReducer`
            s that ran (:data:`MAP_REDUCERS`; e.g. ``"aggregated"``, the AAM of eq. 20, read as
            :attr:`aggregated_map`, and ``"last"``, the SAM at t_e of eq. 19, read as :attr:`last_map`).
        network_calls: number of (batched) network calls made, one per visited step.
        map_channels: indices of the map channels into the C input channels.
        include_end_step: whether the AAM averages up to and including t_e (True) or excluding it (False).
        encoding: ``"ddim"`` or ``"ddpm"``.
    """

    timesteps: torch.Tensor
    guidance_scales: torch.Tensor
    mse_h: torch.Tensor
    mse_u: torch.Tensor
    divergence: torch.Tensor
    end_index: torch.Tensor
    dmax: torch.Tensor
    maps: dict[str, torch.Tensor]
    network_calls: int
    map_channels: tuple[int, ...] = (0,)
    include_end_step: bool = True
    encoding: str = "ddim"

    def map(self, name: str) -> torch.Tensor:
        """(G, B, M, S, S) the map of reducer ``name``; a KeyError naming the reducers that ran otherwise."""
        if name not in self.maps:
            raise KeyError(f"no {name!r} map: this forward process ran the map reducers {sorted(self.maps)}")
        return self.maps[name]

    @property
    def aggregated_map(self) -> torch.Tensor:
        """(G, B, M, S, S) per-channel aggregated anomaly map AAM (eq. 20): ``maps["aggregated"]``."""
        return self.map("aggregated")

    @property
    def last_map(self) -> torch.Tensor:
        """(G, B, M, S, S) the sub-anomaly map at t_e only (eq. 19): ``maps["last"]``."""
        return self.map("last")

    @property
    def end_step(self) -> torch.Tensor:
        """(G, B, M) long: the end step t_e as a timestep (not an index)."""
        return self.timesteps.to(self.end_index.device)[self.end_index]

    def select(self, g: int) -> ForwardProcessResult:
        """Return the result for guidance strength index ``g`` only (leading axis of size G = 1)."""
        n = self.guidance_scales.shape[0]
        if not -n <= g < n:
            raise ValueError(f"g={g} must index one of the {n} guidance scales, in [{-n}, {n})")
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = value[g : g + 1] if f.name in ("guidance_scales", *PER_SLICE_FIELDS) else value
        values["maps"] = {name: m[g : g + 1] for name, m in self.maps.items()}
        return ForwardProcessResult(**values)

    @staticmethod
    def concatenate(parts: Sequence[ForwardProcessResult]) -> ForwardProcessResult:
        """Join the results of consecutive batches of one volume along the slice axis B.

        The parts must share the timesteps, guidance strengths and settings (one run, batched).
        """
        if not parts:
            raise ValueError("concatenate needs at least one ForwardProcessResult")
        first = parts[0]
        for part in parts[1:]:
            if not (torch.equal(part.timesteps, first.timesteps) and torch.equal(part.guidance_scales, first.guidance_scales)):
                raise ValueError("the parts were run with other timesteps or guidance strengths; they are not one run")
        values = {f.name: getattr(first, f.name) for f in fields(first)}
        values.update({name: torch.cat([getattr(p, name) for p in parts], dim=1) for name in PER_SLICE_FIELDS})
        if any(set(p.maps) != set(first.maps) for p in parts):
            raise ValueError("the parts ran other map reducers; they are not one run")
        values["maps"] = {name: torch.cat([p.maps[name] for p in parts], dim=1) for name in first.maps}
        return ForwardProcessResult(**values)


PER_SLICE_FIELDS = ("mse_h", "mse_u", "divergence", "end_index", "dmax")
"""The fields of :class:`ForwardProcessResult` with a (G, B, ...) layout (and every map of ``maps``)."""


class MapReducer:
    """A streaming reduction of the sub-anomaly maps ``SAM_t = (HGP - x_0)^2`` (eq. 19) into one map per slice.

    The engine makes one per forward process and calls :meth:`update` at every visited step, in order;
    its memory must not grow with the number of steps. Subclass it and register the class with
    :func:`register_map_reducer`; its map is then in every ``ForwardProcessResult.maps[name]``.

    Args:
        like: (G, B, M, S, S) zeros of the maps' shape, dtype and device.
        include_end_step: whether averages up to t_e include t_e (the calibration's convention).
    """

    def __init__(self, like: torch.Tensor, include_end_step: bool) -> None:
        self.include_end_step = include_end_step

    def update(self, sam: torch.Tensor, improved: torch.Tensor) -> None:
        """Add one visited step.

        Args:
            sam: (G, B, M, S, S) this step's sub-anomaly maps.
            improved: (G, B, M, 1, 1) bool: the divergence reached a new strict maximum at this step (the
                running t_e moved here).
        """
        raise NotImplementedError

    def result(self, end_index: torch.Tensor) -> torch.Tensor:
        """(G, B, M, S, S) the map, given ``end_index`` (G, B, M), the index of t_e among the visited steps."""
        raise NotImplementedError


class AggregatedMap(MapReducer):
    """The aggregated anomaly map (eq. 20): the mean SAM from the first visited step up to t_e, as a running
    sum plus a snapshot taken whenever the divergence reaches a new maximum."""

    def __init__(self, like: torch.Tensor, include_end_step: bool) -> None:
        super().__init__(like, include_end_step)
        self.running_sum = torch.zeros_like(like)
        self.snapshot = torch.zeros_like(like)

    def update(self, sam: torch.Tensor, improved: torch.Tensor) -> None:
        if not self.include_end_step:
            self.snapshot = torch.where(improved, self.running_sum, self.snapshot)
        self.running_sum += sam
        if self.include_end_step:
            self.snapshot = torch.where(improved, self.running_sum, self.snapshot)

    def result(self, end_index: torch.Tensor) -> torch.Tensor:
        """Zeros where no step came before t_e (``include_end_step`` False and t_e the first step)."""
        count = end_index + 1 if self.include_end_step else end_index
        return self.snapshot / count.clamp(min=1).to(self.snapshot.dtype)[..., None, None]


class LastMap(MapReducer):
    """The SAM at t_e only (eq. 19 at the end step)."""

    def __init__(self, like: torch.Tensor, include_end_step: bool) -> None:
        super().__init__(like, include_end_step)
        self.last = torch.zeros_like(like)

    def update(self, sam: torch.Tensor, improved: torch.Tensor) -> None:
        self.last = torch.where(improved, sam, self.last)

    def result(self, end_index: torch.Tensor) -> torch.Tensor:
        return self.last


MAP_REDUCERS: dict[str, type[MapReducer]] = {}
"""The registered map reducers by name (:func:`register_map_reducer`); every forward process runs them all."""


def register_map_reducer(name: str, reducer: type[MapReducer]) -> type[MapReducer]:
    """Add a :class:`MapReducer` subclass under ``name`` (its map: ``ForwardProcessResult.maps[name]``).

    Raises:
        ValueError: ``name`` is taken by another class, or ``reducer`` is not a MapReducer subclass.
    """
    if not (isinstance(reducer, type) and issubclass(reducer, MapReducer)):
        raise ValueError(f"map reducer {name!r}: {reducer!r} is not a MapReducer subclass")
    if MAP_REDUCERS.get(name, reducer) is not reducer:
        raise ValueError(f"a map reducer named {name!r} is already registered ({MAP_REDUCERS[name].__name__})")
    MAP_REDUCERS[name] = reducer
    return reducer


register_map_reducer("aggregated", AggregatedMap)
register_map_reducer("last", LastMap)


def visited_timesteps(steps: int, stride: int) -> list[int]:
    """The visited timesteps ``0, stride, 2 * stride, ... < steps`` (ceil(steps / stride) of them)."""
    return list(range(0, steps, stride))


def noised(x0: torch.Tensor, abar_t: float, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Sample q(x_t | x_0), eq. (2): ``sqrt(abar_t) x_0 + sqrt(1 - abar_t) n`` with n ~ N(0, I).

    Args:
        x0: (B, C, S, S) clean slices.
        abar_t: the cumulative product of alphas at t, in (0, 1).
        generator: random source on ``x0.device``: one for the batch, or a sequence of B, one per
            slice (then a slice's noise does not depend on the batch it is in); None: torch's global one.
    """
    if generator is None or isinstance(generator, torch.Generator):
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    else:
        if len(generator) != x0.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x0.shape[0]} slices; give one per slice")
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g, device=x0.device, dtype=x0.dtype) for g in generator])
    return math.sqrt(abar_t) * x0 + math.sqrt(1.0 - abar_t) * noise


def predicted_x0(x_t: torch.Tensor, eps: torch.Tensor, abar_t: float) -> torch.Tensor:
    """Clipped prediction of x_0 from the noise, eqs. (7) and (10): ``clip((x_t - sqrt(1-abar) eps) / sqrt(abar))``.

    Args:
        x_t: (..., C, S, S) noised input.
        eps: noise broadcastable against ``x_t`` (e.g. (G, B, C, S, S) guided noise for a (B, C, S, S) input).
        abar_t: the cumulative product of alphas at t, in (0, 1).
    """
    return ((x_t - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)).clamp(-1.0, 1.0)


def ddim_step(
    x_t: torch.Tensor,
    x0_hat: torch.Tensor,
    eps: torch.Tensor,
    abar_t: float,
    abar_to: float,
    rederive_eps: bool = True,
) -> torch.Tensor:
    """One deterministic (eta = 0) DDIM move from noise level ``abar_t`` to ``abar_to``, either way.

    Upwards (``abar_to < abar_t``) it is the DDIM inversion of the forward process (ALGORITHM.md
    section 4); downwards it is the DDIM sampler (the ddib baseline's decoding; ``abar_to = 1``
    returns ``x0_hat``). With ``rederive_eps`` (the reference's choice and the default) the noise is
    re-derived from the clipped prediction, ``eps' = (x_t / sqrt(abar_t) - x0_hat) / sqrt(1 / abar_t - 1)``;
    without it the raw network ``eps`` is kept, as MONAI's ``DDIMScheduler.reversed_step`` does (it
    too clips x_0). The two agree whenever the clipping of ``x0_hat`` is inactive.

    Args:
        x_t: (B, C, S, S) input at noise level ``abar_t``.
        x0_hat: (B, C, S, S) clipped prediction of x_0 from ``(x_t, eps)`` (:func:`predicted_x0`).
        eps: (B, C, S, S) the network noise that gave ``x0_hat``.
        abar_t: cumulative alpha product of the input, in (0, 1).
        abar_to: cumulative alpha product of the target, in (0, 1].

    Returns:
        (B, C, S, S) ``sqrt(abar_to) * x0_hat + sqrt(1 - abar_to) * eps'``.
    """
    if rederive_eps:
        eps = (x_t / math.sqrt(abar_t) - x0_hat) / math.sqrt(1.0 / abar_t - 1.0)
    return math.sqrt(abar_to) * x0_hat + math.sqrt(1.0 - abar_to) * eps


@dataclass
class StepState:
    """What a per-step callback of :func:`run_forward_process` sees at one visited step (read only).

    Attributes:
        index: position of the step among the visited ones (0-based).
        t: the timestep.
        x_t: (B, C, S, S) the noised input.
        xh_m: (G, B, M, S, S) HGP on the map channels.
        xu_m: (B, M, S, S) UGP on the map channels.
        x0_m: (B, M, S, S) the clean slices' map channels.
    """

    index: int
    t: int
    x_t: torch.Tensor
    xh_m: torch.Tensor
    xu_m: torch.Tensor
    x0_m: torch.Tensor


class _StreamingStats:
    """Running per-step statistics and the registered maps, in memory independent of the number of steps.

    Args:
        x0_m: (B, M, S, S) the clean slices' map channels.
        num_scales: G.
        num_steps: K, the number of visited steps (only the (G, B, K, M) curves depend on it).
        include_end_step: average SAMs up to and including t_e (True) or excluding it (False).
    """

    def __init__(self, x0_m: torch.Tensor, num_scales: int, num_steps: int, include_end_step: bool) -> None:
        batch, channels = x0_m.shape[:2]
        self.x0_m = x0_m
        curve = (num_scales, batch, num_steps, channels)
        self.mse_h = x0_m.new_zeros(curve)
        self.mse_u = x0_m.new_zeros(curve)
        self.divergence = x0_m.new_zeros(curve)
        like = x0_m.new_zeros((num_scales, *x0_m.shape))
        self.reducers = {name: reducer(like, include_end_step) for name, reducer in MAP_REDUCERS.items()}
        self.dmax = x0_m.new_full((num_scales, batch, channels), -math.inf)
        self.end_index = torch.zeros((num_scales, batch, channels), dtype=torch.long, device=x0_m.device)

    def update(self, index: int, xh_m: torch.Tensor, xu_m: torch.Tensor) -> None:
        """Add visited step ``index``.

        Args:
            index: position of the step among the visited ones (0-based).
            xh_m: (G, B, M, S, S) HGP on the map channels.
            xu_m: (B, M, S, S) UGP on the map channels.
        """
        sam = (xh_m - self.x0_m).square()
        d = (xh_m - xu_m).square().mean(dim=(-2, -1))
        self.mse_h[:, :, index] = sam.mean(dim=(-2, -1))
        self.mse_u[:, :, index] = (xu_m - self.x0_m).square().mean(dim=(-2, -1))
        self.divergence[:, :, index] = d
        improved = d > self.dmax  # strict: t_e is the first maximum
        for reducer in self.reducers.values():
            reducer.update(sam, improved[..., None, None])
        self.end_index = torch.where(improved, torch.full_like(self.end_index, index), self.end_index)
        self.dmax = torch.where(improved, d, self.dmax)

    def maps(self) -> dict[str, torch.Tensor]:
        """``{name: (G, B, M, S, S)}``: every registered reducer's map."""
        return {name: reducer.result(self.end_index) for name, reducer in self.reducers.items()}


def _check_arguments(
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    scales: list[float],
    steps: int,
    stride: int,
    encoding: str,
    inversion: str,
    map_channels: Sequence[int],
) -> None:
    """Raise a ValueError naming the first invalid argument of :func:`run_forward_process`."""
    if x0.ndim != 4 or x0.shape[-1] != x0.shape[-2]:
        raise ValueError(f"x0 must have shape (B, C, S, S), got {tuple(x0.shape)}")
    if not torch.isfinite(x0).all():
        raise ValueError("x0 must be finite (it holds NaN or inf)")
    low, high = float(x0.min()), float(x0.max())
    if low < -1.0 - X0_TOLERANCE or high > 1.0 + X0_TOLERANCE:
        raise ValueError(f"x0 must lie in [-1, 1] (tolerance {X0_TOLERANCE}), got values in [{low:.4g}, {high:.4g}]")
    if alphas_cumprod.ndim != 1 or not bool(((alphas_cumprod > 0) & (alphas_cumprod < 1)).all()):
        raise ValueError("alphas_cumprod must be a 1-D tensor (T,) with values in (0, 1)")
    if not 1 <= steps <= alphas_cumprod.shape[0]:
        raise ValueError(f"steps={steps} must lie in [1, {alphas_cumprod.shape[0]}] (len(alphas_cumprod))")
    if stride < 1:
        raise ValueError(f"stride={stride} must be >= 1")
    if not scales:
        raise ValueError("guidance_scales must hold at least one guidance strength w")
    if not all(math.isfinite(w) for w in scales):
        raise ValueError(f"guidance_scales must be finite, got {scales}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r} must be one of {ENCODINGS}")
    if inversion not in INVERSIONS:
        raise ValueError(f"inversion={inversion!r} must be one of {INVERSIONS}")
    channels = x0.shape[1]
    if len(map_channels) == 0 or any(not 0 <= int(m) < channels for m in map_channels):
        raise ValueError(f"map_channels={tuple(map_channels)} must be non-empty indices in [0, {channels})")


@torch.no_grad()
def run_forward_process(
    predict_eps: EpsPredictor,
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    guidance_scales: Sequence[float],
    steps: int = 600,
    stride: int = 1,
    encoding: str = "ddim",
    map_channels: Sequence[int] = (0,),
    include_end_step: bool = True,
    inversion: str = "reference",
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: Callable[[StepState], None] | None = None,
    progress: bool = False,
) -> ForwardProcessResult:
    """Run the forward process on a batch of slices for several guidance strengths at once.

    The noised trajectory x_t does not depend on w (the DDIM inversion uses only the unguided
    branch; DDPM draws fresh noise), and neither do ``eps_c`` and ``eps_u``. So every strength in
    ``guidance_scales`` is evaluated from the same single network call per visited step, and all
    statistics carry a leading G axis: calibrating over a grid of G strengths costs one forward
    process, not G. With the same ``generator`` state, the statistics for one w equal those of a
    run with ``guidance_scales=[w]``.

    Encodings (ALGORITHM.md section 4): ``"ddpm"`` noises x_0 afresh at every visited step;
    ``"ddim"`` noises it at the first visited step and then applies the unguided DDIM inversion
    (:func:`ddim_step`) to the previous step, reusing that step's network call. All
    computation is in float32 on ``x0.device``.

    Args:
        predict_eps: noise predictor ``(x (N, C, S, S), t (N,) long, labels (N,) long) -> (N, C, S, S)``.
        x0: (B, C, S, S) clean slices in [-1, 1].
        alphas_cumprod: (T,) cumulative products of alphas of the training schedule, values in (0, 1).
        guidance_scales: the G guidance strengths w (eq. 6), at least one.
        steps: forward-step budget N; visited steps are 0, stride, 2 * stride, ... < N. In [1, T].
        stride: k >= 1; k > 1 is the fast mode (ceil(N / k) network calls).
        encoding: ``"ddim"`` (deterministic after the first step; default) or ``"ddpm"``.
        map_channels: indices in [0, C) of the channels the statistics and maps are computed on.
        include_end_step: the aggregated map averages SAMs from the first visited step up to and
            including t_e (True, project default) or up to but excluding t_e (False, the reference's
            convention); in the latter case a slice whose t_e is the first visited step has an
            all-zero aggregated map.
        inversion: DDIM only: ``"reference"`` re-derives eps from the clipped UGP (default);
            ``"monai"`` keeps the raw network eps as ``monai.networks.schedulers.DDIMScheduler.reversed_step``
            does (equal to it for ``stride == T // num_inference_steps``).
        generator: random source on ``x0.device``, or a sequence of B generators, one per slice (so a
            slice's outputs do not depend on how slices are batched); fixed seeds make the run
            bit-reproducible.
        callback: called with a :class:`StepState` after every visited step, to observe the loop
            (e.g. keep every step's maps, which the engine itself does not) without copying it.
        progress: show a tqdm progress bar over the visited steps.

    Returns:
        A :class:`ForwardProcessResult` with statistics of shape (G, B, ...).

    Raises:
        ValueError: on an invalid argument (the message names it and its allowed range).
    """
    scales = [float(w) for w in guidance_scales]
    map_channels = tuple(int(m) for m in map_channels)
    _check_arguments(x0, alphas_cumprod, scales, steps, stride, encoding, inversion, map_channels)

    device = x0.device
    x0 = x0.to(torch.float32)
    abar = alphas_cumprod.detach().to("cpu", torch.float64).tolist()
    timesteps = visited_timesteps(steps, stride)
    w = torch.tensor(scales, dtype=torch.float32, device=device).view(-1, 1, 1, 1, 1)
    channel_index = list(map_channels)
    stats = _StreamingStats(x0[:, channel_index], len(scales), len(timesteps), include_end_step)

    x_t = xu = eps_u = None
    abar_prev = 0.0
    for index, t in enumerate(tqdm(timesteps, desc="forward process", disable=not progress, leave=False)):
        if encoding == "ddpm" or index == 0:
            x_t = noised(x0, abar[t], generator)
        else:
            x_t = ddim_step(x_t, xu, eps_u, abar_prev, abar[t], rederive_eps=inversion == "reference")
        eps_c, eps_u = predict_cond_and_null(predict_eps, x_t, t)
        xh = predicted_x0(x_t, guided_eps(eps_c, eps_u, w), abar[t])  # (G, B, C, S, S)
        xu = predicted_x0(x_t, eps_u, abar[t])  # (B, C, S, S)
        stats.update(index, xh[:, :, channel_index], xu[:, channel_index])
        if callback is not None:
            callback(StepState(index, t, x_t, xh[:, :, channel_index], xu[:, channel_index], stats.x0_m))
        abar_prev = abar[t]

    return ForwardProcessResult(
        timesteps=torch.tensor(timesteps, dtype=torch.long, device=device),
        guidance_scales=torch.tensor(scales, dtype=torch.float32, device=device),
        mse_h=stats.mse_h,
        mse_u=stats.mse_u,
        divergence=stats.divergence,
        end_index=stats.end_index,
        dmax=stats.dmax,
        maps=stats.maps(),
        network_calls=len(timesteps),
        map_channels=map_channels,
        include_end_step=include_end_step,
        encoding=encoding,
    )
