"""``anofpdm score``: saved masks against label files on their own grid (nnU-Net's ``evaluate_folder`` analogue)."""

from __future__ import annotations

import argparse
from pathlib import Path

from anofpdm_monai.scoring import CONVENTIONS, score_folder, score_table
from pipelines.options import add_max_voxels_argument, record_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--predictions", required=True, help="folder of CASE.nii.gz masks (CASE_anomaly.nii.gz maps are ignored)")
    parser.add_argument("-l", "--labels", required=True,
                        help="label files: a cohort in any layout preprocess reads (lesion files), or a folder of CASE.nii.gz")  # fmt: skip
    parser.add_argument("-o", "--output", required=True, help="folder for per_case.csv, summary.json and run.json")
    parser.add_argument("--missing-as-empty", action="store_true",
                        help="score a labelled case without a prediction as an empty mask (default: refuse)")  # fmt: skip
    parser.add_argument("--convention", default="default", choices=list(CONVENTIONS),
                        help="whose rules score the cases: matching, HD95, empty masks, size filter, cohort F1 (docs/score.md)")  # fmt: skip
    parser.add_argument("--label-sets", nargs="+", default=None, metavar="SET",
                        help="regions to score, each NAME=1,2,4 or 1,2,4 (e.g. WT=1,2,3 TC=1,3 ET=3); default: every voxel > 0")  # fmt: skip
    add_max_voxels_argument(parser)


def run(args: argparse.Namespace) -> int:
    resolved = {"predictions": Path(args.predictions).resolve(), "labels": Path(args.labels).resolve(), "output": Path(args.output).resolve()}
    per_case, summary = score_folder(
        args.predictions, args.labels, args.output, args.missing_as_empty, args.convention, args.label_sets,
        run_record=record_of("score", args, resolved),
    )  # fmt: skip
    print(score_table(per_case, summary), end="")
    print(f"tables: {args.output}/per_case.csv, {args.output}/summary.json")
    return 0
