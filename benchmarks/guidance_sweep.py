"""Diagnostic: segmentation quality of the aggregated map against the guidance strength w.

Calibration picks w from image-level labels only; this script shows, WITH pixel labels and on test
slices, what each w of the grid would have given (unhealthy-setup DICE with the calibrated D, and
pooled AUPRC of the map), so a poor calibration choice can be told apart from a poor model. D at
each w is the largest dmax of these slices (calibration's definition, on test slices). It is a
diagnostic, never an input to the method. One forward process serves every w.

    python benchmarks/guidance_sweep.py --store /tmp/anofpdm_accuracy/test_store --slices 48
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

from anofpdm_monai.data import PreprocessedStore  # noqa: E402
from anofpdm_monai.forward_process import run_forward_process  # noqa: E402
from anofpdm_monai.metrics import PooledAUPRC, brain_foreground, dice_iou_per_slice  # noqa: E402
from anofpdm_monai.inferers import load_calibration  # noqa: E402
from anofpdm_monai.networks import NoisePredictor, build_scheduler, load_model_folder  # noqa: E402
from anofpdm_monai.segmentation import segment  # noqa: E402
from pipelines.segment import resolve_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--store", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--slices", type=int, default=48, help="unhealthy slices")
    parser.add_argument("--w-grid", default="0.5,1,2,3,5")
    parser.add_argument("--out", default="benchmarks/results/guidance_sweep.json")
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    network, config = load_model_folder(model_dir)
    calibration = load_calibration(model_dir, "ddim")
    store = PreprocessedStore(args.store)
    rows = store.rows(args.split)
    rows = rows[rows["label"] == 1].sample(n=min(args.slices, int(rows["label"].sum())), random_state=0)
    images, masks, _ = store.load_slices(rows)
    grid = [float(w) for w in args.w_grid.split(",")]
    result = run_forward_process(
        NoisePredictor(network), images, build_scheduler(config.diffusion).alphas_cumprod, guidance_scales=grid,
        steps=calibration.steps, stride=calibration.stride, map_channels=calibration.map_channel_indices,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    fg = brain_foreground(images)
    table = []
    for g, w in enumerate(grid):
        # D as calibration defines it (largest dmax of unhealthy slices), here taken on these slices at this w
        at_w = dataclasses.replace(calibration, w=w, D=result.dmax[g].amax(dim=0).tolist())
        seg = segment(result.select(g), at_w, setup="unhealthy")
        dice, _ = dice_iou_per_slice(seg.masks, masks)
        pooled = PooledAUPRC()
        pooled.update(seg.maps, masks, fg)
        table.append({"w": w, "unhealthy_dice": float(np.mean(dice)), "unhealthy_auprc": pooled.compute(),
                      "calibrated": w == calibration.w, "slices": len(images)})  # fmt: skip
    print_table(table, list(table[0]))
    write_json(args.out, {"benchmark": "guidance_sweep", "args": vars(args), "rows": table})


if __name__ == "__main__":
    main()
