"""``anofpdm segment``: patient NIfTI in, mask and anomaly-map NIfTI on the input's own grid out."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from anofpdm_monai.api import finished_cases, resolve_parts, segment_records, shard
from anofpdm_monai.inferers import SAVE_ANOMALY, VolumeInferer
from anofpdm_monai.io import InputError, part_file_name
from anofpdm_monai.logs import get_logger, log_to_file
from anofpdm_monai.methods import anofpdm_methods
from anofpdm_monai.model import DEFAULT_BATCH_SIZE, InferenceSettings, default_method
from anofpdm_monai.outputs import SEGMENT_SETTINGS, check_segment_outputs, continuation_record, finish_part, lock_folder, start_part
from anofpdm_monai.provenance import RUN_RECORD, check_continuation, inference_settings
from anofpdm_monai.readers import records_for_inference
from pipelines.options import (
    add_brain_mask_argument,
    add_device_arguments,
    add_max_voxels_argument,
    add_parts_arguments,
    cli_message,
    record_of,
)

log = get_logger()
# the settings that change what segment writes (--continue refuses to mix outputs made with others)
OUTPUT_SETTINGS = SEGMENT_SETTINGS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", required=True, help="trained model folder, or 'bundled'")
    parser.add_argument("-i", "--input", required=True, nargs="+", help="case folder(s), NIfTI file(s), a cohort folder or a manifest CSV")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--method", default=None, choices=sorted(anofpdm_methods()),
                        help="decision method (docs/segment.md); default: anofpdm-ddim-volume where the model's calibration has "
                             "the volume family, else the paper's anofpdm-ddim")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="forward-step budget N (default: calibrated)")
    parser.add_argument("--stride", type=int, default=None, help="stride k (default: calibrated)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="slices per forward process (2 x this per network call); bounds memory")
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
    add_parts_arguments(parser, "segments")
    add_brain_mask_argument(parser, "default: the model folder's (its config.json preprocess.brain_mask)")
    add_max_voxels_argument(parser)


def run(args: argparse.Namespace) -> int:
    num_parts, part_id = resolve_parts(args.num_parts, args.part_id, parts_from=args.parts_from)
    part = (part_id, num_parts)
    records = shard(records_for_inference(args.input), num_parts, part_id)
    out_dir = Path(args.output)
    settings = InferenceSettings(
        method=args.method or default_method(args.model), steps=args.steps, stride=args.stride, batch_size=args.batch_size, seed=args.seed,
        precision=args.precision, keep_3d_components=args.keep_3d_components, brain_mask=args.brain_mask,
        compile=args.compile,
    )  # fmt: skip
    inferer = VolumeInferer(args.model, settings, device=args.device)
    resolved = {**settings.to_dict(), **inference_settings(inferer.slice_inferer), "device": str(inferer.device),
                "brain_mask": inferer.preprocess_config.brain_mask,
                "num_parts": num_parts, "part_id": part_id}  # fmt: skip
    record = record_of("segment", args, resolved, inferer.model_dir)
    if args.resume and any(out_dir.glob("*.nii.gz")):
        check_continuation(out_dir, record, OUTPUT_SETTINGS, continuation_record(out_dir, part))
    check_segment_outputs(records, out_dir, tuple(dict.fromkeys((RUN_RECORD, part_file_name(RUN_RECORD, part), part_file_name("segment.log", part)))))
    if args.resume:  # a case finished with other settings is refused before anything is written
        finished_cases(inferer, records, out_dir, args.save_anomaly)
    try:  # after the model folder was checked: a refused model leaves no output folder behind
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{out_dir}: cannot create the output folder ({err.strerror}); choose a writable -o") from err
    lock_folder(out_dir, "segment", part)
    log_to_file(out_dir, "segment", part)
    start_part(out_dir, record, part, OUTPUT_SETTINGS)  # run.json, or run.part-K-of-N.json for one part
    outcomes = segment_records(
        inferer, records, out_dir, save_png=args.save_png, save_anomaly=args.save_anomaly, skip_done=args.resume,
        keep_results=False, progress=True,
    )  # fmt: skip
    failed = 0
    desc = f"segment {part_id + 1}/{num_parts}" if num_parts > 1 else "segment"
    for outcome in tqdm(outcomes, total=len(records), desc=desc, unit="case", disable=len(records) < 2):
        if outcome.skipped:
            log.info(f"{outcome.case_id}: done already, skipped (--continue)")
        elif outcome.error is not None:
            failed += 1
            log.error(f"{outcome.case_id}: {cli_message(outcome.error, add_arguments)}")
        else:
            log.info(f"{outcome.case_id}: {outcome.summary} -> {out_dir / (outcome.case_id + '.nii.gz')}")
    if finish_part(out_dir, record, part, counts={"cases": len(records), "failed": failed}) and num_parts > 1:
        log.info(f"every part of {num_parts} has finished: {out_dir / RUN_RECORD}")
    if failed:
        log.error(f"anofpdm segment: {failed} of {len(records)} cases failed (see above)", extra={"bare": True})
    return 1 if failed else 0
