"""How far plain intensity thresholding gets on the phantom (the oracle threshold, tuned on the labels).

For a fresh phantom cohort of each layout, preprocess every case exactly as the pipeline does and
find the single intensity threshold (either direction) that maximises pooled pixel DICE over the
brain pixels, per map channel and for the mean of the map channels. Real BraTS: the best FLAIR
threshold reaches about 0.74 DICE (Meissen et al. 2021); the phantom should not be easier.

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
        images, masks = [], []
        for record in records:
            case = preprocess_case(list(record.channels.values()), record.label, image_size=size)
            images.append(case.images)
            masks.append(case.masks)
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
        rows.append({"layout": layout, "channel": name, "oracle_dice": result.dice, "threshold": result.threshold,
                     "direction": result.direction, "cases": cases, "slices": len(images), "size": size})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--layouts", default="brats,atlas")
    parser.add_argument("--out", default="benchmarks/results/phantom_oracle.json")
    args = parser.parse_args()
    rows = [r for layout in args.layouts.split(",") for r in oracle_rows(layout, args.cases, args.size, args.seed)]
    print_table(rows, ["layout", "channel", "oracle_dice", "threshold", "direction", "cases", "slices", "size"])
    write_json(args.out, {"benchmark": "phantom_oracle", "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
