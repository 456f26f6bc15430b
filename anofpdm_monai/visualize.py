"""PNG figures: overlays of a case's slices with prediction and ground truth, and its decision curves.

One overlay function (:func:`overlay_png`) serves ``segment --save-png``, the raw-cohort outputs of
``evaluate`` and the cohort report. Slices are RAS-oriented (X towards the patient's right, Y
anterior) and drawn with X across and anterior up, so the patient's left is on the image's left;
the figures mark L and R.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from anofpdm_monai.io import atomic_write_bytes

PREDICTION_COLOUR = "#ff3b30"  # red
TRUTH_COLOUR = "#00e5ff"  # cyan: told apart from red also by red-green colour-blind readers
CURVE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    _pyplot().close(fig)
    return buffer.getvalue()


def overlay_slices(maps: torch.Tensor, masks: torch.Tensor, count: int, truth: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``count`` slices to show.

    Without ``truth``: largest predicted mask first, ties by the strongest map. With ``truth``: the
    slices of the largest predicted lesion and of the largest true lesion take turns (each ranked
    as above, a slice shown once), so a missed lesion and a false alarm both appear.

    Args:
        maps: (N, S, S) anomaly maps.
        masks: (N, S, S) bool predicted masks.
        count: how many slices at most.
        truth: optional (N, S, S) bool ground truth.

    Returns:
        (min(count, N),) long indices.
    """
    by_map = torch.argsort(maps.flatten(1).amax(1), descending=True, stable=True)

    def ranked(areas: torch.Tensor) -> list[int]:
        return by_map[torch.argsort(areas.flatten(1).sum(1)[by_map], descending=True, stable=True)].tolist()

    if truth is None:
        return torch.as_tensor(ranked(masks)[:count], dtype=torch.long)
    order: list[int] = []
    for pair in zip(ranked(masks), ranked(truth)):
        for i in pair:
            if i not in order:
                order.append(i)
    return torch.as_tensor(order[:count], dtype=torch.long)


def overlay_png(
    images: torch.Tensor,
    maps: torch.Tensor,
    masks: torch.Tensor,
    *,
    truth: torch.Tensor | None = None,
    slice_indices: Sequence[int] | None = None,
    title: str = "",
    max_slices: int = 4,
) -> bytes:
    """A PNG of up to ``max_slices`` slices (see :func:`overlay_slices`): image and anomaly map, outlines drawn.

    Each column is one slice: the image above, the anomaly map below, the prediction outlined in
    :data:`PREDICTION_COLOUR` and the ground truth in :data:`TRUTH_COLOUR`; a legend, ``title``
    (the case id) and L / R on every panel.

    Args:
        images: (N, S, S) slices (one channel), RAS-oriented.
        maps: (N, S, S) anomaly maps.
        masks: (N, S, S) bool predicted masks.
        truth: optional (N, S, S) bool ground truth.
        slice_indices: optional (N,) axial index of each slice in the RAS-reoriented volume, for the titles.
        title: the figure's title.
        max_slices: columns at most.

    Returns:
        The PNG's bytes.
    """
    from matplotlib.lines import Line2D

    plt = _pyplot()
    order = overlay_slices(maps, masks, max_slices, truth)
    fig, axes = plt.subplots(2, len(order), figsize=(3 * len(order), 6.6), squeeze=False)
    for col, i in enumerate(order.tolist()):
        name = f"axial z = {slice_indices[i]} (RAS)" if slice_indices is not None else f"brain slice {i}"
        for row, (background, label, cmap) in enumerate(((images[i], name, "gray"), (maps[i], "anomaly map", "magma"))):
            ax = axes[row, col]
            ax.imshow(background.float().numpy().T, cmap=cmap, origin="lower")
            outlines = [(masks[i], PREDICTION_COLOUR)] + ([] if truth is None else [(truth[i], TRUTH_COLOUR)])
            for outline, colour in outlines:
                if outline.any():
                    ax.contour(outline.numpy().T.astype(float), levels=[0.5], colors=colour, linewidths=1.2)
            ax.set_title(label, fontsize=9)
            for x, side in ((0.02, "L"), (0.98, "R")):
                ax.text(x, 0.5, side, transform=ax.transAxes, color="yellow", fontsize=10, fontweight="bold",
                        ha="left" if side == "L" else "right", va="center")  # fmt: skip
            ax.axis("off")
    handles = [Line2D([], [], color=PREDICTION_COLOUR, lw=2, label="prediction")]
    if truth is not None:
        handles.append(Line2D([], [], color=TRUTH_COLOUR, lw=2, label="ground truth"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _png(fig)


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
    title: str | None = None,
) -> Path:
    """Write :func:`overlay_png` of channel ``channel`` of (N, C, S, S) ``images`` to ``path`` (atomically).

    ``title`` defaults to the file's stem, the case id for ``CASE.png``.
    """
    title = Path(path).stem if title is None else title
    png = overlay_png(images[:, channel], maps, masks, truth=truth, slice_indices=slice_indices, title=title, max_slices=max_slices)
    return atomic_write_bytes(path, png)


def curves_png(
    health: np.ndarray,
    health_threshold: float,
    slice_indices: np.ndarray,
    true_unhealthy: np.ndarray,
    timesteps: np.ndarray,
    divergence: np.ndarray,
    end_steps: np.ndarray,
    shown: Sequence[int],
    *,
    title: str = "",
) -> bytes:
    """A PNG of one case's decision curves: the health score per slice and d(t) of some slices.

    Args:
        health: (N,) health score per slice, larger = more likely unhealthy.
        health_threshold: slices above it are predicted unhealthy (a horizontal line).
        slice_indices: (N,) axial index of each slice.
        true_unhealthy: (N,) bool, the slice holds lesion pixels (shaded).
        timesteps: (K,) visited timesteps.
        divergence: (N, K) d(t) per slice.
        end_steps: (N,) t_e per slice (a dotted line each).
        shown: indices of the slices whose d(t) is drawn (e.g. those of the overlay).
        title: the figure's title.
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    order = np.argsort(slice_indices, kind="stable")
    z, score = slice_indices[order], health[order]
    for position, unhealthy in zip(z, true_unhealthy[order]):
        if unhealthy:
            left.axvspan(position - 0.5, position + 0.5, color="#f4b6b6", lw=0)
    left.plot(z, score, ".-", color="#333333", lw=1, ms=3, label="health score")
    left.axhline(health_threshold, color=PREDICTION_COLOUR, ls="--", lw=1.2, label=f"threshold {health_threshold:.4g}")
    left.fill_between([], [], color="#f4b6b6", label="true unhealthy slice")
    left.set_xlabel("axial slice z (RAS)")
    left.set_ylabel("health score (above line: unhealthy)")
    left.legend(fontsize=7, loc="best")
    for n, i in enumerate(shown):
        colour = CURVE_COLOURS[n % len(CURVE_COLOURS)]
        right.plot(timesteps, divergence[i], color=colour, lw=1.2, label=f"z = {slice_indices[i]}")
        right.axvline(end_steps[i], color=colour, ls=":", lw=1.2)
    right.plot([], [], color="#555555", ls=":", label="t_e (dotted)")
    right.set_xlabel("timestep t")
    right.set_ylabel("d(t)")
    right.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _png(fig)
