"""Dataset readers: one per on-disk layout, each yielding one :class:`CaseRecord` per case.

* ``brats``: BraTS21 as shipped, ``ROOT/BraTS2021_XXXXX/BraTS2021_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz``.
* ``atlas``: ATLAS v2.0 as shipped (BIDS-like), ``..._space-MNI152NLin2009aSym_T1w.nii.gz`` with
  ``..._label-L_desc-T1lesion_mask.nii.gz`` beside it.
* ``nnunet``: ``imagesTr``/``imagesTs`` (or the folder itself) of ``CASE_0000.nii.gz`` ... one file per
  channel, labels ``CASE.nii.gz`` in a sibling ``labelsTr``/``labelsTs`` folder.
* ``manifest``: a CSV with ``case_id``, one column per channel and optional ``mask`` and ``brain_mask`` columns.

A case's brain mask file (brain mask ``files``, docs/data.md) is the manifest's ``brain_mask`` column, or
``CASE_brainmask.nii.gz`` beside its first channel (:func:`brain_mask_file`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from anofpdm_monai.io import InputError, check_case_id, image_stem, missing_file_reason, read_json

BRATS_CHANNELS = ("flair", "t1", "t1ce", "t2")
BRATS_MAP_CHANNELS = ("flair", "t2")
ATLAS_SUFFIX = "_T1w.nii.gz"
ATLAS_MASK_SUFFIX = "_label-L_desc-T1lesion_mask.nii.gz"
NNUNET_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")
# The lesion labels each layout defines; a mask holding other values is refused (all are merged into one class).
LESION_LABELS = {"brats": (1, 2, 4), "atlas": (1,)}
BRAIN_MASK_SUFFIX = "_brainmask"
# Columns of a manifest that are not channels.
MANIFEST_EXTRA = ("case_id", "mask", "brain_mask")


@dataclass
class CaseRecord:
    """One case: its id, the channel files in a fixed order, the lesion file if any, and its brain mask
    file if the manifest names one (else :func:`brain_mask_file` looks beside the channels)."""

    case_id: str
    channels: dict[str, Path]
    label: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)
    brain_mask: Path | None = None


def brain_mask_file(record: CaseRecord) -> Path | None:
    """The case's brain mask file: the manifest's, else ``CASE_brainmask.nii.gz`` (or ``.nii``) beside the first
    channel, CASE being that file's name without its last ``_part`` (``BraTS2021_00001_flair``,
    ``sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w``, nnU-Net's ``CASE_0000``) or the case id; None if absent."""
    if record.brain_mask is not None:
        return record.brain_mask
    first = next(iter(record.channels.values()), None)
    if first is None:
        return None
    stems = dict.fromkeys([first.name.split(".nii")[0].rsplit("_", 1)[0], record.case_id])
    for stem in stems:
        for ext in (".nii.gz", ".nii"):
            candidate = first.with_name(f"{stem}{BRAIN_MASK_SUFFIX}{ext}")
            if candidate.is_file():
                return candidate
    return None


def record_files(record: CaseRecord) -> list[Path]:
    """Every file the pipeline reads for one case: its channels, its label and its brain mask (those it has)."""
    return [p for p in [*record.channels.values(), record.label, brain_mask_file(record)] if p is not None]


def read_brats(root: str | Path) -> list[CaseRecord]:
    """Cases of a BraTS21 folder; a case folder lacking a channel file still yields a record (checked at load)."""
    root = Path(root)
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _is_brats_case(p)):
        records.append(_brats_record(folder))
    if not records:
        raise InputError(f"{root}: no BraTS21 case folders found; {_describe(root)}", arguments="dataset")
    return records


def _brats_record(folder: Path) -> CaseRecord:
    case = check_case_id(folder.name, folder, "rename the case folder and its files (e.g. BraTS2021_00001)")
    channels = {c: _first(folder, f"{case}_{c}.nii") for c in BRATS_CHANNELS}
    seg = _first(folder, f"{case}_seg.nii")
    return CaseRecord(case, channels, seg if seg.exists() else None)


def _is_brats_case(folder: Path) -> bool:
    """A folder holding any ``<folder>_{flair,t1,t1ce,t2,seg}.nii[.gz]`` (so a case missing one channel is kept and reported)."""
    return any((folder / f"{folder.name}_{c}.nii{gz}").exists() for c in (*BRATS_CHANNELS, "seg") for gz in ("", ".gz"))


def read_atlas(root: str | Path) -> list[CaseRecord]:
    """Cases of an ATLAS v2.0 tree (searched recursively for ``*_T1w.nii.gz``)."""
    root = Path(root)
    records = _atlas_records(sorted(root.rglob(f"*{ATLAS_SUFFIX}")))
    if not records:
        raise InputError(f"{root}: no ATLAS v2.0 '*{ATLAS_SUFFIX}' files found; {_describe(root)}", arguments="dataset")
    return records


def _atlas_records(t1_files: list[Path]) -> list[CaseRecord]:
    """One case per ``*_T1w.nii.gz``: id ``sub-X``, or ``sub-X_ses-N`` for a subject with several sessions."""
    by_subject: dict[str, list[Path]] = {}
    for t1 in t1_files:
        subject = t1.name.split("_")[0]
        check_case_id(subject, t1, "rename the file (ATLAS names start with the subject, e.g. sub-r001s001_ses-1_...)")
        by_subject.setdefault(subject, []).append(t1)
    records = []
    for subject, files in by_subject.items():
        for t1 in files:
            case_id = subject
            if len(files) > 1:  # one subject, several sessions: keep them apart (a lone session keeps the plain id)
                session = _bids_session(t1)
                if session is None:
                    raise InputError(
                        f"{t1}: duplicate case id {subject!r}: {len(files)} T1w files of this subject carry no 'ses-' "
                        f"entity to tell them apart ({', '.join(str(f) for f in files)}); keep one, or name them "
                        f"{subject}_ses-1_..., {subject}_ses-2_..."
                    )
                case_id = check_case_id(f"{subject}_{session}", t1, "rename the file's ses- entity (e.g. ses-2)")
            mask = t1.with_name(t1.name[: -len(ATLAS_SUFFIX)] + ATLAS_MASK_SUFFIX)
            records.append(CaseRecord(case_id, {"t1": t1}, mask if mask.exists() else None))
    _check_unique(records)
    return records


def _bids_session(path: Path) -> str | None:
    """The ``ses-LABEL`` entity of a BIDS file name, else of a parent folder; None when there is none."""
    for part in (*path.name.split("_")[1:], *reversed(path.parent.parts)):
        if part.startswith("ses-") and len(part) > 4:
            return part
    return None


def _check_unique(records: list[CaseRecord]) -> None:
    """Two inputs must never share a case id (the second would overwrite the first's outputs)."""
    sources: dict[str, list[Path]] = {}
    for record in records:
        sources.setdefault(record.case_id, []).append(next(iter(record.channels.values()), Path("?")))
    dupes = {case: paths for case, paths in sources.items() if len(paths) > 1}
    folded: dict[str, str] = {}
    for case in sources:
        other = folded.setdefault(case.casefold(), case)
        if other != case:
            raise InputError(
                f"{sources[case][0]}: case ids {other!r} ({sources[other][0]}) and {case!r} differ only by upper/lower case; "
                "their output files would be one file on macOS and Windows: rename one of them"
            )
    if dupes:
        case, paths = next(iter(dupes.items()))
        others = f" (and {len(dupes) - 1} more duplicated id(s): {', '.join(sorted(dupes)[:5])})" if len(dupes) > 1 else ""
        raise InputError(
            f"{paths[1]}: duplicate case id {case!r} ({' and '.join(str(p) for p in paths)}){others}; "
            "each case needs its own id: give the files of one case only, or rename one of them"
        )


def read_nnunet(root: str | Path) -> list[CaseRecord]:
    """Cases of an nnU-Net-style folder (``imagesTr`` inside ``root`` or ``root`` itself)."""
    root = Path(root)
    images = next((root / d for d in ("imagesTr", "imagesTs") if (root / d).is_dir()), root)
    files: dict[str, dict[int, Path]] = {}
    for path in sorted(images.iterdir()):
        match = NNUNET_FILE.match(path.name)
        if match:
            check_case_id(match["case"], path, "rename the case's files (CASE_0000.nii.gz, ...)")
            files.setdefault(match["case"], {})[int(match["channel"])] = path
    if not files:
        raise InputError(f"{images}: no nnU-Net 'CASE_0000.nii.gz' files found; {_describe(images)}", arguments="dataset")
    # The cohort's channel count: dataset.json's if it has one, else the most common count (ties: the larger).
    # One odd case must not change the channels of every other case: its missing files are reported at load,
    # and its extra files are kept so that the channel-count check names the case.
    counts = Counter(max(c) + 1 for c in files.values())
    declared = _nnunet_dataset_json(root)
    if declared is not None:
        meta_path, names = declared
        if len(names) not in counts:
            found = ", ".join(str(n) for n in sorted(counts))
            raise InputError(
                f"{meta_path}: declares {len(names)} channels ({', '.join(names)}) but the cases have {found} channel "
                "file(s) each; list every channel in channel_names (one per CASE_XXXX index) or give the matching files"
            )
    else:
        common = max(counts, key=lambda n: (counts[n], n))
        names = tuple(f"ch{i:04d}" for i in range(common))
    labels_dir = images.parent / images.name.replace("images", "labels")
    records = []
    for case, by_index in files.items():
        channels = {name: by_index.get(i, images / f"{case}_{i:04d}.nii.gz") for i, name in enumerate(names)}
        channels.update({f"ch{i:04d}": path for i, path in sorted(by_index.items()) if i >= len(names)})
        label = _first(labels_dir, f"{case}.nii")
        records.append(CaseRecord(case, channels, label if label.exists() else None))
    return records


def read_manifest(csv_path: str | Path) -> list[CaseRecord]:
    """Cases of a manifest CSV: ``case_id``, one column per channel (in order), optional ``mask``."""
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        raise InputError(
            f"{csv_path}: dataset='manifest' expects a CSV file, not a folder; {_describe(csv_path)}", arguments="dataset"
        )
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: manifest CSV not found; give a CSV with columns case_id,<channel>...,[mask]")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{csv_path}: not a readable CSV ({str(err).strip().splitlines()[0]}); give a CSV with columns case_id,<channel>...,[mask]") from err
    # cells are stripped: a manifest written with ", " separators must not give paths with a leading space
    table = table.rename(columns=str.strip).apply(lambda column: column.str.strip())
    if "case_id" not in table.columns:
        raise InputError(f"{csv_path}: no 'case_id' column; found columns {list(table.columns)}")
    channel_columns = [c for c in table.columns if c not in MANIFEST_EXTRA]
    if not channel_columns:
        raise InputError(f"{csv_path}: no channel columns besides case_id/mask")
    for line, case_id in enumerate(table["case_id"], start=2):  # line 1 is the header
        check_case_id(case_id, f"{csv_path} line {line}", "change it in the manifest's case_id column")
    counts = Counter(table["case_id"])
    dupes = sorted(c for c, n in counts.items() if n > 1)
    if dupes:
        raise InputError(
            f"{csv_path}: duplicate case_id value(s) {dupes} (each would overwrite the other's outputs); "
            "give every row its own case_id in the manifest"
        )

    def resolve(value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else csv_path.parent / path

    return [
        CaseRecord(
            row["case_id"],
            {c: resolve(row[c]) for c in channel_columns},
            resolve(row["mask"]) if row.get("mask") else None,
            brain_mask=resolve(row["brain_mask"]) if row.get("brain_mask") else None,
        )
        for _, row in table.iterrows()
    ]


READERS: dict[str, Callable[[str | Path], list[CaseRecord]]] = {
    "brats": read_brats,
    "atlas": read_atlas,
    "nnunet": read_nnunet,
    "manifest": read_manifest,
}

# Which channels make the anomaly map, per layout (ALGORITHM.md section 1); other layouts use all channels.
DEFAULT_MAP_CHANNELS = {"brats": BRATS_MAP_CHANNELS, "atlas": ("t1",)}


def read_cases(root: str | Path, dataset: str) -> list[CaseRecord]:
    """Read a cohort with the reader of ``dataset``; a mismatching layout names what was found instead."""
    if dataset not in READERS:
        raise InputError(f"dataset={dataset!r} is not one of {sorted(READERS)}", arguments="dataset")
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: input not found")
    if dataset != "manifest" and not root.is_dir():
        raise InputError(f"{root}: dataset={dataset!r} expects a folder; give dataset='manifest' for a CSV", arguments="dataset")
    records = READERS[dataset](root)
    _check_unique(records)
    return records


def detect_layout(root: str | Path) -> str | None:
    """Guess the layout of ``root``: 'brats', 'atlas', 'nnunet', 'manifest' or None."""
    root = Path(root)
    if root.is_file():
        return "manifest" if root.suffix == ".csv" else None
    if any(root.glob("*/*_flair.nii*")) or any(root.glob("*_flair.nii*")):
        return "brats"
    if any(root.rglob(f"*{ATLAS_SUFFIX}")):
        return "atlas"
    for folder in (root, root / "imagesTr", root / "imagesTs"):
        if folder.is_dir() and any(NNUNET_FILE.match(p.name) for p in folder.iterdir()):
            return "nnunet"
    return None


def _describe(root: Path) -> str:
    found = detect_layout(root) if root.exists() else None
    if found:
        return f"this looks like a '{found}' layout: rerun with dataset={found!r}"
    return "expected the layout described in docs/data.md"


def _first(folder: Path, stem: str) -> Path:
    """``folder/stem.gz`` if it exists, else ``folder/stem`` if that exists, else the ``.gz`` path."""
    gz = folder / f"{stem}.gz"
    return gz if gz.exists() or not (folder / stem).exists() else folder / stem


def _nnunet_dataset_json(root: Path) -> tuple[Path, tuple[str, ...]] | None:
    """(dataset.json, channel names) from nnU-Net's dataset.json (v2 ``channel_names`` or v1 ``modality``).

    None when there is no dataset.json beside or above ``root``, or it names no channels.

    Raises:
        InputError: the file is not JSON, or its channel names are not a mapping ``{"0": name, "1": name, ...}``.
    """
    for candidate in (root / "dataset.json", root.parent / "dataset.json"):
        if not candidate.is_file():
            continue
        fix = 'nnU-Net\'s dataset.json maps each channel index, from "0", to its name: {"0": "FLAIR", "1": "T1", ...}'
        meta = read_json(candidate, "fix the file, or remove it to name channels ch0000, ...")
        if not isinstance(meta, dict):
            raise InputError(f"{candidate}: holds a {type(meta).__name__}, not an object; {fix}")
        key = "channel_names" if meta.get("channel_names") else "modality"
        names = meta.get(key)
        if not names:
            continue
        if isinstance(names, list):
            raise InputError(f"{candidate}: {key} is a list; {fix}")
        if not isinstance(names, dict):
            raise InputError(f"{candidate}: {key} is a {type(names).__name__}; {fix}")
        expected = [str(i) for i in range(len(names))]
        if sorted(names, key=lambda k: (len(k), k)) != expected:
            raise InputError(
                f"{candidate}: {key} has keys {sorted(names)}, not \"0\" to \"{len(names) - 1}\"; number the channels "
                f'from "0" (file CASE_0000 is channel "0"); {fix}'
            )
        return candidate, tuple(str(names[k]).lower() for k in expected)
    return None


def records_for_inference(inputs: list[str | Path]) -> list[CaseRecord]:
    """Turn ``anofpdm segment -i`` arguments into cases.

    Accepted, in any mix: BraTS case folders; folders of cases of one of the dataset layouts;
    manifest CSVs; ATLAS ``*_T1w.nii.gz`` files; nnU-Net ``CASE_XXXX.nii.gz`` files (grouped by
    case); any other NIfTI file (a one-channel case named after the file). Two inputs that give
    the same case id are refused.
    """
    paths = [Path(p) for p in inputs]
    missing = [p for p in paths if not p.exists()]
    if missing:
        reason = missing_file_reason(missing[0])
        raise InputError(f"{missing[0]}: input not found" if reason.startswith("file not found") else f"{missing[0]}: {reason}")
    folders: list[CaseRecord] = []
    for path in paths:
        if path.is_dir():
            folders.extend(_folder_records(path))
        elif path.suffix.lower() == ".csv":
            folders.extend(read_manifest(path))
    files = [p for p in paths if not p.is_dir() and p.suffix.lower() != ".csv"]
    records: dict[str, CaseRecord] = {}
    singles: list[CaseRecord] = []
    atlas = [p for p in files if p.name.endswith(ATLAS_SUFFIX)]
    for path in files:
        match = NNUNET_FILE.match(path.name)
        if path.name.endswith(ATLAS_SUFFIX):
            continue
        elif match:
            case = check_case_id(match["case"], path, "rename the case's files (CASE_0000.nii.gz, ...)")
            record = records.setdefault(case, CaseRecord(case, {}))
            key = f"ch{int(match['channel']):04d}"
            if key in record.channels:
                raise InputError(
                    f"{path}: duplicate case id {case!r} ({record.channels[key]} and {path} are both its channel "
                    f"{match['channel']}); give the files of one case only, or rename one case's files"
                )
            record.channels[key] = path
        else:
            case_id = check_case_id(image_stem(path.name), path, "rename the file")
            singles.append(CaseRecord(case_id, {"image": path}))
    for record in records.values():
        record.channels = dict(sorted(record.channels.items()))
    found = [*_atlas_records(atlas), *records.values(), *singles]
    order = {path: i for i, path in enumerate(files)}
    found = [*folders, *sorted(found, key=lambda r: min(order.get(p, len(order)) for p in r.channels.values()))]
    _check_unique(found)
    return found


def _folder_records(folder: Path) -> list[CaseRecord]:
    """The cases of one ``segment -i`` folder: a BraTS case folder, or a cohort folder of a known layout."""
    if any(folder.glob(f"{folder.name}_flair.nii*")):
        return [_brats_record(folder)]
    layout = detect_layout(folder)
    if layout is None:
        raise InputError(f"{folder}: no cases found; {_describe(folder)}")
    return READERS[layout](folder)
