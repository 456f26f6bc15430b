"""``anofpdm preprocess``: raw NIfTI cohort -> preprocessed store (ALGORITHM.md section 1)."""

from __future__ import annotations

import argparse
from pathlib import Path

from anofpdm_monai.cohorts import PreprocessSettings, preprocess_cohort
from anofpdm_monai.data import assign_splits
from anofpdm_monai.io import InputError
from anofpdm_monai.logs import get_logger
from anofpdm_monai.readers import READERS
from pipelines.options import add_brain_mask_argument, add_max_voxels_argument, cli_message, record_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True, help="raw cohort folder (or manifest CSV)")
    parser.add_argument("-o", "--output", required=True, help="store folder to write")
    parser.add_argument("--dataset", required=True, choices=list(READERS), help="layout of -i (docs/data.md)")
    parser.add_argument("--size", type=int, default=128, help="slice side S (paper 128; tiny preset 64)")
    parser.add_argument("--split", default="0.75,0.05,0.20", help="train,val,test fractions by patient")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    parser.add_argument("--register-to", default=None, help="template NIfTI for affine registration (SimpleITK)")
    parser.add_argument("--map-channels", default=None, help="comma-separated channel names for the anomaly map")
    parser.add_argument(
        "--no-crop",
        action="store_true",
        help="resize the whole axial plane to S x S (the paper's chain) instead of the brain's bounding box padded to a square",
    )
    parser.add_argument("--crop-margin", type=float, default=5.0, help="margin around the brain's bounding box, mm")
    add_brain_mask_argument(parser, "default: the layout's, brats nonzero, atlas template, others nonzero")
    parser.add_argument("--workers", type=int, default=1, help="cases preprocessed in parallel (processes)")
    parser.add_argument("--allow-skips", action="store_true", help="exit 0 even when cases were skipped")
    add_max_voxels_argument(parser)


def run(args: argparse.Namespace) -> int:
    settings = PreprocessSettings(
        dataset=args.dataset, size=args.size, split=_parse_split(args.split), seed=args.seed, register_to=args.register_to,
        map_channels=tuple(args.map_channels.split(",")) if args.map_channels else None, crop=not args.no_crop,
        crop_margin_mm=args.crop_margin, workers=args.workers, brain_mask=args.brain_mask,
    )  # fmt: skip
    outcome = preprocess_cohort(
        args.input, Path(args.output), settings, record=lambda resolved: record_of("preprocess", args, resolved),
        on_skip=lambda case_id, err: get_logger().warning(f"skipped {case_id}: {cli_message(err, add_arguments)}", extra={"bare": True}),
    )  # fmt: skip
    return 1 if outcome.skipped and not args.allow_skips else 0


def _parse_split(text: str) -> tuple[float, float, float]:
    """``--split`` as three fractions, checked before any case is processed."""
    try:
        split = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--split {text!r}: give three fractions train,val,test summing to 1, e.g. 0.75,0.05,0.20") from None
    assign_splits([], split, 0)  # raises a ValueError naming --split when the fractions are wrong
    return split
