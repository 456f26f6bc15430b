"""The cohort loops of ``anofpdm preprocess`` and ``anofpdm calibrate`` as library calls.

:func:`preprocess_cohort` is ``anofpdm preprocess``: every case of a raw cohort through the
preprocessing chain into a store (resumable, per-case errors skip the case, parallel workers).

:func:`calibrate_model` is ``anofpdm calibrate``: the paper's calibration (w*, thr_01, D, and N when
several budgets are candidates) on validation slices, then every registered calibration section's
hook (:func:`anofpdm_monai.methods.calibration_sections`, e.g. the volume family) at the selected N,
k and w; image-level labels only. ``evaluate_cohort`` (:mod:`anofpdm_monai.evaluation`) and
``segment_records`` (:mod:`anofpdm_monai.api`) are the other verbs' loops.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from anofpdm_monai.calibration import Calibration, DivergenceCurve, calibrate, plot_calibration, predictor_precision
from anofpdm_monai.config import PreprocessConfig, check_register_to
from anofpdm_monai.data import (
    SETTINGS_FILE,
    SKIPPED_FILE,
    PreprocessedStore,
    assign_splits,
    case_done,
    input_fingerprint,
    write_case,
    write_manifest,
    write_settings,
)
from anofpdm_monai.inferers import ForwardProcessInferer
from anofpdm_monai.io import InputError, InputWarning, atomic_save_dataframe
from anofpdm_monai.logs import get_logger, log_to_file
from anofpdm_monai.methods import DEFAULT_FP_RATE, SectionContext, calibration_sections
from anofpdm_monai.model import DEFAULT_BATCH_SIZE, AnoFPDMModel, calibration_path
from anofpdm_monai.outputs import check_store_outputs, lock_folder
from anofpdm_monai.provenance import run_record, write_run_record
from anofpdm_monai.readers import DEFAULT_MAP_CHANNELS, LESION_LABELS, CaseRecord, brain_mask_file, read_cases, record_files
from anofpdm_monai.transforms import preprocess_with


@dataclass(frozen=True)
class CalibrationSettings:
    """What one calibration run chooses.

    Attributes:
        w_grid: candidate guidance strengths.
        n_val: validation slices (a seeded sample).
        steps: candidate forward-step budgets N (the paper: 600).
        stride: visited-step stride k.
        encoding: ``ddim`` or ``ddpm`` (``calibration.json`` or ``calibration_ddpm.json``).
        batch_size: slices per forward process.
        section_cases: whole validation patients each calibration section's hook may run (0: no sections).
        sections_only: keep the encoding's existing paper calibration and (re)make only its sections.
        seed: seed of the validation sample and the forward process.
        precision: network precision (``auto``, ``fp32``, ``bf16``).
        fp_rate: false-positive components per 100 ml of healthy brain the volume family's minimum lesion
            size allows on the healthy validation slices (:data:`anofpdm_monai.methods.DEFAULT_FP_RATE`).
    """

    w_grid: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
    n_val: int = 1000
    steps: Sequence[int] = (600,)
    stride: int = 1
    encoding: str = "ddim"
    batch_size: int = DEFAULT_BATCH_SIZE
    section_cases: int = 4
    sections_only: bool = False
    seed: int = 0
    precision: str = "auto"
    fp_rate: float = DEFAULT_FP_RATE


@dataclass
class CalibrationOutcome:
    """What :func:`calibrate_model` made: the saved calibration, its file, the plot's curves (none when only sections were made)."""

    calibration: Calibration
    path: Path
    curves: list[DivergenceCurve] = field(default_factory=list)


def validation_sample(store: PreprocessedStore, n_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded sample of at most ``n_val`` validation slices and their image-level labels (no masks used)."""
    rows = store.sample_rows("val", n_val, seed, "for calibration")
    images, _, labels = store.load_slices(rows)
    return images, labels


def calibration_record_name(calibration_file: str | Path) -> str:
    """The run record beside a calibration: ``run_calibrate.json`` (DDIM), ``run_calibrate_ddpm.json`` (DDPM)."""
    return Path(calibration_file).name.replace("calibration", "run_calibrate", 1)


def calibrate_model(model: AnoFPDMModel, data: str | Path, settings: CalibrationSettings | None = None, *,
                    record: Callable[[dict], dict] | None = None) -> CalibrationOutcome:  # fmt: skip
    """Calibrate a model folder on a store's validation split and save ``calibration*.json`` beside its weights, its
    run record (:func:`calibration_record_name`), the plot of its curves (``calibration*.png``) and, under a verb,
    its log (``MODEL/calibrate.log``): the whole of ``anofpdm calibrate`` after its arguments are parsed.

    Args:
        model: the loaded model.
        data: a preprocessed store with a val split.
        settings: the calibration's choices.
        record: ``(resolved settings) -> run record`` (the CLI adds its flags); default: the library's record.

    Raises:
        InputError: the store does not fit the model, or ``sections_only`` without an existing calibration or cases.
    """
    settings = settings or CalibrationSettings()
    log = get_logger()
    config, device = model.config, model.device
    store = PreprocessedStore(data)
    if store.config.channel_names != config.preprocess.channel_names or store.config.image_size != config.network.image_size:
        raise InputError(
            f"{data}: store has channels {store.config.channel_names} at {store.config.image_size}px, the model "
            f"takes {config.preprocess.channel_names} at {config.network.image_size}px; use the store the model was trained on"
        )
    log_to_file(model.folder, "calibrate")
    predict_eps = model.noise_predictor(settings.precision)
    alphas_cumprod = model.alphas_cumprod.to(device)
    out = calibration_path(model.folder, settings.encoding)
    curves: list[DivergenceCurve] = []
    if not (math.isfinite(settings.fp_rate) and settings.fp_rate >= 0):
        raise InputError(f"fp_rate={settings.fp_rate}: give false-positive components per 100 ml of brain as a number >= 0, "
                         f"e.g. {DEFAULT_FP_RATE}", arguments="fp_rate")  # fmt: skip
    if settings.sections_only:
        if settings.section_cases < 1:
            raise InputError(f"sections_only needs section_cases >= 1, got {settings.section_cases}", arguments=("sections_only", "section_cases"))
        calibration = Calibration.load(out)
    else:
        images, labels = validation_sample(store, settings.n_val, settings.seed)
        calibration, curves = calibrate(
            predict_eps, alphas_cumprod, images, labels, w_grid=list(settings.w_grid), steps=list(settings.steps),
            stride=settings.stride, encoding=settings.encoding, map_channels=config.preprocess.map_channel_indices,
            map_channel_names=config.preprocess.map_channels, batch_size=settings.batch_size,
            generator=torch.Generator(device=device).manual_seed(settings.seed), device=device,
        )  # fmt: skip
        log.info(f"{out}: N*={calibration.steps}, w*={calibration.w:g}, thr_01={calibration.thr_01:.4f}, D={[round(d, 5) for d in calibration.D]}")
        log.info(f"validation accuracy ({calibration.n_val} slices):")
        for budget, row in zip(calibration.steps_grid, calibration.accuracy_by_steps):
            log.info(f"  N={budget}: " + ", ".join(f"w={w:g}: {a:.3f}" for w, a in zip(calibration.w_grid, row)))
    if settings.section_cases > 0:
        engine = ForwardProcessInferer(predict_eps, alphas_cumprod, calibration, batch_size=settings.batch_size, seed=settings.seed, device=device)
        context = SectionContext(engine.forward_process, store, settings.section_cases, settings.seed, calibration, settings.fp_rate)
        for name, section in calibration_sections().items():
            if section.calibrate is not None:
                calibration.sections[name] = section.calibrate(context)
                log.info(section.describe(calibration.sections[name]) if section.describe else f"{name}: calibrated")
    calibration.save(out)
    resolved = {"data": Path(data).resolve(), "device": str(device), "precision": predictor_precision(predict_eps),
                "w_grid": list(settings.w_grid), "steps": list(settings.steps), "output": out.resolve()}  # fmt: skip
    run = record(resolved) if record is not None else run_record("calibrate", None, {**asdict(settings), **resolved}, model.folder)
    write_run_record(model.folder, run, calibration_record_name(out))
    if curves:
        plot_calibration(calibration, curves, out.with_suffix(".png"))
    return CalibrationOutcome(calibration, out, curves)


# --------------------------------------------------------------------------------------------
# anofpdm preprocess
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessSettings:
    """What one preprocessing run chooses (the chain's settings are recorded in the store's ``settings.json``).

    Attributes:
        dataset: the layout of the raw cohort (``brats``, ``atlas``, ``nnunet``, ``manifest``; docs/data.md).
        size: slice side S.
        split: train, val, test fractions by patient.
        seed: seed of the patient split.
        register_to: template NIfTI for affine registration, or None.
        map_channels: channel names of the anomaly map; None: the layout's default.
        crop: resize the brain's bounding box padded to a square (True) or the whole axial plane (False).
        crop_margin_mm: margin around the brain's bounding box.
        workers: cases preprocessed in parallel (processes).
        brain_mask: how the chain finds the brain (``nonzero``, ``template``, ``files``); None: the layout's
            default (docs/data.md).
    """

    dataset: str
    size: int = 128
    split: tuple[float, float, float] = (0.75, 0.05, 0.20)
    seed: int = 0
    register_to: str | None = None
    map_channels: tuple[str, ...] | None = None
    crop: bool = True
    crop_margin_mm: float = 5.0
    workers: int = 1
    brain_mask: str | None = None


@dataclass
class PreprocessOutcome:
    """What :func:`preprocess_cohort` did: the store, its patients, the skipped cases with their errors, the manifest."""

    store: Path
    done: list[str]
    skipped: list[tuple[str, InputError]]
    manifest: Any = None


def process_case(store: Path, record: CaseRecord, config: PreprocessConfig) -> tuple[str, tuple[str, tuple[str, ...]] | None, list[str]]:
    """Preprocess and store one case (in a worker process or not).

    Returns:
        ``(case id, (error line, its arguments) or None, the warnings it raised)``; warnings and errors are
        returned, not shown, so that a worker process's ones reach the parent's log as one line each.
    """
    with warnings.catch_warnings(record=True) as caught:
        try:
            if tuple(record.channels) != config.channel_names:
                extra = [str(path) for name, path in record.channels.items() if name not in config.channel_names]
                raise InputError(
                    f"{extra[0] if extra else record.case_id}: case {record.case_id} has {len(record.channels)} channel files "
                    f"({', '.join(record.channels)}) but the cohort's cases have {len(config.channel_names)} "
                    f"({', '.join(config.channel_names)}); give every case the same channels"
                )
            inputs = input_fingerprint(record_files(record))  # before reading: a later change redoes the case
            case = preprocess_with(config, list(record.channels.values()), record.label, LESION_LABELS.get(config.dataset),
                                   brain_mask_file(record))  # fmt: skip
            write_case(store, record.case_id, case, {name: str(path) for name, path in record.channels.items()}, inputs)
            error = None
        except InputError as err:  # e.g. a volume above max_voxels
            error = (str(err), err.arguments)
    return record.case_id, error, [str(w.message) for w in caught]


def preprocess_cohort(
    source: str | Path,
    store: str | Path,
    settings: PreprocessSettings,
    *,
    record: Callable[[dict], dict] | None = None,
    on_skip: Callable[[str, InputError], None] | None = None,
    progress: bool = True,
) -> PreprocessOutcome:
    """Preprocess a raw cohort into a store (``anofpdm preprocess``), resumable: finished cases are kept
    (a case whose input files changed since, by path, size or modification time, is redone).

    A case that fails is skipped (``on_skip``, default: logged) and listed in ``STORE/skipped.csv``; the
    others go on. A store made with other settings is refused, and so is one whose files would land on an
    input file; one process writes a store at a time (``STORE/anofpdm.lock``).

    Raises:
        InputError: invalid settings, the store cannot be written or was made with other settings, or no
            case could be preprocessed.
    """
    from tqdm.auto import tqdm

    log = get_logger()
    records = read_cases(source, settings.dataset)
    channel_names = Counter(tuple(r.channels) for r in records).most_common(1)[0][0]  # one odd case must not decide
    map_channels = settings.map_channels or DEFAULT_MAP_CHANNELS.get(settings.dataset, channel_names)
    register_to = str(Path(settings.register_to).resolve()) if settings.register_to else None
    try:
        check_register_to(register_to, "register_to")
        config = PreprocessConfig(
            image_size=settings.size, channel_names=channel_names, map_channels=tuple(map_channels), register_to=register_to,
            dataset=settings.dataset, crop_foreground=settings.crop, crop_margin_mm=settings.crop_margin_mm,
            brain_mask=settings.brain_mask,
        )  # fmt: skip
    except ValueError as err:
        raise InputError(f"{source}: invalid preprocessing settings: {err}; change that option", arguments="register_to") from err
    store = Path(store)
    check_same_settings(store, config)
    check_store_outputs(records, store, source)
    try:
        store.mkdir(parents=True, exist_ok=True)
        lock_folder(store, "preprocess")
        write_settings(store, config, settings.split, settings.seed)
    except OSError as err:
        raise InputError(f"{store}: cannot write the store ({err.strerror}); choose a writable store folder", arguments="store") from err
    log_to_file(store, "preprocess")
    resolved = {"input": Path(source).resolve(), "split": settings.split, "preprocess": asdict(config), "cases_found": len(records)}
    write_run_record(store, record(resolved) if record is not None else run_record("preprocess", None, resolved))
    todo = [r for r in records if not is_done(store, r)]
    skipped: list[tuple[str, InputError]] = []
    report = on_skip or (lambda case_id, err: log.warning(f"skipped {case_id}: {err}", extra={"bare": True}))
    bar = tqdm(total=len(todo), desc="preprocess", unit="case", disable=not progress)

    def done_one(case_id: str, error: tuple[str, tuple[str, ...]] | None, raised: list[str]) -> None:
        for message in raised:
            warnings.warn(message, InputWarning, stacklevel=1)  # through the verb's log, once per text
        if error is not None:
            err = InputError(error[0], arguments=error[1])
            skipped.append((case_id, err))
            report(case_id, err)
        bar.update(1)

    if settings.workers > 1:
        # spawn, not fork: a forked child of a process that already ran torch ops can deadlock in its thread pool.
        with ProcessPoolExecutor(settings.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in [pool.submit(process_case, store, r, config) for r in todo]:
                done_one(*future.result())
    else:
        for r in todo:
            done_one(*process_case(store, r, config))
    bar.close()
    return finish_store(source, store, records, skipped, settings)


def finish_store(source, store: Path, records: list[CaseRecord], skipped: list[tuple[str, InputError]], settings: PreprocessSettings) -> PreprocessOutcome:
    """Write ``skipped.csv`` and the manifest of every finished case (the split assigned by patient)."""
    atomic_save_dataframe(pd.DataFrame([(c, str(e)) for c, e in skipped], columns=["case_id", "reason"]), store / SKIPPED_FILE)
    done = [r.case_id for r in records if is_done(store, r)]
    if not done:
        raise InputError(f"{source}: no case could be preprocessed; see {store / SKIPPED_FILE}")
    table = write_manifest(store, assign_splits(done, settings.split, settings.seed))
    counts = table.groupby("split")["patient"].nunique().to_dict()
    get_logger().info(
        f"store {store}: {len(done)} patients ({counts}), {len(table)} slices, {int(table['label'].sum())} with lesion; {len(skipped)} skipped"
    )
    return PreprocessOutcome(store, done, skipped, table)


def is_done(store: Path, record: CaseRecord) -> bool:
    """Whether ``record`` is finished in ``store`` from its input files as they are now (path, size, mtime)."""
    return case_done(store, record.case_id, input_fingerprint(record_files(record)))


def check_same_settings(store: Path, config: PreprocessConfig) -> None:
    """Refuse to resume a store made with other preprocessing settings (finished cases would be kept as they are)."""
    settings = store / SETTINGS_FILE
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
        raise InputError(f"{store}: this store was preprocessed with other settings ({detail}); give a new store folder, or delete this one to redo it")
