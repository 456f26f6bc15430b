"""``anofpdm segment``: patient NIfTI in, mask and anomaly-map NIfTI on the input's own grid out."""

from __future__ import annotations

import argparse
from pathlib import Path

from anofpdm_monai.api import CaseOutcome, segment_cohort
from anofpdm_monai.inferers import SAVE_ANOMALY
from anofpdm_monai.logs import get_logger
from anofpdm_monai.methods import anofpdm_methods
from anofpdm_monai.model import AnoFPDMModel, InferenceSettings, default_method
from anofpdm_monai.provenance import RUN_RECORD
from pipelines.options import (
    add_batch_size_argument,
    add_brain_mask_argument,
    add_device_arguments,
    add_max_voxels_argument,
    add_parts_arguments,
    cli_message,
    record_of,
)

log = get_logger()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", required=True, help="trained model folder, or 'bundled'")
    parser.add_argument("-i", "--input", required=True, nargs="+", help="case folder(s), NIfTI file(s), a cohort folder or a manifest CSV")
    parser.add_argument("-o", "--output", dest="output_dir", required=True, help="output folder")
    parser.add_argument("--method", default=None, choices=sorted(anofpdm_methods()),
                        help="decision method (docs/segment.md); default: anofpdm-ddim-volume where the model's calibration has "
                             "the volume family, else the paper's anofpdm-ddim")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="forward-step budget N (default: calibrated)")
    parser.add_argument("--stride", type=int, default=None, help="stride k (default: calibrated)")
    add_batch_size_argument(parser)
    add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="with the case id and slice index, seeds each slice's noise")
    parser.add_argument("--save-png", action="store_true", help="also write CASE.png overlays")
    parser.add_argument("--save-anomaly", default="masked", choices=SAVE_ANOMALY,
                        help="CASE_anomaly.nii.gz: zero outside the brain (masked, ~4x smaller), full, or none")
    parser.add_argument("--keep-3d-components", type=int, default=0, metavar="MIN_VOXELS",
                        help="drop 3-D lesion components smaller than this many voxels (0: keep all)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network: its first call compiles (minutes on a CPU); for cohorts where it was measured faster (docs/segment.md)")
    parser.add_argument("--continue", dest="resume", action="store_true", help="skip cases finished with the same settings (mask and CASE.json); refused if one was made with others")
    parser.add_argument("--num-workers", type=int, default=None, metavar="N",
                        help="processes that load cases ahead (and as many that write them) while the network runs; 0: load "
                             "and write between cases; default: up to 3 on a GPU, 0 on a CPU")  # fmt: skip
    add_parts_arguments(parser, "segments")
    add_brain_mask_argument(parser, "default: the model folder's (its config.json preprocess.brain_mask)")
    add_max_voxels_argument(parser)


def run(args: argparse.Namespace) -> int:
    model = AnoFPDMModel.from_folder(args.model, args.device)
    settings = InferenceSettings(
        method=args.method or default_method(model.folder), steps=args.steps, stride=args.stride,
        batch_size=args.batch_size or model.default_batch_size(), seed=args.seed, precision=args.precision,
        keep_3d_components=args.keep_3d_components, brain_mask=args.brain_mask, compile=args.compile,
    )  # fmt: skip
    out_dir = Path(args.output_dir)

    def report(outcome: CaseOutcome) -> None:
        if outcome.skipped:
            log.info(f"{outcome.case_id}: done already, skipped (--continue)")
        elif outcome.error is not None:
            log.error(f"{outcome.case_id}: {cli_message(outcome.error, add_arguments)}")
        else:
            log.info(f"{outcome.case_id}: {outcome.summary} -> {out_dir / (outcome.case_id + '.nii.gz')}")

    done = segment_cohort(
        model, args.input, out_dir, settings, save_png=args.save_png, save_anomaly=args.save_anomaly, resume=args.resume,
        num_parts=args.num_parts, part_id=args.part_id, parts_from=args.parts_from, num_workers=args.num_workers,
        record=lambda resolved: record_of("segment", args, resolved, model.folder), on_outcome=report,
    )  # fmt: skip
    if done.merged and done.part[1] > 1:
        log.info(f"every part of {done.part[1]} has finished: {out_dir / RUN_RECORD}")
    if done.failed:
        log.error(f"anofpdm segment: {len(done.failed)} of {len(done.cases)} cases failed (see above)", extra={"bare": True})
    return 1 if done.failed else 0
