"""``anofpdm report``: the cohort report of an ``evaluate`` results folder, ``RESULTS/report/index.html``."""

from __future__ import annotations

import argparse

from anofpdm_monai.report import write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="results folder written by 'anofpdm evaluate -o RESULTS'")
    parser.add_argument("-m", "--model", default=None,
                        help="model folder (or 'bundled') whose calibration plot to show (default: the one RESULTS/run.json records, if any)")  # fmt: skip
    parser.add_argument("--method", default=None,
                        help="method of the per-case overlays and curves (default: the first AnoFPDM method of the summary)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    path = write_report(args.results, model_dir=args.model, method=args.method)
    print(f"report: {path} (open it in a browser)")
    return 0
