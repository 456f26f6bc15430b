"""``anofpdm preprocess``: raw NIfTI cohort -> preprocessed store (ALGORITHM.md section 1)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from anofpdm_monai.config import PreprocessConfig, check_register_to
from anofpdm_monai.data import assign_splits, case_done, input_fingerprint, write_case, write_manifest, write_settings
from anofpdm_monai.io import InputError, InputWarning, atomic_save_dataframe
from anofpdm_monai.logs import get_logger, log_to_file
from anofpdm_monai.outputs import check_store_outputs, lock_folder
from anofpdm_monai.provenance import write_run_record
from anofpdm_monai.readers import DEFAULT_MAP_CHANNELS, LESION_LABELS, CaseRecord, read_cases
from anofpdm_monai.transforms import preprocess_with
from pipelines.options import add_max_voxels_argument, cli_message, record_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True, help="raw cohort folder (or manifest CSV)")
    parser.add_argument("-o", "--output", required=True, help="store folder to write")
    parser.add_argument("--dataset", required=True, choices=["brats", "atlas", "nnunet", "manifest"], help="layout of -i (docs/data.md)")
    parser.add_argument("--size", type=int, default=128, help="slice side S (paper 128; tiny preset 64)")
    parser.add_argument("--split", default="0.75,0.05,0.20", help="train,val,test fractions by patient")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    parser.add_argument("--register-to", default=None, help="template NIfTI for affine registration (SimpleITK)")
    parser.add_argument("--map-channels", default=None, help="comma-separated channel names for the anomaly map")
    parser.add_argument(
        "--no-crop",
        action="store_true",
        help="resize the whole axial plane to S x S (the paper's chain) instead of the brain's bounding box padded to a square",
    )
    parser.add_argument("--crop-margin", type=float, default=5.0, help="margin around the brain's bounding box, mm")
    parser.add_argument("--workers", type=int, default=1, help="cases preprocessed in parallel (processes)")
    parser.add_argument("--allow-skips", action="store_true", help="exit 0 even when cases were skipped")
    add_max_voxels_argument(parser)


def _process(store: Path, record: CaseRecord, config: PreprocessConfig) -> tuple[str, str | None, list[str]]:
    """Preprocess and store one case; return (case id, error line or None, the warnings it raised).

    The warnings are returned, not shown, so that a worker process's ones reach the parent's log as one line each.
    """
    with warnings.catch_warnings(record=True) as caught:
        case_id, error = _process_case(store, record, config)
    return case_id, error, [str(w.message) for w in caught]


def _process_case(store: Path, record: CaseRecord, config: PreprocessConfig) -> tuple[str, str | None]:
    """Preprocess and store one case; return (case id, error line or None)."""
    try:
        if tuple(record.channels) != config.channel_names:
            extra = [str(path) for name, path in record.channels.items() if name not in config.channel_names]
            raise InputError(
                f"{extra[0] if extra else record.case_id}: case {record.case_id} has {len(record.channels)} channel files "
                f"({', '.join(record.channels)}) but the cohort's cases have {len(config.channel_names)} "
                f"({', '.join(config.channel_names)}); give every case the same channels"
            )
        inputs = input_fingerprint([*record.channels.values(), record.label])  # before reading: a later change redoes it
        case = preprocess_with(config, list(record.channels.values()), record.label, LESION_LABELS.get(config.dataset))
        sources = {name: str(path) for name, path in record.channels.items()}
        write_case(store, record.case_id, case, sources, inputs)
        return record.case_id, None
    except InputError as err:
        return record.case_id, cli_message(err, add_arguments)  # e.g. a volume above --max-voxels


def run(args: argparse.Namespace) -> int:
    split = _parse_split(args.split)
    records = read_cases(args.input, args.dataset)
    channel_names = Counter(tuple(r.channels) for r in records).most_common(1)[0][0]  # one odd case must not decide
    map_channels = tuple(args.map_channels.split(",")) if args.map_channels else DEFAULT_MAP_CHANNELS.get(
        args.dataset, channel_names
    )
    register_to = str(Path(args.register_to).resolve()) if args.register_to else None
    try:
        check_register_to(register_to, "--register-to")
        config = PreprocessConfig(
            image_size=args.size,
            channel_names=channel_names,
            map_channels=map_channels,
            register_to=register_to,
            dataset=args.dataset,
            crop_foreground=not args.no_crop,
            crop_margin_mm=args.crop_margin,
        )
    except ValueError as err:  # image_size is --size, crop_margin_mm is --crop-margin
        raise InputError(f"{args.input}: invalid preprocessing settings: {err}; change that option") from err
    store = Path(args.output)
    _check_same_settings(store, config)
    check_store_outputs(records, store, args.input)
    try:
        store.mkdir(parents=True, exist_ok=True)
        lock_folder(store, "preprocess")
        write_settings(store, config, split, args.seed)
    except OSError as err:
        raise InputError(f"{store}: cannot write the store ({err.strerror}); choose a writable -o folder") from err
    log_to_file(store, "preprocess")
    resolved = {"input": Path(args.input).resolve(), "split": split, "preprocess": asdict(config), "cases_found": len(records)}
    write_run_record(store, record_of("preprocess", args, resolved))
    todo = [r for r in records if not case_done(store, r.case_id, input_fingerprint([*r.channels.values(), r.label]))]
    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=len(todo), desc="preprocess", unit="case")
    if args.workers > 1:
        # spawn, not fork: a forked child of a process that already ran torch ops can deadlock in its thread pool.
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = (f.result() for f in [pool.submit(_process, store, r, config) for r in todo])
            for case_id, error, raised in results:
                _report(case_id, error, raised, skipped, bar)
    else:
        for record in todo:
            _report(*_process(store, record, config), skipped, bar)
    bar.close()
    atomic_save_dataframe(pd.DataFrame(skipped, columns=["case_id", "reason"]), store / "skipped.csv")
    done = [r.case_id for r in records if case_done(store, r.case_id, input_fingerprint([*r.channels.values(), r.label]))]
    if not done:
        raise InputError(f"{args.input}: no case could be preprocessed; see {store / 'skipped.csv'}")
    table = write_manifest(store, assign_splits(done, split, args.seed))
    counts = table.groupby("split")["patient"].nunique().to_dict()
    get_logger().info(
        f"store {store}: {len(done)} patients ({counts}), {len(table)} slices, "
        f"{int(table['label'].sum())} with lesion; {len(skipped)} skipped"
    )
    return 1 if skipped and not args.allow_skips else 0


def _parse_split(text: str) -> tuple[float, float, float]:
    """``--split`` as three fractions, checked before any case is processed."""
    try:
        split = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--split {text!r}: give three fractions train,val,test summing to 1, e.g. 0.75,0.05,0.20") from None
    assign_splits([], split, 0)  # raises a ValueError naming --split when the fractions are wrong
    return split


def _check_same_settings(store: Path, config: PreprocessConfig) -> None:
    """Refuse to resume a store made with other preprocessing settings (finished cases would be kept as they are)."""
    settings = store / "settings.json"
    if not settings.is_file():
        return
    try:
        before = json.loads(settings.read_text())["preprocess"]
    except (ValueError, KeyError, TypeError):
        return
    now = json.loads(json.dumps(asdict(config)))
    before = {**json.loads(json.dumps(asdict(PreprocessConfig()))), **before}  # a key added later: its old meaning
    changed = sorted(k for k in now if before[k] != now[k])
    if changed:
        detail = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
        raise InputError(
            f"{store}: this store was preprocessed with other settings ({detail}); "
            "give a new -o folder, or delete this one to redo it"
        )


def _report(case_id: str, error: str | None, raised: list[str], skipped: list[tuple[str, str]], bar: tqdm) -> None:
    for message in raised:
        warnings.warn(message, InputWarning, stacklevel=1)  # through the verb's log, once per text
    if error:
        skipped.append((case_id, error))
        get_logger().warning(f"skipped {case_id}: {error}", extra={"bare": True})
    bar.update(1)
