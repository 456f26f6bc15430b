"""Segment cases from Python, the code path of ``anofpdm segment``::

    import anofpdm_monai as am
    outputs = am.segment(["BraTS2021_00000/"], model="bundled")
    outputs[0].mask            # nibabel image on the input's own grid (uint8), outputs[0].anomaly its map

:func:`segment_cohort` is the whole of ``anofpdm segment`` after its arguments are parsed: this process's part of
the cohort (:func:`~anofpdm_monai.distributed.resolve_parts`: ``--num-parts``, ``torchrun``, SLURM), the output
folder's checks, lock, log and run records, and the case loop. :func:`segment_records` is the case loop that it and
:func:`segment` use: cases are loaded (read + preprocessed) ahead in worker processes and written in others while
the network runs on the current case (nnU-Net's predictor does the same), or inline where the network needs every
CPU (:func:`default_workers`).
"""

from __future__ import annotations

import functools
import multiprocessing
import signal
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CaseOutcome", "CaseSegmentation", "CohortSegmentation", "resolve_parts", "segment", "segment_cohort", "segment_records", "shard"]

import nibabel as nib
import numpy as np
import torch

from anofpdm_monai.distributed import resolve_parts, shard
from anofpdm_monai.inferers import VolumeInferer, VolumeResult, preprocess_case, write_segmentation
from anofpdm_monai.io import InputError, image_like, part_file_name
from anofpdm_monai.logs import log_to_file
from anofpdm_monai.model import AnoFPDMModel, InferenceSettings, default_method
from anofpdm_monai.outputs import (
    SEGMENT_SETTINGS,
    check_segment_outputs,
    continuation_record,
    finish_part,
    finished,
    lock_folder,
    segment_outputs,
    settings_record,
    start_part,
)
from anofpdm_monai.provenance import RUN_RECORD, check_continuation, inference_settings, run_record
from anofpdm_monai.readers import CaseRecord, brain_mask_file, records_for_inference
from anofpdm_monai.threads import available_cpus

# at most this many loader and as many writer processes by default (nnU-Net's -npp / -nps default: 3)
MAX_DEFAULT_WORKERS = 3


@dataclass
class CaseOutcome:
    """What became of one case in :func:`segment_records`.

    Attributes:
        case_id: the case.
        result: the outputs (None when skipped or failed, or when results are not kept).
        written: files written (mask last).
        skipped: the mask existed already and ``skip_done`` was set.
        error: why the case failed, one line (None when it did not); its ``arguments`` name the settings involved.
        seconds: loading + inference + writing wall time.
        summary: one line on the outputs (unhealthy slices, lesion volume, time), for logs.
    """

    case_id: str
    result: VolumeResult | None = None
    written: list[Path] = field(default_factory=list)
    skipped: bool = False
    error: InputError | None = None
    seconds: float = 0.0
    summary: str = ""


@dataclass
class CaseSegmentation:
    """One case's outputs as images on the input's own grid (what :func:`segment` returns).

    Attributes:
        case_id: the case.
        mask: uint8 (X, Y, Z) lesion mask.
        anomaly: float32 (X, Y, Z) anomaly map (zero outside the brain unless ``save_anomaly="full"``).
        result: per-slice outputs, health decisions and the preprocessed case.
        written: files written when ``output_dir`` was given.
    """

    case_id: str
    mask: nib.Nifti1Image
    anomaly: nib.Nifti1Image | None
    result: VolumeResult
    written: list[Path]


def channel_order(record: CaseRecord, names: Sequence[str]) -> list[Path]:
    """The case's channel files in the model's channel order when they carry its channel names
    (e.g. a manifest's columns in another order); else in the order given."""
    if set(record.channels) == set(names):
        return [record.channels[name] for name in names]
    return list(record.channels.values())


def default_workers(device: torch.device) -> int:
    """Loader (and as many writer) processes for :func:`segment_records` on ``device``: on a GPU up to
    :data:`MAX_DEFAULT_WORKERS`, leaving the main process one CPU to feed it; on a CPU 0 (loading and writing between
    the cases: there they only compete with the network, measured on 2 CPU cores a loader beside the network was
    0.81x as fast, benchmarks/segment_throughput.py)."""
    if device.type != "cuda":
        return 0
    return max(0, min(MAX_DEFAULT_WORKERS, available_cpus() - 1))


def init_worker() -> None:
    """A loader or writer process: one compute thread, and Ctrl-C left to the main process (which stops the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def segment_records(
    inferer: VolumeInferer,
    records: Sequence[CaseRecord],
    output_dir: str | Path | None = None,
    *,
    save_png: bool = False,
    save_anomaly: str = "masked",
    skip_done: bool = False,
    keep_results: bool = True,
    progress: bool = False,
    num_workers: int | None = None,
) -> Iterator[CaseOutcome]:
    """Segment cases, loading and writing in worker processes while the network runs; yields one outcome per case.

    Skipped cases come first, then the others in the order given.

    A case that fails (unreadable input, unwritable output) yields an outcome with ``error`` set and
    leaves no partial files; the other cases go on.

    Args:
        inferer: the model and settings.
        records: the cases (see :func:`anofpdm_monai.readers.records_for_inference`).
        output_dir: where ``CASE.nii.gz`` (and the map, PNG) go; None writes nothing.
        save_png: also write ``CASE.png`` overlays.
        save_anomaly: ``none``, ``masked`` (zero outside the brain) or ``full``.
        skip_done: skip cases finished in ``output_dir`` (``--continue``): mask and settings record ``CASE.json``
            there; a case finished with other settings is refused (InputError) before anything is written.
        keep_results: keep each case's :class:`VolumeResult` on its outcome (the cohort verb drops them).
        progress: a progress bar over each case's slices.
        num_workers: loader processes, and as many writer processes; at most this many cases are loaded ahead and
            as many wait to be written (a bounded queue: memory stays at a few cases). 0 loads and writes in this
            process, between the network's cases. None: :func:`default_workers` for the inferer's device. Workers are
            spawned: they import the caller's main script, which must guard its work with ``if __name__ == "__main__":``
            (as for torch's DataLoader workers).

    Raises:
        InputError: ``num_workers`` is negative (naming it).
    """
    if num_workers is None:
        num_workers = default_workers(inferer.device)
    if num_workers < 0:
        raise InputError(f"num_workers={num_workers} must be 0 (load and write in this process) or more", arguments="num_workers")
    out = None if output_dir is None else Path(output_dir)
    made_with = None if out is None else case_settings_record(inferer, save_anomaly)
    if out is not None:
        check_segment_outputs(records, out, argument="output_dir")
    done = finished_cases(inferer, records, out, save_anomaly) if skip_done and out is not None else set()
    todo = [r for r in records if r.case_id not in done]

    def load(record: CaseRecord) -> Future:
        paths = channel_order(record, inferer.config.preprocess.channel_names)
        return loader.submit(preprocess_case, inferer.preprocess_config, paths, None, None, brain_mask_file(record), inferer.model_dir)

    def write(result: VolumeResult, case_id: str) -> Future:
        assert out is not None
        png = None
        if save_png:
            from anofpdm_monai.visualize import save_overlay

            png = functools.partial(save_overlay, result.case.images, result.slices.maps, result.slices.masks,
                                    slice_indices=list(result.case.geometry.slice_indices))  # fmt: skip
        return writer.submit(write_case, out, case_id, result.case.geometry.reference, result.mask,
                             result.anomaly_to_save(save_anomaly), png, made_with)  # fmt: skip

    for record in records:
        if record not in todo:
            yield CaseOutcome(record.case_id, skipped=True)
    with worker_pool(num_workers) as loader, worker_pool(num_workers) as writer:
        loading = deque(load(r) for r in todo[: max(1, num_workers)])  # the cases loaded ahead
        writing: deque[tuple[CaseOutcome, Future]] = deque()  # the cases waiting to be written, oldest first
        for index, record in enumerate(todo):
            start = time.perf_counter()
            outcome = CaseOutcome(record.case_id)
            try:
                case = result_of(loading.popleft())
            except InputError as err:
                case, outcome.error = None, err
            if index + len(loading) + 1 < len(todo):
                loading.append(load(todo[index + len(loading) + 1]))
            if case is not None:
                try:
                    result = inferer.run_case(case, record.case_id, progress=progress)
                except InputError as err:
                    result, outcome.error = None, err
                if result is not None:
                    outcome.summary = (f"{int(result.slices.predicted_unhealthy.sum())}/{len(result.slices.sim)} slices "
                                       f"unhealthy, lesion {result.lesion_ml:.1f} ml")  # fmt: skip
                    outcome.result = result if keep_results else None
                    if out is not None:
                        writing.append((outcome, write(result, record.case_id)))
                        outcome.seconds = time.perf_counter() - start
                        while len(writing) > num_workers:
                            yield finish(*writing.popleft())
                        continue
            outcome.seconds = time.perf_counter() - start
            while writing:  # outcomes in order: the earlier cases' files first
                yield finish(*writing.popleft())
            yield outcome
        while writing:
            yield finish(*writing.popleft())


def write_case(out: Path, case_id: str, reference: Path, mask: np.ndarray, anomaly: np.ndarray | None,
               png: Callable[[Path], Path] | None, record: dict | None) -> list[Path]:  # fmt: skip
    """One case's files (:func:`~anofpdm_monai.inferers.write_segmentation`), a file system error as one InputError line
    (run in a writer process, or inline)."""
    try:
        return write_segmentation(out, case_id, reference, mask, anomaly, png, record)
    except InputError:
        raise
    except OSError as err:
        target = err.filename2 or err.filename or out
        raise InputError(
            f"cannot write {target} ({err.strerror or err}); make sure {out} is writable, has free space and holds no folder of that name"
        ) from err


def worker_pool(num_workers: int) -> Executor:
    """``num_workers`` spawned processes with one compute thread each, or the caller's thread for 0.

    Spawned, not forked: a fork of a process that holds CUDA or torch's thread pools can hang.
    """
    if num_workers == 0:
        return InlineExecutor()
    return ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker)


@dataclass
class CohortSegmentation:
    """What :func:`segment_cohort` did.

    Attributes:
        output_dir: the output folder.
        part: ``(part_id, num_parts)`` of this process.
        cases: this process's cases.
        outcomes: one per case (results not kept).
        merged: every part has finished and ``run.json`` lists them (a whole run: True).
    """

    output_dir: Path
    part: tuple[int, int]
    cases: list[str]
    outcomes: list[CaseOutcome]
    merged: bool

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.error is not None]


def segment_cohort(
    model: AnoFPDMModel,
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    settings: InferenceSettings | None = None,
    *,
    save_png: bool = False,
    save_anomaly: str = "masked",
    resume: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
    parts_from: str = "args",
    num_workers: int | None = None,
    record: Callable[[dict], dict] | None = None,
    on_outcome: Callable[[CaseOutcome], None] | None = None,
    progress: bool = True,
) -> CohortSegmentation:
    """Segment a cohort into ``output_dir``: the whole of ``anofpdm segment`` once its arguments are parsed.

    This process's part of the cases (:func:`~anofpdm_monai.distributed.resolve_parts`) is segmented by
    :func:`segment_records`; before anything is written the inputs, the outputs (no input overwritten) and, with
    ``resume``, the folder's earlier run and finished cases are checked, so a refused run leaves no folder behind.
    The folder is then locked for this run (or part), its log is ``segment.log`` (``segment.part-K-of-N.log``), its
    run record ``run.json`` (``run.part-K-of-N.json``, merged into ``run.json`` by the last part to finish).

    Args:
        model: the loaded model.
        inputs: case folders, NIfTI files, cohort folders or manifest CSVs
            (:func:`~anofpdm_monai.readers.records_for_inference`).
        output_dir: the output folder.
        settings: inference settings (None: the defaults with :func:`~anofpdm_monai.model.default_method`).
        save_png, save_anomaly: as :func:`segment_records`.
        resume: skip the cases finished with the same settings; refused if the folder holds outputs made with others.
        num_parts, part_id, parts_from: this process's part (``args``, ``torchrun`` or ``slurm``).
        num_workers: loader and writer processes (:func:`segment_records`).
        record: ``(resolved settings) -> run record`` (the CLI adds its flags); default: the library's record.
        on_outcome: called with each case's outcome as it comes (the CLI logs it).
        progress: progress bars over the cases and each case's slices.

    Raises:
        InputError: an input, the part, the output folder or (``resume``) the earlier run is refused (one line).
    """
    from tqdm.auto import tqdm

    num_parts, part_id = resolve_parts(num_parts, part_id, parts_from=parts_from)
    part = (part_id, num_parts)
    records = shard(records_for_inference(inputs), num_parts, part_id)
    inferer = VolumeInferer(model, settings or InferenceSettings(method=default_method(model.folder)))
    settings = inferer.settings
    out = Path(output_dir)
    resolved = {**settings.to_dict(), **inference_settings(inferer.slice_inferer), "device": str(inferer.device),
                "brain_mask": inferer.preprocess_config.brain_mask, "num_parts": num_parts, "part_id": part_id,
                "num_workers": default_workers(inferer.device) if num_workers is None else num_workers}  # fmt: skip
    run = record(resolved) if record is not None else run_record("segment", None, resolved, model.folder)
    if resume and any(out.glob("*.nii.gz")):
        check_continuation(out, run, SEGMENT_SETTINGS, continuation_record(out, part))
    check_segment_outputs(records, out, tuple(dict.fromkeys((RUN_RECORD, part_file_name(RUN_RECORD, part), part_file_name("segment.log", part)))),
                          argument="output_dir")  # fmt: skip
    if resume:  # a case finished with other settings is refused before anything is written
        finished_cases(inferer, records, out, save_anomaly)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{out}: cannot create the output folder ({err.strerror}); choose a writable output_dir", arguments="output_dir") from err
    lock_folder(out, "segment", part)
    log_to_file(out, "segment", part)
    start_part(out, run, part, SEGMENT_SETTINGS)
    outcomes = segment_records(inferer, records, out, save_png=save_png, save_anomaly=save_anomaly, skip_done=resume,
                               keep_results=False, progress=progress, num_workers=num_workers)  # fmt: skip
    done = []
    desc = f"segment {part_id + 1}/{num_parts}" if num_parts > 1 else "segment"
    for outcome in tqdm(outcomes, total=len(records), desc=desc, unit="case", disable=not progress or len(records) < 2):
        done.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    failed = sum(o.error is not None for o in done)
    merged = finish_part(out, run, part, counts={"cases": len(records), "failed": failed})
    return CohortSegmentation(out, part, [r.case_id for r in records], done, merged)


def finished_cases(inferer: VolumeInferer, records: Sequence[CaseRecord], output_dir: str | Path, save_anomaly: str) -> set[str]:
    """The cases of ``records`` finished in ``output_dir`` with this inferer's settings (``--continue`` skips them).

    Raises:
        InputError: a case there was finished with another model or other settings (the line names the setting).
    """
    made_with = case_settings_record(inferer, save_anomaly)
    paths = {r.case_id: segment_outputs(output_dir, r.case_id) for r in records}
    return {case for case, p in paths.items() if finished(p["record"], made_with, SEGMENT_SETTINGS, p["mask"])}


def case_settings_record(inferer: VolumeInferer, save_anomaly: str) -> dict[str, Any]:
    """What ``CASE.json`` records beside a segmented case: the settings that change its files, and the weights' sha256."""
    resolved = {**inferer.settings.to_dict(), **inference_settings(inferer.slice_inferer), "save_anomaly": save_anomaly,
                "brain_mask": inferer.preprocess_config.brain_mask}  # fmt: skip
    return settings_record({key: resolved[key] for key in SEGMENT_SETTINGS}, inferer.model.sha256)


class InlineExecutor(Executor):
    """An executor that runs each task at once in the caller's thread (``segment_records(num_workers=0)``)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # handed to whoever waits on the future, as a thread pool would
            future.set_exception(err)
        return future


def result_of(future: Future) -> Any:
    """A worker's result; a worker process that died takes the run down with one line saying why it may have.

    Raises:
        InputError: the pool broke (the process was killed, e.g. out of memory, or it could not start: spawned
            workers import the caller's main script, which must guard its work with ``if __name__ == "__main__":``).
    """
    try:
        return future.result()
    except BrokenProcessPool as err:
        raise InputError(
            "a loader or writer process of segment died (killed, e.g. out of memory, or it could not start: a script that "
            "calls segment must guard its work with `if __name__ == \"__main__\":`); run with num_workers=0 to load "
            "and write in this process", arguments="num_workers"
        ) from err


def finish(outcome: CaseOutcome, writing: Future) -> CaseOutcome:
    """Wait for a case's files; a failed write becomes the outcome's error."""
    start = time.perf_counter()
    try:
        outcome.written = result_of(writing)
    except InputError as err:
        outcome.error = err
    outcome.seconds += time.perf_counter() - start
    outcome.summary += f", {outcome.seconds:.1f} s"
    return outcome


def segment(
    inputs: Any,
    model: AnoFPDMModel | str | Path = "bundled",
    *,
    output_dir: str | Path | None = None,
    settings: InferenceSettings | None = None,
    device: str = "auto",
    save_anomaly: str = "masked",
    save_png: bool = False,
    progress: bool = True,
    num_workers: int = 0,
    **overrides: Any,
) -> list[CaseSegmentation]:
    """Segment cases and return their mask and anomaly-map images on each input's own grid.

    Args:
        inputs: one item or a list. An item is a path as ``anofpdm segment -i`` takes it (a case
            folder, a NIfTI file, a cohort folder or a manifest CSV), a ``nibabel`` image or MONAI
            ``MetaTensor`` (a one-channel case), or a tuple of them (one case, one per channel in the
            model's channel order).
        model: a loaded :class:`AnoFPDMModel`, a model folder or ``"bundled"``.
        output_dir: also write ``CASE.nii.gz`` / ``CASE_anomaly.nii.gz`` there (None: write nothing).
        settings: inference settings; ``**overrides`` replace its fields (e.g. ``method="anofpdm-ddim"``). Without
            either naming a method, the one ``anofpdm segment`` runs (:func:`~anofpdm_monai.model.default_method`).
        device: ``auto``, ``cpu`` or ``cuda`` (when ``model`` is not loaded yet).
        save_anomaly: ``masked`` (zero outside the brain), ``full`` or ``none`` (no map).
        save_png: also write PNG overlays (with ``output_dir``).
        progress: progress bars over cases and slices.
        num_workers: loader and writer processes (:func:`segment_records`); 0 (default) loads and writes in this
            process, which needs no ``if __name__ == "__main__":`` guard in the calling script.

    In-memory inputs are read through temporary NIfTI copies (the same reader and checks as files),
    so their ``result.case.geometry.reference`` names a file that is gone once this returns.

    Raises:
        InputError: an input cannot be read (the message names it); no case is returned then.
    """
    from tqdm.auto import tqdm

    if settings is None and "method" not in overrides:  # the method anofpdm segment runs when none is named
        overrides["method"] = default_method(model.folder if isinstance(model, AnoFPDMModel) else model)
    inferer = VolumeInferer(model, settings, device=device, **overrides)
    with tempfile.TemporaryDirectory(prefix="anofpdm_inputs_") as scratch:
        records = records_from(inputs, Path(scratch))
        outputs = []
        outcomes = segment_records(inferer, records, output_dir, save_png=save_png, save_anomaly=save_anomaly, progress=progress,
                                   num_workers=num_workers)  # fmt: skip
        for outcome in tqdm(outcomes, total=len(records), desc="segment", unit="case", disable=not progress or len(records) < 2):
            if outcome.error is not None:
                raise InputError(f"{outcome.case_id}: {outcome.error}", arguments=outcome.error.arguments)
            result = outcome.result
            reference = nib.load(str(result.case.geometry.reference))
            anomaly = result.anomaly_to_save(save_anomaly)
            outputs.append(CaseSegmentation(
                outcome.case_id, as_read(image_like(result.mask, reference, np.uint8)),
                None if anomaly is None else as_read(image_like(anomaly, reference, np.float32)), result, outcome.written,
            ))  # fmt: skip
    return outputs


def as_read(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """The image as reading its file gives it back (header as written, ``affine`` from the header)."""
    return nib.Nifti1Image.from_bytes(image.to_bytes())


def records_from(inputs: Any, scratch: Path) -> list[CaseRecord]:
    """Cases from paths and in-memory images; images are written as NIfTI under ``scratch`` and read like files."""
    items = list(inputs) if isinstance(inputs, list) else [inputs]
    paths = [item for item in items if isinstance(item, (str, Path))]
    records = records_for_inference(paths) if paths else []
    for index, item in enumerate(i for i in items if not isinstance(i, (str, Path))):
        channels = item if isinstance(item, tuple) else (item,)
        case_id = f"image{index:03d}"
        files = {}
        for channel, image in enumerate(channels):
            files[f"ch{channel:04d}"] = write_image(image, scratch / f"{case_id}_{channel:04d}.nii.gz")
        records.append(CaseRecord(case_id, files))
    return records


def write_image(image: Any, path: Path) -> Path:
    """Save a nibabel image, or a MONAI ``MetaTensor`` (X, Y, Z) or (1, X, Y, Z) with its ``affine``, as NIfTI."""
    if isinstance(image, nib.spatialimages.SpatialImage):
        nib.save(image, str(path))
        return path
    affine = getattr(image, "affine", None)
    if affine is None:
        raise InputError(f"an input of type {type(image).__name__} is neither a path, a nibabel image nor a MetaTensor with an affine")
    array = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise InputError(f"a MetaTensor input has shape {array.shape}; give one (X, Y, Z) or (1, X, Y, Z) volume per channel")
    affine = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine, dtype=np.float64)
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine), str(path))
    return path
