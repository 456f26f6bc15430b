"""``anofpdm export-bundle``: a trained model folder -> a MONAI bundle (``python -m monai.bundle run`` segments with it)."""

from __future__ import annotations

import argparse

from anofpdm_monai.bundle import export_bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", required=True, help="trained, calibrated model folder (or 'bundled')")
    parser.add_argument("-o", "--output", required=True, help="bundle folder to create (must not exist, or be empty)")
    parser.add_argument("--data-source", default=None, metavar="TEXT",
                        help="what the model was trained on, for metadata.json (default: the phantom cohort for the "
                             "bundled models, else 'not recorded')")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    bundle = export_bundle(args.model, args.output, data_source=args.data_source)
    print(f"bundle written: {bundle}")
    print(f"run it: python -m monai.bundle run --config_file {bundle}/configs/inference.json --bundle_root {bundle} "
          f"--dataset_dir CASES --output_dir OUT")  # fmt: skip
    return 0
