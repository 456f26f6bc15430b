"""``anofpdm score``: saved masks against label files on their own grid (nnU-Net's ``evaluate_folder`` analogue)."""

from __future__ import annotations

import argparse

from anofpdm_monai.scoring import score_folder, score_table
from pipelines.options import add_max_voxels_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--predictions", required=True, help="folder of CASE.nii.gz masks (CASE_anomaly.nii.gz maps are ignored)")
    parser.add_argument("-l", "--labels", required=True,
                        help="label files: a cohort in any layout preprocess reads (lesion files), or a folder of CASE.nii.gz")  # fmt: skip
    parser.add_argument("-o", "--output", required=True, help="folder for per_case.csv and summary.json")
    parser.add_argument("--missing-as-empty", action="store_true",
                        help="score a labelled case without a prediction as an empty mask (default: refuse)")  # fmt: skip
    add_max_voxels_argument(parser)


def run(args: argparse.Namespace) -> int:
    per_case, summary = score_folder(args.predictions, args.labels, args.output, args.missing_as_empty)
    print(score_table(per_case, summary), end="")
    print(f"tables: {args.output}/per_case.csv, {args.output}/summary.json")
    return 0
