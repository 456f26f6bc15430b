"""Segment cases from Python, the code path of ``anofpdm segment``::

    import anofpdm_monai as am
    outputs = am.segment(["BraTS2021_00000/"], model="bundled")
    outputs[0].mask            # nibabel image on the input's own grid (uint8), outputs[0].anomaly its map

:func:`segment_records` is the cohort loop both use: cases are loaded (read + preprocessed) one
ahead in a thread and written in another while the network runs on the current case, like
nnU-Net's predictor; :func:`~anofpdm_monai.distributed.shard` splits a cohort between processes
(``--num-parts``/``torchrun``).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CaseOutcome", "CaseSegmentation", "resolve_parts", "segment", "segment_records", "shard"]

import nibabel as nib
import numpy as np
import torch

from anofpdm_monai.distributed import resolve_parts, shard
from anofpdm_monai.inferers import VolumeInferer, VolumeResult
from anofpdm_monai.io import InputError, image_like
from anofpdm_monai.model import AnoFPDMModel, InferenceSettings, default_method
from anofpdm_monai.outputs import SEGMENT_SETTINGS, check_segment_outputs, finished, segment_outputs, settings_record
from anofpdm_monai.provenance import inference_settings
from anofpdm_monai.readers import CaseRecord, brain_mask_file, records_for_inference
from anofpdm_monai.threads import available_cpus
from anofpdm_monai.transforms import PreprocessedCase


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
    overlap: bool | None = None,
) -> Iterator[CaseOutcome]:
    """Segment cases, overlapping loading and writing with inference; yields one outcome per case.

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
        overlap: load the next case and write the last one in threads while the network runs; None
            (default) overlaps where that leaves the network its cores: on a GPU, or with more usable CPUs
            than torch's compute threads (measured on 2 CPU cores: overlapping was 0.81x as fast,
            benchmarks/segment_throughput.py).
    """
    if overlap is None:
        overlap = inferer.device.type == "cuda" or available_cpus() > torch.get_num_threads()
    out = None if output_dir is None else Path(output_dir)
    made_with = None if out is None else case_settings_record(inferer, save_anomaly)
    if out is not None:
        check_segment_outputs(records, out, argument="output_dir")
    done = finished_cases(inferer, records, out, save_anomaly) if skip_done and out is not None else set()
    todo = [r for r in records if r.case_id not in done]
    names = inferer.config.preprocess.channel_names

    def load(record: CaseRecord) -> PreprocessedCase:
        return inferer.preprocess(channel_order(record, names), brain_mask_path=brain_mask_file(record))

    def write(result: VolumeResult, case_id: str) -> list[Path]:
        assert out is not None
        try:
            return inferer.write(result, out, case_id, save_png=save_png, save_anomaly=save_anomaly, record=made_with)
        except InputError:
            raise
        except OSError as err:
            target = err.filename2 or err.filename or out
            raise InputError(
                f"cannot write {target} ({err.strerror or err}); make sure {out} is writable, has free space and "
                f"holds no folder of that name"
            ) from err

    for record in records:
        if record not in todo:
            yield CaseOutcome(record.case_id, skipped=True)
    pool = (lambda name: ThreadPoolExecutor(1, thread_name_prefix=name)) if overlap else (lambda name: InlineExecutor())
    with pool("load") as loader, pool("write") as writer:
        loading: Future | None = loader.submit(load, todo[0]) if todo else None
        writing: tuple[CaseOutcome, Future] | None = None
        for index, record in enumerate(todo):
            start = time.perf_counter()
            outcome = CaseOutcome(record.case_id)
            try:
                case = loading.result()
            except InputError as err:
                case, outcome.error = None, err
            loading = loader.submit(load, todo[index + 1]) if index + 1 < len(todo) else None
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
                        if writing is not None:
                            yield finish(*writing)
                        writing = outcome, writer.submit(write, result, record.case_id)
                        outcome.seconds = time.perf_counter() - start
                        continue
            outcome.seconds = time.perf_counter() - start
            if writing is not None:
                yield finish(*writing)
                writing = None
            yield outcome
        if writing is not None:
            yield finish(*writing)


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
    """An executor that runs each task at once in the caller's thread (``segment_records(overlap=False)``)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # handed to whoever waits on the future, as a thread pool would
            future.set_exception(err)
        return future


def finish(outcome: CaseOutcome, writing: Future) -> CaseOutcome:
    """Wait for a case's files; a failed write becomes the outcome's error."""
    start = time.perf_counter()
    try:
        outcome.written = writing.result()
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
        outcomes = segment_records(inferer, records, output_dir, save_png=save_png, save_anomaly=save_anomaly, progress=progress)
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
