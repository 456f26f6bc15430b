"""Noise for diffusion training and inference: Gaussian, and multi-octave simplex noise (AnoDDPM).

AnoDDPM (Wyatt et al., CVPR workshops 2022) replaces the Gaussian noise of a DDPM by simplex noise, a
smooth gradient noise whose low frequencies destroy whole lesions that white noise leaves visible.
Their published setting sums 6 octaves starting at frequency 2^-6 per pixel, each octave twice the
frequency and ``persistence`` (0.8) times the amplitude of the one before.

:func:`simplex_noise` draws it on the tensor's device, one independent field per sample and channel,
from one ``torch.Generator`` per sample, so a slice's noise does not depend on the batch it is in.
Choices of this project (AnoDDPM's code leaves them open or does otherwise):

* 2-D simplex noise (Perlin 2001) with a per-draw random gradient permutation and a random lattice
  offset, instead of a 2-D cut through 3-D noise at a time coordinate: either gives a fresh field per
  draw;
* every field is standardised to zero mean and unit variance per sample and channel, so that
  ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` stays variance preserving and the DDPM
  schedule and posterior apply unchanged (AnoDDPM uses the raw octave sum, whose variance is below 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

NOISE_KINDS = ("gaussian", "simplex")

# The published AnoDDPM setting (Wyatt et al. 2022).
SIMPLEX_OCTAVES = 6
SIMPLEX_PERSISTENCE = 0.8
SIMPLEX_FREQUENCY = 2.0**-6

_F2 = 0.5 * (math.sqrt(3.0) - 1.0)  # skew of the square lattice into rhombi of two triangles
_G2 = (3.0 - math.sqrt(3.0)) / 6.0  # and back
_TABLE = 256  # size of the permutation table


def _gradients(device: torch.device) -> torch.Tensor:
    """(12, 2) the unit-length gradient directions of 2-D simplex noise (every 30 degrees)."""
    angles = torch.arange(12, dtype=torch.float32, device=device) * (math.pi / 6.0)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def _simplex_2d(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """One octave of 2-D simplex noise, values in about [-1, 1].

    Args:
        x, y: (B, P) sample coordinates, float32.
        perm: (B, 2 * 256) long, each row a permutation of 0..255 repeated twice.

    Returns:
        (B, P) noise values.
    """
    grads = _gradients(x.device)
    s = (x + y) * _F2
    i = torch.floor(x + s)
    j = torch.floor(y + s)
    t = (i + j) * _G2
    x0, y0 = x - (i - t), y - (j - t)
    upper = (x0 > y0).float()  # which of the rhombus's two triangles holds the point
    zeros, ones = torch.zeros_like(x), torch.ones_like(x)
    ii, jj = i.long() % _TABLE, j.long() % _TABLE
    total = torch.zeros_like(x)
    for k, (di, dj) in enumerate(((zeros, zeros), (upper, ones - upper), (ones, ones))):  # the triangle's corners
        dx = x0 - di + k * _G2
        dy = y0 - dj + k * _G2
        hashed = torch.gather(perm, 1, ii + di.long() + torch.gather(perm, 1, jj + dj.long())) % 12
        g = grads[hashed]  # (B, P, 2)
        falloff = (0.5 - dx * dx - dy * dy).clamp_min(0.0)
        total = total + falloff.pow(4) * (g[..., 0] * dx + g[..., 1] * dy)
    return 70.0 * total


def _generators(generator: torch.Generator | Sequence[torch.Generator] | None, batch: int) -> list[torch.Generator | None]:
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * batch
    generators = list(generator)
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch}: give one per sample")
    return generators


def simplex_noise(
    shape: Sequence[int],
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    *,
    octaves: int = SIMPLEX_OCTAVES,
    persistence: float = SIMPLEX_PERSISTENCE,
    frequency: float = SIMPLEX_FREQUENCY,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Multi-octave 2-D simplex noise, standardised per sample and channel.

    Args:
        shape: (B, C, H, W).
        generator: one CPU ``torch.Generator`` per sample (a list of B), one for the whole batch, or None
            (the global generator). Only the per-field permutations and offsets are drawn from it (on the
            CPU); the field is computed on ``device``.
        octaves: number of octaves summed.
        persistence: amplitude ratio of each octave to the one below it.
        frequency: the first octave's frequency in cycles per pixel (doubling every octave).
        device: where the noise is computed and returned (default CPU).

    Returns:
        (B, C, H, W) float32 noise with zero mean and unit variance in each (sample, channel) field.
    """
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, C, H, W), got {tuple(shape)}")
    if octaves < 1 or not persistence > 0 or not frequency > 0:
        raise ValueError(f"octaves={octaves}, persistence={persistence}, frequency={frequency}: need octaves >= 1 and positive others")
    b, c, h, w = (int(v) for v in shape)
    device = torch.device("cpu" if device is None else device)
    perms, offsets = [], []
    for g in _generators(generator, b):
        for _ in range(c):
            for _ in range(octaves):
                perm = torch.randperm(_TABLE, generator=g)
                perms.append(torch.cat([perm, perm]))
                offsets.append(torch.rand(2, generator=g) * _TABLE)
    perm = torch.stack(perms).to(device)  # (B * C * octaves, 512)
    offset = torch.stack(offsets).to(device)  # (B * C * octaves, 2)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                                torch.arange(w, dtype=torch.float32, device=device), indexing="ij")  # fmt: skip
    scale = frequency * 2.0 ** torch.arange(octaves, dtype=torch.float32, device=device).repeat(b * c)  # (B*C*octaves,)
    x = cols.reshape(1, -1) * scale[:, None] + offset[:, :1]
    y = rows.reshape(1, -1) * scale[:, None] + offset[:, 1:]
    amplitude = persistence ** torch.arange(octaves, dtype=torch.float32, device=device).repeat(b * c)
    fields = (_simplex_2d(x, y, perm) * amplitude[:, None]).reshape(b, c, octaves, h * w).sum(dim=2)
    fields = fields - fields.mean(dim=-1, keepdim=True)
    fields = fields / fields.std(dim=-1, keepdim=True).clamp_min(1e-12)
    return fields.reshape(b, c, h, w)


def draw_noise(
    kind: str,
    shape: Sequence[int],
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, C, H, W) float32 noise of ``kind`` (:data:`NOISE_KINDS`), drawn from ``generator`` on the CPU
    (Gaussian) or per sample (simplex), returned on ``device``."""
    if kind == "gaussian":
        generators = _generators(generator, int(shape[0]))
        if generators and all(g is generators[0] for g in generators):
            return torch.randn(tuple(shape), generator=generators[0]).to(device or "cpu")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generators]).to(device or "cpu")
    if kind == "simplex":
        return simplex_noise(shape, generator, device=device)
    raise ValueError(f"noise kind {kind!r}: choose one of {NOISE_KINDS}")
