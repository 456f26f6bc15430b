"""``anofpdm calibrate``: choose w*, thr_01, D (and N if several are given) on validation slices (image-level labels only)."""

from __future__ import annotations

import argparse

from anofpdm_monai.cohorts import CalibrationSettings, calibrate_model
from anofpdm_monai.forward_process import ENCODINGS
from anofpdm_monai.methods import DEFAULT_FP_RATE
from anofpdm_monai.model import DEFAULT_BATCH_SIZE, AnoFPDMModel
from pipelines.options import add_device_arguments, record_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", required=True, help="trained model folder")
    parser.add_argument("-d", "--data", required=True, help="preprocessed store with a val split")
    parser.add_argument("--w-grid", default="0.5,1,1.5,2,3,5", help="candidate guidance strengths")
    parser.add_argument("--n-val", type=int, default=1000, help="validation slices (seeded sample)")
    parser.add_argument(
        "--steps", default="600",
        help="forward-step budget N (paper: 600), or several, e.g. 100,200,300,400,600, to select N too (one run)",
    )  # fmt: skip
    parser.add_argument("--stride", type=int, default=1, help="visit every k-th step (fast mode: k > 1)")
    parser.add_argument("--encoding", choices=ENCODINGS, default=ENCODINGS[0], help="forward-process encoding to calibrate (ddpm: calibration_ddpm.json)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="slices per forward process (2 x this per network call); bounds memory")
    parser.add_argument(
        "--volume-cases", dest="section_cases", metavar="VOLUME_CASES", type=int, default=4,
        help="whole validation patients that calibrate the decision families' sections (the volume family, anofpdm-*-volume) at the selected N, k, w; 0: none",
    )  # fmt: skip
    parser.add_argument(
        "--volume-only", dest="sections_only", action="store_true",
        help="keep the existing calibration of --encoding and (re)calibrate only its sections (the volume family)",
    )  # fmt: skip
    parser.add_argument(
        "--fp-rate", type=float, default=DEFAULT_FP_RATE,
        help="false-positive components per 100 ml of healthy brain the volume family's minimum lesion size may leave on the "
             "healthy validation slices (the Neyman-Pearson size rule)",
    )  # fmt: skip
    add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation sample and the forward process")


def run(args: argparse.Namespace) -> int:
    try:
        w_grid = [float(w) for w in args.w_grid.split(",") if w.strip()]
    except ValueError as err:
        raise ValueError(f"--w-grid {args.w_grid!r}: give comma-separated numbers, e.g. 0.5,1,2") from err
    try:
        steps = [int(n) for n in args.steps.split(",") if n.strip()]
    except ValueError as err:
        raise ValueError(f"--steps {args.steps!r}: give one or more comma-separated integers, e.g. 600 or 200,400,600") from err
    model = AnoFPDMModel.from_folder(args.model, args.device)
    settings = CalibrationSettings(
        w_grid=w_grid, n_val=args.n_val, steps=steps, stride=args.stride, encoding=args.encoding, batch_size=args.batch_size,
        section_cases=args.section_cases, sections_only=args.sections_only, seed=args.seed, precision=args.precision,
        fp_rate=args.fp_rate,
    )  # fmt: skip
    calibrate_model(model, args.data, settings, record=lambda resolved: record_of("calibrate", args, resolved, model.folder))
    return 0
