"""How far plain intensity thresholding gets on the phantom (the oracle threshold, tuned on the labels).

For a fresh phantom cohort of each layout and lesion kind (``--lesions``; brats: tumour, ms,
infiltrative and their mix; atlas: stroke), find the single intensity threshold that maximises
pooled DICE over the brain voxels, per map channel and for the mean of the map channels, on two
views of the data. The threshold's direction follows the sequence, as in ``anofpdm evaluate``
(``lesion_polarity``): lesions above the cut on FLAIR and T2, below it on T1w.
The two views:

* ``volume``: the raw 3-D volumes divided by their 99th brain percentile (as Meissen et al. 2021
  did on real BraTS, where the best FLAIR threshold reaches about 0.74 DICE);
* ``slices``: the pipeline's own input (preprocessed slices, per-slice min-max to [-1, 1]; the planes
  cropped to the brain's box + ``--crop-margin`` mm as ``anofpdm preprocess`` does by default, or the
  whole plane with ``--no-crop``); this is what the ``threshold`` baseline of ``anofpdm evaluate`` sees.

The phantom should not be easier than real BraTS: both figures should stay at or below about 0.74.

    python benchmarks/phantom_oracle.py --cases 8 --size 64
    python benchmarks/phantom_oracle.py --layouts brats --lesions ms --cases 4
    python benchmarks/phantom_oracle.py --layouts atlas --lesions stroke,ms,infiltrative --cases 6
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

from anofpdm_monai.baselines import best_threshold_dice, lesion_polarity  # noqa: E402
from anofpdm_monai.metrics import brain_foreground  # noqa: E402
from anofpdm_monai.readers import DEFAULT_MAP_CHANNELS, read_cases  # noqa: E402
from anofpdm_monai.transforms import preprocess_case  # noqa: E402
from data_prep.phantom import LESION_KINDS, generate_cohort, parse_lesions  # noqa: E402


def cohort_views(layout: str, kind: str, cases: int, size: int, seed: int, crop_margin_mm: float | None) -> dict:
    """Slice view (preprocessed slices, masks) and volume view (/p99 brain voxels, labels) of a fresh cohort."""
    with tempfile.TemporaryDirectory() as tmp:
        generate_cohort(tmp, layout, cases, healthy_fraction=0.0, seed=seed, progress=False, lesions=kind)
        records = read_cases(tmp, layout)
        images, masks, volumes, volume_masks = [], [], [], []
        for record in records:
            case = preprocess_case(list(record.channels.values()), record.label, image_size=size,
                                   crop_margin_mm=crop_margin_mm)  # fmt: skip
            images.append(case.images)
            masks.append(case.masks)
            volume, lesion = volume_view(record)
            volumes.append(volume)
            volume_masks.append(lesion)
    return {"images": torch.cat(images), "masks": torch.cat(masks), "volumes": volumes,
            "volume_masks": volume_masks, "names": list(records[0].channels), "cases": cases}  # fmt: skip


def oracle_rows(layout: str, lesions: str, views: list[dict]) -> list[dict]:
    """Oracle threshold DICE per map channel and view, pooled over ``views`` (one or more cohorts)."""
    images = torch.cat([v["images"] for v in views])
    masks = torch.cat([v["masks"] for v in views])
    cases = sum(v["cases"] for v in views)
    names = views[0]["names"]
    fg = brain_foreground(images)
    map_channels = DEFAULT_MAP_CHANNELS[layout]
    candidates = {name: images[:, names.index(name)] for name in map_channels}
    polarity = {name: lesion_polarity([name]) for name in map_channels}
    if len(map_channels) > 1:
        mean = "mean(" + "+".join(map_channels) + ")"
        candidates[mean] = images[:, [names.index(n) for n in map_channels]].mean(1)
        polarity[mean] = lesion_polarity(map_channels)
    rows = []
    for name, values in candidates.items():
        result = best_threshold_dice(values[fg].numpy(), masks[fg].numpy(), direction=polarity[name])
        rows.append({"layout": layout, "lesions": lesions, "view": "slices", "channel": name,
                     "oracle_dice": result.dice, "threshold": result.threshold, "direction": result.direction,
                     "cases": cases})  # fmt: skip
    volumes = [vol for v in views for vol in v["volumes"]]
    lesion = np.concatenate([m for v in views for m in v["volume_masks"]])
    per_channel = {n: np.concatenate([vol[n] for vol in volumes]) for n in map_channels}
    if len(map_channels) > 1:
        per_channel["mean(" + "+".join(map_channels) + ")"] = np.mean([per_channel[n] for n in map_channels], axis=0)
    for name, values in per_channel.items():
        result = best_threshold_dice(values, lesion, direction=polarity[name])
        rows.append({"layout": layout, "lesions": lesions, "view": "volume", "channel": name,
                     "oracle_dice": result.dice, "threshold": result.threshold, "direction": result.direction,
                     "cases": cases})  # fmt: skip
    return rows


def layout_rows(layout: str, lesions: str | None, cases: int, size: int, seed: int,
                crop_margin_mm: float | None = 5.0) -> list[dict]:  # fmt: skip
    """A row set per lesion kind (``cases`` fresh cases each) and, with several kinds, one for their mix.

    The mix pools the per-kind cohorts, i.e. equal shares of each kind, as the default cohort draws them.
    """
    kinds = parse_lesions(layout, lesions)
    views = {kind: cohort_views(layout, kind, cases, size, seed, crop_margin_mm) for kind in kinds}
    rows = [r for kind in kinds for r in oracle_rows(layout, kind, [views[kind]])]
    if len(kinds) > 1:
        rows += oracle_rows(layout, "mix(" + ",".join(kinds) + ")", list(views.values()))
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
    parser.add_argument(
        "--lesions",
        default=None,
        help="comma list of lesion kinds (a row set per kind, plus their mix); default: each layout's default "
        "(brats: tumour,ms,infiltrative; atlas: stroke). Kinds a layout cannot draw are skipped for it.",
    )
    parser.add_argument("--crop-margin", type=float, default=5.0, help="slice view: brain-box margin, mm (as preprocess)")
    parser.add_argument("--no-crop", action="store_true", help="slice view on the whole plane (the paper's chain)")
    parser.add_argument("--out", default="benchmarks/results/phantom_oracle.json")
    args = parser.parse_args()
    rows = []
    for layout in args.layouts.split(","):
        kinds = None
        if args.lesions:
            kinds = [k for k in args.lesions.split(",") if k.strip() in LESION_KINDS[layout]]
            if not kinds:
                continue
        rows += layout_rows(layout, kinds, args.cases, args.size, args.seed, None if args.no_crop else args.crop_margin)
    print_table(rows, ["layout", "lesions", "view", "channel", "oracle_dice", "threshold", "direction", "cases"])
    write_json(args.out, {"benchmark": "phantom_oracle", "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
