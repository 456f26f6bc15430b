"""The comparison systems of the paper's Table 1, registered as reconstruction methods.

Each is one :class:`~anofpdm_monai.methods.ReconstructionMethod`: its maps hook calls the pure function
of :mod:`anofpdm_monai.reconstruction` on the main model and the components it names (trained by
``anofpdm train --recipe NAME`` into ``MODEL/baselines/NAME/``, :mod:`anofpdm_monai.components`), its
grid is the hyperparameter grid tuned on validation slices with pixel labels (per setup, like every
† row; :mod:`anofpdm_monai.tuning`). ``ddib`` is registered beside ``threshold`` in
:mod:`anofpdm_monai.baselines`. Grids (docs/baselines.md says where each value comes from):

* ``anoddpm-gaussian`` / ``anoddpm-simplex``: noise depth lambda in {100, 200, 300} (AnoFPDM's reference
  runs 300 for Gaussian and 200 for simplex on BraTS; AnoDDPM's paper 250);
* ``ddim-classifier``: encoding depth L in {200, 400} x guidance scale s in {10, 100} (Wolleb et al.:
  L = 500, s = 100; MONAI's tutorial L = 200, s = 6);
* ``cg-cdm``: noise depth in {51, 101, 201} (Hu et al.'s start is 101 on T = 1000) x classifier scale in
  {0, 10} (0: their classifier-free variant CF-CDM; 10: their published CG-CDM scale).

All but ``cg-cdm`` (always stride 1, 10 steps) run at the run's stride (``--stride``, else the DDIM
calibration's k), on the calibration's map channels; stochastic ones draw slice b's noise from a CPU generator seeded with the slice's own seed.
"""

from __future__ import annotations

from collections.abc import Sequence
import torch

from anofpdm_monai.components import load_component, training_command
from anofpdm_monai.methods import Component, MapsResult, MethodContext, ReconstructionMethod, register
from anofpdm_monai.networks import use_bf16
from anofpdm_monai.reconstruction import (
    InterpolatedConditionPredictor,
    anoddpm_reconstruction,
    cgcdm_map,
    classifier_guided_reconstruction,
)


def slice_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per slice, seeded with the slice's own seed (results do not depend on the batch)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def component(name: str) -> Component:
    """The registry's description of the component ``name`` (:func:`load_component` against the main model)."""
    return Component(name, lambda model, device: load_component(model.folder, name, model.config, device),
                     lambda folder: training_command(folder, name))  # fmt: skip


def map_channels(context: MethodContext) -> tuple[int, ...]:
    return context.calibration("ddim").map_channel_indices


def anoddpm_maps(noise: str):
    """The maps hook of ``anoddpm-NOISE``: :func:`anoddpm_reconstruction` on the component of that name."""

    def maps(context: MethodContext, x0: torch.Tensor, seeds: Sequence[int], params: dict) -> MapsResult:
        ddpm = context.components[f"anoddpm-{noise}"]
        result = anoddpm_reconstruction(
            ddpm.noise_predictor(context.settings.precision), x0, context.model.alphas_cumprod.to(x0.device),
            depth=int(params["depth"]), stride=context.stride, map_channels=map_channels(context), noise=noise,
            generators=slice_generators(seeds),
        )  # fmt: skip
        return MapsResult(result.maps, result.network_calls)

    return maps


def classifier_maps(context: MethodContext, x0: torch.Tensor, seeds: Sequence[int], params: dict) -> MapsResult:
    """The maps hook of ``ddim-classifier``: the main model's unconditional branch and the classifier component."""
    result = classifier_guided_reconstruction(
        context.noise_predictor(), context.components["classifier"].network, x0, context.model.alphas_cumprod.to(x0.device),
        depth=int(params["depth"]), stride=context.stride, scale=float(params["scale"]), map_channels=map_channels(context),
    )  # fmt: skip
    return MapsResult(result.maps, result.network_calls)


def cgcdm_maps(context: MethodContext, x0: torch.Tensor, seeds: Sequence[int], params: dict) -> MapsResult:
    """The maps hook of ``cg-cdm``: the main model's condition embedding interpolated, the classifier guiding.

    Always at stride 1 (10 one-timestep moves from the noised input, as Hu et al.'s 10 steps of their
    T = 4000 schedule), whatever the run's stride: its cost is 10 calls per slice."""
    scale = float(params["scale"])
    result = cgcdm_map(
        InterpolatedConditionPredictor(context.model.network, autocast=use_bf16(context.settings.precision, context.device)),
        x0, context.model.alphas_cumprod.to(x0.device), depth=int(params["depth"]), stride=1,
        map_channels=map_channels(context), classifier=context.components["classifier"].network if scale else None,
        scale=scale, generators=slice_generators(seeds),
    )  # fmt: skip
    return MapsResult(result.maps, result.network_calls)


for _noise, _depths in (("gaussian", [100, 200, 300]), ("simplex", [100, 200, 300])):
    register(ReconstructionMethod(
        f"anoddpm-{_noise}", f"AnoDDPM (Wyatt et al. 2022), {_noise} noise: an unconditional DDPM of healthy slices brings the noised input back",
        maps=anoddpm_maps(_noise), grid=lambda context, d=_depths: {"depth": list(d)},
        components=(component(f"anoddpm-{_noise}"),),
        footnote=f"anoddpm-{_noise}'s noise depth and threshold are tuned on validation masks",
    ))  # fmt: skip
register(ReconstructionMethod(
    "ddim-classifier", "DDIM with classifier guidance (Wolleb et al. 2022): DDIM encoding, decoding guided towards healthy by a noise-conditional classifier",
    maps=classifier_maps, grid=lambda context: {"depth": [200, 400], "scale": [10.0, 100.0]},
    components=(component("classifier"),),
    footnote="ddim-classifier's depth, guidance scale and threshold are tuned on validation masks",
))  # fmt: skip
register(ReconstructionMethod(
    "cg-cdm", "CG-CDM (Hu et al. 2023): the derivative of the conditional denoising output with respect to the condition",
    maps=cgcdm_maps, grid=lambda context: {"depth": [51, 101, 201], "scale": [0.0, 10.0]},
    components=(component("classifier"),),
    footnote="cg-cdm's noise depth, classifier scale and threshold are tuned on validation masks",
))  # fmt: skip
