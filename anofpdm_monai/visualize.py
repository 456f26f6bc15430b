"""PNG overlays: the slices with the largest predicted lesion, their anomaly map and mask contour."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from anofpdm_monai.io import atomic_write_bytes


def save_overlay(
    images: torch.Tensor,
    maps: torch.Tensor,
    masks: torch.Tensor,
    path: str | Path,
    *,
    truth: torch.Tensor | None = None,
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
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    area = masks.flatten(1).sum(1)
    order = torch.argsort(area, descending=True, stable=True)[:max_slices]
    if area.sum() == 0:  # nothing predicted: show the slices with the strongest maps
        order = torch.argsort(maps.flatten(1).amax(1), descending=True, stable=True)[:max_slices]
    fig, axes = plt.subplots(2, len(order), figsize=(3 * len(order), 6), squeeze=False)
    for col, i in enumerate(order.tolist()):
        image = images[i, channel].float().numpy().T
        for row, (background, title) in enumerate(((image, f"slice {i}"), (maps[i].float().numpy().T, "anomaly map"))):
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
