"""``anofpdm segment``: patient NIfTI in, mask and anomaly-map NIfTI on the input's own grid out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from anofpdm_monai.bundled import resolve_model_dir
from anofpdm_monai.inferers import ANOFPDM_METHODS, DEFAULT_BATCH_SIZE, VolumeInferer
from anofpdm_monai.io import InputError
from anofpdm_monai.readers import CaseRecord, records_for_inference
from pipelines.options import add_device_arguments, add_max_voxels_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", required=True, help="trained model folder (or 'bundled')")
    parser.add_argument("-i", "--input", required=True, nargs="+", help="case folder(s), NIfTI file(s), a cohort folder or a manifest CSV")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--method", default="anofpdm-ddim", choices=sorted(ANOFPDM_METHODS))
    parser.add_argument("--steps", type=int, default=None, help="forward-step budget N (default: calibrated)")
    parser.add_argument("--stride", type=int, default=None, help="stride k (default: calibrated)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="slices per forward process (2 x this per network call); bounds memory")
    add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-png", action="store_true", help="also write CASE.png overlays")
    parser.add_argument("--keep-3d-components", type=int, default=0, metavar="MIN_VOXELS",
                        help="drop 3-D lesion components smaller than this many voxels")
    parser.add_argument("--continue", dest="resume", action="store_true", help="skip cases whose mask already exists")
    add_max_voxels_argument(parser)


def model_order(record: CaseRecord, names: tuple[str, ...]) -> list[Path]:
    """The case's channel files in the model's channel order when they carry its channel names (e.g. a manifest's
    columns in another order); else in the order given."""
    if set(record.channels) == set(names):
        return [record.channels[name] for name in names]
    return list(record.channels.values())


def run(args: argparse.Namespace) -> int:
    records = records_for_inference(args.input)
    out_dir = Path(args.output)
    inferer = VolumeInferer(
        resolve_model_dir(args.model),
        method=args.method,
        steps=args.steps,
        stride=args.stride,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        precision=args.precision,
        keep_3d_components=args.keep_3d_components,
    )
    try:  # after the model folder was checked: a refused model leaves no output folder behind
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{out_dir}: cannot create the output folder ({err.strerror}); choose a writable -o") from err
    failed = 0
    for record in tqdm(records, desc="segment", unit="case", disable=len(records) < 2):
        if args.resume and (out_dir / f"{record.case_id}.nii.gz").is_file():
            tqdm.write(f"{record.case_id}: done already, skipped (--continue)")
            continue
        try:
            result = inferer(model_order(record, inferer.config.preprocess.channel_names), case_id=record.case_id)
            inferer.write(result, out_dir, record.case_id, save_png=args.save_png)
        except InputError as err:
            failed += 1
            tqdm.write(f"anofpdm segment: error: {record.case_id}: {err}", file=sys.stderr)
            continue
        except OSError as err:  # reading errors are InputErrors: this is writing the outputs
            failed += 1
            target = err.filename2 or err.filename or out_dir
            tqdm.write(
                f"anofpdm segment: error: {record.case_id}: cannot write {target} ({err.strerror or err}); "
                f"make sure -o {out_dir} is writable, has free space and holds no folder of that name",
                file=sys.stderr,
            )
            continue
        unhealthy = int(result.slices.predicted_unhealthy.sum())
        tqdm.write(
            f"{record.case_id}: {unhealthy}/{len(result.slices.sim)} slices unhealthy, lesion {result.lesion_ml:.1f} ml, "
            f"{result.seconds:.1f} s -> {out_dir / (record.case_id + '.nii.gz')}"
        )
    if failed:
        print(f"anofpdm segment: {failed} of {len(records)} cases failed (see above)", file=sys.stderr)
    return 1 if failed else 0
