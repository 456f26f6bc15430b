"""``anofpdm evaluate``: per-slice and per-case metrics of a test cohort, and the Table-1 summary."""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
from tqdm import tqdm

from anofpdm_monai.bundled import resolve_model_dir
from anofpdm_monai.evaluation import (
    ALL_METHODS,
    Cohort,
    CohortEvaluator,
    merge_results,
    select_slices,
    supported_methods,
    tune_ddib_threshold,
)
from anofpdm_monai.inferers import VolumeInferer
from anofpdm_monai.io import InputError, atomic_write_text
from anofpdm_monai.logs import get_logger, log_to_file
from anofpdm_monai.outputs import case_record, finished, lock_folder
from anofpdm_monai.provenance import check_continuation, inference_settings, write_run_record
from anofpdm_monai.model import DEFAULT_BATCH_SIZE
from pipelines.options import add_device_arguments, add_max_voxels_argument, record_of, cli_message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", required=True, help="trained model folder (or 'bundled', 'bundled-atlas')")
    parser.add_argument("-i", "--input", required=True, help="preprocessed store or raw cohort folder")
    parser.add_argument("-o", "--output", required=True, help="results folder")
    parser.add_argument("--split", default="test", help="store split to evaluate (stores only)")
    parser.add_argument(
        "--methods", default=None,
        help=f"comma-separated methods of {', '.join(ALL_METHODS)} (default: every one the model is calibrated for)",
    )  # fmt: skip
    parser.add_argument("--max-slices", type=int, default=None, help="evaluate a seeded subset of this many slices")
    parser.add_argument("--steps", type=int, default=None, help="forward-step budget N (default: each calibration's)")
    parser.add_argument("--stride", type=int, default=None, help="stride k (default: each calibration's)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="slices per forward process (2 x this per network call); bounds memory")
    parser.add_argument("--ddib-depth", type=int, default=400, help="encoding depth of the ddib baseline")
    parser.add_argument("--val-data", default=None, help="store whose val split tunes the ddib threshold")
    add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the forward process and of the --max-slices sample")
    parser.add_argument(
        "--continue", dest="resume", action="store_true",
        help="skip cases finished by an earlier run into -o; refused if that run used another model or settings (run.json)",
    )  # fmt: skip
    parser.add_argument("--num-parts", type=int, default=1, help="split the cohort into parts (nnU-Net style)")
    parser.add_argument("--part-id", type=int, default=0, help="which part this process evaluates, 0 .. --num-parts - 1")
    parser.add_argument("--report", action="store_true", help="also write the cohort report RESULTS/report/index.html (as 'anofpdm report')")
    add_max_voxels_argument(parser)


def run(args: argparse.Namespace) -> int:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    num_parts, part_id = (world, rank) if world > 1 else (args.num_parts, args.part_id)
    if not 0 <= part_id < num_parts:
        raise ValueError(f"--part-id {part_id} must lie in [0, --num-parts {num_parts})")
    model_dir = resolve_model_dir(args.model)
    methods = supported_methods(model_dir) if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    results = Path(args.output)
    log = get_logger()
    if world > 1 and args.device != "cpu":
        import torch

        if torch.cuda.is_available():  # one GPU per torchrun process: without this every rank runs on cuda:0
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    inferer = VolumeInferer(
        model_dir, steps=args.steps, stride=args.stride, batch_size=args.batch_size,
        device=args.device, seed=args.seed, precision=args.precision,
    )  # fmt: skip
    cohort = Cohort(args.input, inferer, args.split)
    evaluator = CohortEvaluator(inferer, methods, results, ddib_depth=args.ddib_depth)
    try:  # once the model and the input were checked: a refused run leaves no results folder behind
        (results / "cases").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{results}: cannot create the results folder ({err.strerror}); choose a writable -o") from err
    lock_folder(results, "evaluate", (part_id, num_parts))
    log_to_file(results, "evaluate")
    record = record_of("evaluate", args, resolved_settings(args, evaluator, methods), inferer.model_dir)
    if args.resume and any((results / "cases").glob("*.npz")):
        check_continuation(results, record, CONTINUATION_KEYS)  # finished cases are reused only from the same run
        for case_id in cohort.case_ids:  # and each only if it was made with these settings (cases/CASE.json)
            finished(case_record_path(evaluator, case_id), record, CONTINUATION_KEYS, evaluator.case_file(case_id))
    if rank == 0:
        write_run_record(results, record)
    if "ddib" in methods:
        evaluator.ddib_threshold = ddib_threshold(evaluator, cohort, args, results)
    keep = slice_subset(cohort, args.max_slices, args.seed)
    # cases that --max-slices leaves without a slice are not part of the run (they would never get a file)
    expected = [c for c in cohort.case_ids if keep is None or len(keep.get(c, ())) > 0]
    mine = expected[part_id::num_parts]
    failed = 0
    for case_id in tqdm(mine, desc=f"evaluate {part_id + 1}/{num_parts}" if num_parts > 1 else "evaluate", unit="case"):
        if args.resume and finished(case_record_path(evaluator, case_id), record, CONTINUATION_KEYS, evaluator.case_file(case_id)):
            continue
        try:
            case = select_slices(cohort.load(case_id), None if keep is None else keep[case_id])
            if len(case.slice_indices) == 0:
                continue
            with case_record(case_record_path(evaluator, case_id), record):  # cases/CASE.json: the settings, written last
                evaluator.evaluate_case(case)
        except (InputError, OSError) as err:
            failed += 1
            log.error(f"{case_id}: {cli_message(err, add_arguments)}")
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            # the ranks meet only once all their cases are done: allow for very uneven parts (default: 30 min)
            dist.init_process_group("gloo", timeout=timedelta(hours=24))
        dist.barrier()
        if rank != 0:
            return 1 if failed else 0
    done = [c for c in expected if evaluator.case_file(c).is_file()]
    if len(done) < len(expected) - failed and world == 1 and num_parts > 1:
        log.info(f"{len(done)} of {len(expected)} cases done; the summary is written when every part has finished")
        return 1 if failed else 0
    if not done:
        raise InputError(f"{args.input}: no case could be evaluated")
    merge_results(results, done, methods)
    log.info((results / "summary.md").read_text())
    log.info(f"tables: {results / 'slices.csv'}, {results / 'cases.csv'}, {results / 'summary.json'}; this run: {results / 'run.json'}")
    if args.report:
        from anofpdm_monai.report import write_report

        log.info(f"report: {write_report(results, model_dir=model_dir)}")
    if failed:
        log.error(f"{failed} case(s) failed (see above)")
    return 1 if failed else 0


# Settings that change a case's file (cases/<id>.npz); --continue reuses files only when these and the model match.
CONTINUATION_KEYS = ("input", "split", "methods", "max_slices", "seed", "steps", "stride", "precision", "calibrations",
                     "ddib_depth", "val_data")  # fmt: skip


def case_record_path(evaluator: CohortEvaluator, case_id: str) -> Path:
    """``RESULTS/cases/CASE.json``: the settings a finished case was made with (beside its ``CASE.npz``)."""
    return evaluator.case_file(case_id).with_suffix(".json")


def resolved_settings(args: argparse.Namespace, evaluator: CohortEvaluator, methods: list[str]) -> dict:
    """What the flags resolved to, for run.json: paths, methods, device, precision, each encoding's N, k, w, thr_01, D."""
    calibrations = {encoding: inference_settings(inferer) for encoding, inferer in evaluator.slice_inferers.items()}
    precisions = {c["precision"] for c in calibrations.values()} or {inference_settings(evaluator.inferer.slice_inferer)["precision"]}
    return {
        "input": Path(args.input).resolve(), "model": evaluator.inferer.model_dir, "methods": list(methods),
        "device": str(evaluator.inferer.device), "precision": precisions.pop(), "calibrations": calibrations,
        "val_data": None if args.val_data is None else Path(args.val_data).resolve(),
    }  # fmt: skip


def slice_subset(cohort: Cohort, max_slices: int | None, seed: int) -> dict[str, np.ndarray] | None:
    """A fixed, seeded subset of at most ``max_slices`` slices over the cohort (stores only)."""
    if max_slices is None:
        return None
    if cohort.store is None:
        raise InputError("--max-slices needs a preprocessed store as -i (raw cohorts are evaluated whole)")
    rows = cohort.rows
    if len(rows) > max_slices:
        rows = rows.sample(n=max_slices, random_state=seed)
    return {p: g["slice"].to_numpy() for p, g in rows.groupby("patient")}


def ddib_settings(evaluator: CohortEvaluator, source: str | Path) -> dict:
    """What the tuned ddib threshold depends on: the weights, the calibrated w and stride, the depth, the tuning data."""
    calibration = evaluator.model.calibration("ddim")
    return {"model_sha256": evaluator.model.sha256, "w": calibration.w, "stride": evaluator.settings.stride or calibration.stride,
            "depth": evaluator.ddib_depth, "tuned_on": str(source)}  # fmt: skip


def ddib_threshold(evaluator: CohortEvaluator, cohort: Cohort, args: argparse.Namespace, results: Path) -> float | None:
    """Tune the ddib baseline's threshold on validation pixel labels, cached in RESULTS/ddib.json.

    The cache is reused only if it was tuned with the same weights, w, stride, depth and data;
    otherwise (e.g. a retrained model evaluated into the same folder) the threshold is tuned again.
    """
    from anofpdm_monai.data import PreprocessedStore

    source = args.val_data or (args.input if cohort.store is not None else None)
    if source is None:
        get_logger().warning("ddib skipped: give --val-data PREP to tune its threshold")
        return None
    cache = results / "ddib.json"
    settings = ddib_settings(evaluator, source)
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("settings") == settings:
            return float(cached["threshold"])
        get_logger().warning(f"{cache}: tuned for another model or setting; tuning the ddib threshold again")
    threshold = tune_ddib_threshold(evaluator, PreprocessedStore(source), max_slices=200, seed=args.seed)
    record = {"threshold": threshold, "tuned_on": str(source), "uses_pixel_labels": True, "settings": settings}
    atomic_write_text(cache, json.dumps(record) + "\n")
    return threshold
