"""How far plain intensity thresholding gets on the phantom (the oracle threshold, tuned on the labels).

For a fresh phantom cohort of each layout, find the single intensity threshold (either direction)
that maximises pooled DICE over the brain voxels, per map channel and for the mean of the map
channels, on two views of the data:

* ``volume``: the raw 3-D volumes divided by their 99th brain percentile (as Meissen et al. 2021
  did on real BraTS, where the best FLAIR threshold reaches about 0.74 DICE);
* ``slices``: the pipeline's own input (preprocessed slices, per-slice min-max to [-1, 1]); this is
  what the ``threshold`` baseline of ``anofpdm evaluate`` sees.

The phantom should not be easier than real BraTS: both figures should stay at or below about 0.74.

    python benchmarks/phantom_oracle.py --cases 8 --size 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

from anofpdm_monai.baselines import best_threshold_dice  # noqa: E402
from anofpdm_monai.metrics import brain_foreground  # noqa: E402
from anofpdm_monai.transforms import preprocess_case  # noqa: E402
from data_prep.phantom import generate_cohort  # noqa: E402
from data_prep.readers import DEFAULT_MAP_CHANNELS, read_cases  # noqa: E402


def oracle_rows(layout: str, cases: int, size: int, seed: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        generate_cohort(tmp, layout, cases, healthy_fraction=0.0, seed=seed, progress=False)
        records = read_cases(tmp, layout)
        images, masks, volumes, volume_masks = [], [], [], []
        for record in records:
            case = preprocess_case(list(record.channels.values()), record.label, image_size=size)
            images.append(case.images)
            masks.append(case.masks)
            volume, lesion = volume_view(record)
            volumes.append(volume)
            volume_masks.append(lesion)
    images, masks = torch.cat(images), torch.cat(masks)
    fg = brain_foreground(images)
    names = list(records[0].channels)
    map_channels = DEFAULT_MAP_CHANNELS[layout]
    candidates = {name: images[:, names.index(name)] for name in map_channels}
    if len(map_channels) > 1:
        candidates["mean(" + "+".join(map_channels) + ")"] = images[:, [names.index(n) for n in map_channels]].mean(1)
    rows = []
    for name, values in candidates.items():
        result = best_threshold_dice(values[fg].numpy(), masks[fg].numpy(), direction="best")
        rows.append({"layout": layout, "view": "slices", "channel": name, "oracle_dice": result.dice,
                     "threshold": result.threshold, "direction": result.direction, "cases": cases})  # fmt: skip
    lesion = np.concatenate(volume_masks)
    per_channel = {n: np.concatenate([v[n] for v in volumes]) for n in map_channels}
    if len(map_channels) > 1:
        per_channel["mean(" + "+".join(map_channels) + ")"] = np.mean([per_channel[n] for n in map_channels], axis=0)
    for name, values in per_channel.items():
        result = best_threshold_dice(values, lesion, direction="best")
        rows.append({"layout": layout, "view": "volume", "channel": name, "oracle_dice": result.dice,
                     "threshold": result.threshold, "direction": result.direction, "cases": cases})  # fmt: skip
    return rows


def volume_view(record) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Brain voxels of each map channel divided by its 99th brain percentile, and the lesion labels."""
    import nibabel as nib

    arrays = {n: np.asarray(nib.load(str(p)).dataobj, dtype=np.float32) for n, p in record.channels.items()}
    brain = np.any([a > 0 for a in arrays.values()], axis=0)
    scaled = {n: a[brain] / np.percentile(a[brain], 99) for n, a in arrays.items()}
    return scaled, np.asarray(nib.load(str(record.label)).dataobj)[brain] > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--layouts", default="brats,atlas")
    parser.add_argument("--out", default="benchmarks/results/phantom_oracle.json")
    args = parser.parse_args()
    rows = [r for layout in args.layouts.split(",") for r in oracle_rows(layout, args.cases, args.size, args.seed)]
    print_table(rows, ["layout", "view", "channel", "oracle_dice", "threshold", "direction", "cases"])
    write_json(args.out, {"benchmark": "phantom_oracle", "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
