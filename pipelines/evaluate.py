"""``anofpdm evaluate``: per-slice and per-case metrics of a test cohort, and the Table-1 summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from anofpdm_monai.evaluation import EvaluationSettings, evaluate_cohort
from anofpdm_monai.logs import get_logger
from anofpdm_monai.methods import all_methods
from anofpdm_monai.model import AnoFPDMModel, InferenceSettings
from anofpdm_monai.tuning import DEFAULT_TUNING_SLICES, parse_tune_options
from pipelines.options import (
    add_batch_size_argument,
    add_brain_mask_argument,
    add_device_arguments,
    add_max_voxels_argument,
    add_parts_arguments,
    cli_message,
    record_of,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", required=True, help="trained model folder (or 'bundled', 'bundled-atlas')")
    parser.add_argument("-i", "--input", required=True, help="preprocessed store or raw cohort folder")
    parser.add_argument("-o", "--output", required=True, dest="results_dir", metavar="OUTPUT", help="results folder")
    parser.add_argument("--split", default="test", help="store split to evaluate (stores only)")
    parser.add_argument(
        "--methods", default=None,
        help=f"comma-separated methods of {', '.join(all_methods())}, or all (every one; those the model folder "
        "cannot run are skipped with one line naming what they need) (default: every AnoFPDM method the model folder can run "
        "and the oracle threshold; the reconstruction baselines run when named)",
    )  # fmt: skip
    parser.add_argument("--max-slices", type=int, default=None, help="evaluate a seeded subset of this many slices")
    parser.add_argument("--steps", type=int, default=None, help="forward-step budget N (default: each calibration's)")
    parser.add_argument("--stride", type=int, default=None, help="stride k (default: each calibration's)")
    add_batch_size_argument(parser)
    parser.add_argument(
        "--tune", action="append", default=[], metavar="METHOD.PARAM=V1,V2",
        help="candidates of a pixel-label baseline's hyperparameter, replacing its default grid (e.g. ddib.depth=200,400); repeatable",
    )  # fmt: skip
    parser.add_argument("--tune-slices", type=int, default=DEFAULT_TUNING_SLICES, help="validation slices the pixel-label baselines are tuned on")
    parser.add_argument("--val-data", default=None, help="store whose val split tunes the pixel-label baselines (default: -i's, for a store)")
    add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the forward process and of the --max-slices sample")
    parser.add_argument(
        "--continue", dest="resume", action="store_true",
        help="skip cases finished by an earlier run into -o; refused if that run used another model or settings (run.json)",
    )  # fmt: skip
    add_parts_arguments(parser, "evaluates")
    parser.add_argument("--report", action="store_true", help="also write the cohort report RESULTS/report/index.html (as 'anofpdm report')")
    add_brain_mask_argument(parser, "raw cohorts only (a store was masked when preprocessed); default: the model folder's")
    add_max_voxels_argument(parser)


def run(args: argparse.Namespace) -> int:
    results = Path(args.results_dir)
    model = AnoFPDMModel.from_folder(args.model, args.device)
    settings = InferenceSettings(steps=args.steps, stride=args.stride, batch_size=args.batch_size or model.default_batch_size(),
                                 seed=args.seed, precision=args.precision, brain_mask=args.brain_mask)  # fmt: skip
    methods = None if args.methods is None else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    evaluation = EvaluationSettings(
        methods=methods, split=args.split, max_slices=args.max_slices, val_data=args.val_data, tune=parse_tune_options(args.tune),
        tune_slices=args.tune_slices, resume=args.resume, num_parts=args.num_parts, part_id=args.part_id, parts_from=args.parts_from,
        report=args.report,
    )  # fmt: skip
    log = get_logger()
    outcome = evaluate_cohort(
        model, args.input, results, settings, evaluation,
        record=lambda resolved: record_of("evaluate", args, resolved, model.folder),
        on_error=lambda case_id, err: log.error(f"{case_id}: {cli_message(err, add_arguments)}"),
    )  # fmt: skip
    if outcome.summary is not None:
        log.info((results / "summary.md").read_text())
        log.info(f"tables: {results / 'slices.csv'}, {results / 'cases.csv'}, {results / 'summary.json'}; this run: {results / 'run.json'}")
    if outcome.failed:
        log.error(f"{len(outcome.failed)} case(s) failed (see above)")
    return 1 if outcome.failed else 0
