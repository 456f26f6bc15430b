"""Diagnostic: segmentation quality and health separation against the step budget N (and w).

Runs the forward process once with the largest budget on healthy and unhealthy test slices, keeps
every visited step's sub-anomaly map, and evaluates each smaller budget N from the first visited
steps (as calibration does): unhealthy-setup DICE and pooled AUPRC of the aggregated map (D per
(w, N) taken on these slices, so optimistic for every setting alike), the ROC AUC of the paper's
cosine-similarity health score and of dmax, and where t_e falls. With one budget it is a sweep
over w alone. Pixel labels are used only to score; this is a diagnostic, never an input to the
method. It keeps per-step maps, which the engine (streaming, by design) does not, through the
engine's per-step callback (DDIM only).

    python benchmarks/budget_sweep.py --store /tmp/anofpdm_accuracy/test_store --slices 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

from anofpdm_monai.bundled import resolve_model_dir  # noqa: E402
from anofpdm_monai.data import PreprocessedStore  # noqa: E402
from anofpdm_monai.forward_process import run_forward_process, visited_timesteps  # noqa: E402
from anofpdm_monai.metrics import PooledAUPRC, brain_foreground, dice_iou_per_slice  # noqa: E402
from anofpdm_monai.model import load_calibration  # noqa: E402
from anofpdm_monai.networks import (  # noqa: E402
    NoisePredictor,
    build_scheduler,
    load_model_folder,
    use_bf16,
)
from anofpdm_monai.segmentation import (  # noqa: E402
    anomaly_map,
    dynamic_threshold,
    health_similarity,
    keep_components,
    min_component_area,
)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random unhealthy slice scores above a random healthy one (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size))


def per_step_outputs(predict_eps, x0, abar, grid, steps, stride, channels, generator):
    """DDIM forward process keeping every step's SAMs (G, B, K, M, S, S), through the engine's per-step hook;
    with the engine's d, mse_h, mse_u (G, B, K, M)."""
    sams = []
    result = run_forward_process(predict_eps, x0, abar, guidance_scales=grid, steps=steps, stride=stride,
                                 map_channels=channels, generator=generator,
                                 callback=lambda step: sams.append((step.xh_m - step.x0_m).square()))  # fmt: skip
    return torch.stack(sams, 2), result.divergence, result.mse_h, result.mse_u


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--store", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--slices", type=int, default=32, help="per class (healthy and unhealthy)")
    parser.add_argument("--budgets", default="100,200,300,400,600")
    parser.add_argument("--w-grid", default="1,2,5")
    parser.add_argument("--stride", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", default="benchmarks/results/budget_sweep.json")
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model)
    network, config = load_model_folder(model_dir)
    channels = load_calibration(model_dir, "ddim").map_channel_indices
    predict_eps = NoisePredictor(network, autocast=use_bf16(args.precision, torch.device("cpu")))
    abar = build_scheduler(config.diffusion).alphas_cumprod
    store = PreprocessedStore(args.store)
    rows = store.rows(args.split)
    rows = pd.concat([rows[rows["label"] == y].sample(n=args.slices, random_state=0) for y in (1, 0)])
    images, masks, labels = store.load_slices(rows)
    labels = np.asarray(labels)
    budgets = sorted(int(n) for n in args.budgets.split(","))
    grid = [float(w) for w in args.w_grid.split(",")]
    generator = torch.Generator().manual_seed(0)
    parts = [per_step_outputs(predict_eps, images[s : s + args.batch_size], abar, grid, budgets[-1], args.stride, channels, generator)
             for s in range(0, len(images), args.batch_size)]  # fmt: skip
    sams, d, mse_h, mse_u = (torch.cat(p, dim=1) for p in zip(*parts))
    unhealthy, area = labels == 1, min_component_area(images.shape[-1])
    table = []
    for g, strength in enumerate(grid):
        for budget in budgets:
            k = len(visited_timesteps(budget, args.stride))
            end = d[g, :, :k].argmax(dim=1)  # (B, M)
            dmax = d[g, :, :k].amax(dim=1)
            summed = sams[g, :, :k].cumsum(dim=1)  # (B, K, M, S, S)
            index = end[:, None, :, None, None].expand(-1, 1, -1, *summed.shape[-2:])
            aam = summed.gather(1, index)[:, 0] / (end + 1)[..., None, None]
            maps = anomaly_map(aam)
            _, thr = dynamic_threshold(aam, dmax, dmax[unhealthy].amax(dim=0))
            pred = keep_components(maps >= thr[:, None, None], area + 1, unit="voxels", planar=True)  # the paper's: area <= 40 @ 128 removed
            dice, _ = dice_iou_per_slice(pred[unhealthy], masks[unhealthy])
            pooled = PooledAUPRC()
            pooled.update(maps[unhealthy], masks[unhealthy], brain_foreground(images[unhealthy]))
            sim = health_similarity(mse_h[g, :, :k], mse_u[g, :, :k]).numpy()
            table.append({"w": strength, "N": budget, "unhealthy_dice": float(np.mean(dice)), "unhealthy_auprc": pooled.compute(),
                          "auc_sim": roc_auc(-sim, labels), "auc_dmax": roc_auc(dmax.mean(1).numpy(), labels),
                          "t_e_last_step_fraction": float((end == k - 1).float().mean())})  # fmt: skip
            print_table(table[-1:], list(table[-1]))
    print()
    print_table(table, list(table[0]))
    write_json(args.out, {"benchmark": "budget_sweep", "args": vars(args), "rows": table})


if __name__ == "__main__":
    main()
