"""Classifier-free guidance: one batched call for the condition and for null (ALGORITHM.md section 3).

The predictor interface used by the whole package is a callable

    predict_eps(x: Tensor (N, C, S, S), t: Tensor (N,) long, labels: Tensor (N,) long) -> Tensor (N, C, S, S)

(:class:`anofpdm_monai.networks.NoisePredictor` is one). Class indices come from
:mod:`anofpdm_monai.networks` (``HEALTHY``, ``UNHEALTHY``, ``NULL``).
"""

from __future__ import annotations

from typing import Callable

import torch

from anofpdm_monai.networks import HEALTHY, NULL

EpsPredictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``predict_eps(x (N, C, S, S), t (N,) long, labels (N,) long) -> eps (N, C, S, S)``."""


def predict_cond_and_null(
    predict_eps: EpsPredictor,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    label: int = HEALTHY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict the noise for class ``label`` and for ``NULL`` with ONE call on ``[x_t; x_t]``.

    Args:
        predict_eps: the noise predictor (see the module docstring).
        x_t: (B, C, S, S) noised slices.
        t: timestep, an int, a 0-d tensor or a (B,) long tensor.
        label: the condition, one of the class constants of :mod:`anofpdm_monai.networks`.

    Returns:
        ``(eps_c, eps_u)``, each (B, C, S, S): the conditional and the unconditional (null) noise.

    Raises:
        ValueError: if ``t`` does not hold one or B timesteps, or the predictor returns a wrong shape.
    """
    batch = x_t.shape[0]
    t = torch.as_tensor(t, dtype=torch.long, device=x_t.device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be an int or hold {batch} timesteps (one per slice), got shape {tuple(t.shape)}")
    labels = torch.cat(
        [
            torch.full((batch,), label, dtype=torch.long, device=x_t.device),
            torch.full((batch,), NULL, dtype=torch.long, device=x_t.device),
        ]
    )
    eps = predict_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), labels)
    if eps.shape != (2 * batch, *x_t.shape[1:]):
        raise ValueError(
            f"the noise predictor returned shape {tuple(eps.shape)} for an input of shape {(2 * batch, *x_t.shape[1:])}"
        )
    return eps[:batch], eps[batch:]


def guided_eps(eps_c: torch.Tensor, eps_u: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guided noise, eq. (6): ``(1 + w) * eps_c - w * eps_u``.

    Args:
        eps_c: (..., C, S, S) conditional noise.
        eps_u: (..., C, S, S) unconditional noise.
        w: guidance strength, a float or a tensor broadcastable against the noise
            (e.g. (G, 1, 1, 1, 1) to evaluate G strengths at once).

    Returns:
        The guided noise, of the broadcast shape.
    """
    return (1 + w) * eps_c - w * eps_u
