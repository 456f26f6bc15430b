"""Dataset readers: one per on-disk layout, each yielding one :class:`CaseRecord` per case.

* ``brats``: BraTS21 as shipped, ``ROOT/BraTS2021_XXXXX/BraTS2021_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz``.
* ``atlas``: ATLAS v2.0 as shipped (BIDS-like), ``..._space-MNI152NLin2009aSym_T1w.nii.gz`` with
  ``..._label-L_desc-T1lesion_mask.nii.gz`` beside it.
* ``nnunet``: ``imagesTr``/``imagesTs`` (or the folder itself) of ``CASE_0000.nii.gz`` ... one file per
  channel, labels ``CASE.nii.gz`` in a sibling ``labelsTr``/``labelsTs`` folder.
* ``manifest``: a CSV with ``case_id``, one column per channel and an optional ``mask`` column.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from anofpdm_monai.io import InputError

BRATS_CHANNELS = ("flair", "t1", "t1ce", "t2")
BRATS_MAP_CHANNELS = ("flair", "t2")
ATLAS_SUFFIX = "_T1w.nii.gz"
ATLAS_MASK_SUFFIX = "_label-L_desc-T1lesion_mask.nii.gz"
NNUNET_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")
# The lesion labels each layout defines; a mask holding other values is refused (all are merged into one class).
LESION_LABELS = {"brats": (1, 2, 4), "atlas": (1,)}


@dataclass
class CaseRecord:
    """One case: its id, the channel files in a fixed order, and the lesion file if any."""

    case_id: str
    channels: dict[str, Path]
    label: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)


def read_brats(root: str | Path) -> list[CaseRecord]:
    """Cases of a BraTS21 folder; a case folder lacking a channel file still yields a record (checked at load)."""
    root = Path(root)
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _is_brats_case(p)):
        case = folder.name
        channels = {c: _first(folder, f"{case}_{c}.nii") for c in BRATS_CHANNELS}
        seg = _first(folder, f"{case}_seg.nii")
        records.append(CaseRecord(case, channels, seg if seg.exists() else None))
    if not records:
        raise InputError(f"{root}: no BraTS21 case folders found; {_describe(root)}")
    return records


def _is_brats_case(folder: Path) -> bool:
    """A folder holding any ``<folder>_{flair,t1,t1ce,t2,seg}.nii[.gz]`` (so a case missing one channel is kept and reported)."""
    return any((folder / f"{folder.name}_{c}.nii{gz}").exists() for c in (*BRATS_CHANNELS, "seg") for gz in ("", ".gz"))


def read_atlas(root: str | Path) -> list[CaseRecord]:
    """Cases of an ATLAS v2.0 tree (searched recursively for ``*_T1w.nii.gz``)."""
    root = Path(root)
    records = []
    for t1 in sorted(root.rglob(f"*{ATLAS_SUFFIX}")):
        subject = t1.name.split("_")[0]
        mask = t1.with_name(t1.name[: -len(ATLAS_SUFFIX)] + ATLAS_MASK_SUFFIX)
        records.append(CaseRecord(subject, {"t1": t1}, mask if mask.exists() else None))
    if not records:
        raise InputError(f"{root}: no ATLAS v2.0 '*{ATLAS_SUFFIX}' files found; {_describe(root)}")
    return records


def read_nnunet(root: str | Path) -> list[CaseRecord]:
    """Cases of an nnU-Net-style folder (``imagesTr`` inside ``root`` or ``root`` itself)."""
    root = Path(root)
    images = next((root / d for d in ("imagesTr", "imagesTs") if (root / d).is_dir()), root)
    files: dict[str, dict[int, Path]] = {}
    for path in sorted(images.iterdir()):
        match = NNUNET_FILE.match(path.name)
        if match:
            files.setdefault(match["case"], {})[int(match["channel"])] = path
    if not files:
        raise InputError(f"{images}: no nnU-Net 'CASE_0000.nii.gz' files found; {_describe(images)}")
    # The cohort's channel count: dataset.json's if it has one, else the most common count (ties: the larger).
    # One odd case must not change the channels of every other case: its missing files are reported at load,
    # and its extra files are kept so that the channel-count check names the case.
    counts = Counter(max(c) + 1 for c in files.values())
    names = _nnunet_channel_names(root, None) or _nnunet_channel_names(root, max(counts, key=lambda n: (counts[n], n)))
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
        raise InputError(f"{csv_path}: --dataset manifest expects a CSV file, not a folder; {_describe(csv_path)}")
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: manifest CSV not found; give a CSV with columns case_id,<channel>...,[mask]")
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if "case_id" not in table.columns:
        raise InputError(f"{csv_path}: no 'case_id' column; found columns {list(table.columns)}")
    channel_columns = [c for c in table.columns if c not in ("case_id", "mask")]
    if not channel_columns:
        raise InputError(f"{csv_path}: no channel columns besides case_id/mask")

    def resolve(value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else csv_path.parent / path

    return [
        CaseRecord(
            row["case_id"],
            {c: resolve(row[c]) for c in channel_columns},
            resolve(row["mask"]) if row.get("mask") else None,
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
        raise ValueError(f"--dataset {dataset!r} is not one of {sorted(READERS)}")
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: input not found")
    if dataset != "manifest" and not root.is_dir():
        raise InputError(f"{root}: --dataset {dataset} expects a folder; give --dataset manifest for a CSV")
    return READERS[dataset](root)


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
        return f"this looks like a '{found}' layout: rerun with --dataset {found}"
    return "expected the layout described in docs/data.md"


def _first(folder: Path, stem: str) -> Path:
    """``folder/stem.gz`` if it exists, else ``folder/stem`` if that exists, else the ``.gz`` path."""
    gz = folder / f"{stem}.gz"
    return gz if gz.exists() or not (folder / stem).exists() else folder / stem


def _nnunet_channel_names(root: Path, count: int | None) -> tuple[str, ...]:
    """Channel names from nnU-Net's dataset.json (v2 ``channel_names`` or v1 ``modality``), else ch0000...

    ``count=None``: all of dataset.json's channels, or () when there is no dataset.json.
    """
    for candidate in (root / "dataset.json", root.parent / "dataset.json"):
        if candidate.is_file():
            meta = json.loads(candidate.read_text())
            names = meta.get("channel_names") or meta.get("modality") or {}
            if count is None:
                count = len(names)
            if len(names) >= count:
                return tuple(str(names[str(i)]).lower() for i in range(count))
    return tuple(f"ch{i:04d}" for i in range(count or 0))


def records_for_inference(inputs: list[str | Path]) -> list[CaseRecord]:
    """Turn ``anofpdm segment -i`` arguments into cases.

    Accepted: a BraTS case folder; an ATLAS ``*_T1w.nii.gz`` file; one or more nnU-Net
    ``CASE_XXXX.nii.gz`` files (grouped by case); a folder of cases of one of the dataset layouts;
    or any other single NIfTI file (a one-channel case named after the file).
    """
    paths = [Path(p) for p in inputs]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise InputError(f"{missing[0]}: input not found")
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        if any(folder.glob(f"{folder.name}_flair.nii*")):
            return [r for r in read_brats(folder.parent) if r.case_id == folder.name]
        layout = detect_layout(folder)
        if layout is None:
            raise InputError(f"{folder}: no cases found; {_describe(folder)}")
        return READERS[layout](folder)
    records: dict[str, CaseRecord] = {}
    for path in paths:
        match = NNUNET_FILE.match(path.name)
        if path.name.endswith(ATLAS_SUFFIX):
            mask = path.with_name(path.name[: -len(ATLAS_SUFFIX)] + ATLAS_MASK_SUFFIX)
            records[path.name.split("_")[0]] = CaseRecord(path.name.split("_")[0], {"t1": path}, mask if mask.exists() else None)
        elif match:
            record = records.setdefault(match["case"], CaseRecord(match["case"], {}))
            record.channels[f"ch{int(match['channel']):04d}"] = path
        else:
            case_id = path.name.split(".nii")[0]
            records[case_id] = CaseRecord(case_id, {"image": path})
    for record in records.values():
        record.channels = dict(sorted(record.channels.items()))
    return list(records.values())
