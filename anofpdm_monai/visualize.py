"""PNG overlays: the slices with the largest predicted lesion, their anomaly map and mask contour."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch

from anofpdm_monai.io import atomic_write_bytes


def overlay_slices(maps: torch.Tensor, masks: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` slices to show: largest predicted mask first, then strongest map.

    Args:
        maps: (N, S, S) anomaly maps.
        masks: (N, S, S) bool predicted masks.

    Returns:
        (min(count, N),) long indices.
    """
    by_map = torch.argsort(maps.flatten(1).amax(1), descending=True, stable=True)
    area = masks.flatten(1).sum(1)[by_map]
    return by_map[torch.argsort(area, descending=True, stable=True)][:count]


def save_overlay(
    images: torch.Tensor,
    maps: torch.Tensor,
    masks: torch.Tensor,
    path: str | Path,
    *,
    truth: torch.Tensor | None = None,
    slice_indices: Sequence[int] | None = None,
    channel: int = 0,
    max_slices: int = 4,
) -> Path:
    """Write a PNG of up to ``max_slices`` slices with the largest predicted lesion.

    Args:
        images: (N, C, S, S) slices in [-1, 1]; channel ``channel`` is shown.
        maps: (N, S, S) anomaly maps.
        masks: (N, S, S) bool predicted masks (red contour).
        path: the PNG to write (atomically).
        truth: optional (N, S, S) bool ground truth (green contour).
        slice_indices: optional (N,) axial index of each slice in the RAS-reoriented volume, for the titles.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = overlay_slices(maps, masks, max_slices)
    fig, axes = plt.subplots(2, len(order), figsize=(3 * len(order), 6), squeeze=False)
    for col, i in enumerate(order.tolist()):
        image = images[i, channel].float().numpy().T
        name = f"axial z = {slice_indices[i]} (RAS)" if slice_indices is not None else f"brain slice {i}"
        for row, (background, title) in enumerate(((image, name), (maps[i].float().numpy().T, "anomaly map"))):
            ax = axes[row, col]
            ax.imshow(background, cmap="gray" if row == 0 else "magma", origin="lower")
            ax.contour(masks[i].numpy().T.astype(float), levels=[0.5], colors="red", linewidths=1)
            if truth is not None:
                ax.contour(truth[i].numpy().T.astype(float), levels=[0.5], colors="lime", linewidths=1)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())
