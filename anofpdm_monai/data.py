"""The preprocessed store: per-patient memory-mappable arrays plus one manifest table.

Layout of a store folder ``PREP``::

    PREP/settings.json           PreprocessConfig + split settings
    PREP/manifest.csv            patient, slice, split, label, lesion_pixels (one row per brain slice)
    PREP/images/<patient>.npy    (N, C, S, S) float16 in [-1, 1]
    PREP/masks/<patient>.npy     (N, S, S) uint8 (all zero when the case has no lesion file)
    PREP/cases/<patient>.json    slice indices, source files, the slices' voxel size in mm; written last: marks the case done
    PREP/skipped.csv             cases that could not be read, with the reason

Every file is written to a temporary name and renamed, so an interrupted run leaves only
complete patients behind, and a rerun does the rest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from anofpdm_monai.config import PreprocessConfig, build_section
from anofpdm_monai.io import (
    InputError,
    atomic_save_dataframe,
    atomic_save_npy,
    atomic_write_json,
    atomic_write_text,
    check_case_id,
    json_text,
)
from anofpdm_monai.transforms import PreprocessedCase

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["patient", "slice", "split", "label", "lesion_pixels"]
SETTINGS_FILE = "settings.json"  # PREP/settings.json: the preprocessing and split settings
MANIFEST_FILE = "manifest.csv"  # PREP/manifest.csv: one row per brain slice (MANIFEST_COLUMNS)
SKIPPED_FILE = "skipped.csv"  # PREP/skipped.csv: the cases that could not be read


def case_done(store: Path, patient: str, inputs: dict[str, list[int]] | None = None) -> bool:
    """Whether ``patient`` was completely written to ``store`` (from the input files ``inputs``, when given).

    Args:
        inputs: :func:`input_fingerprint` of the case's files now; a case made from other files, or from
            files changed since (size or modification time), is not done.
    """
    check_case_id(patient, store)
    path = store / "cases" / f"{patient}.json"
    if not path.is_file():
        return False
    if inputs is None:
        return True
    try:
        return json.loads(path.read_text()).get("inputs") == inputs
    except (ValueError, OSError, AttributeError):
        return False


def input_fingerprint(paths: Sequence[str | Path | None]) -> dict[str, list[int]]:
    """``{absolute path: [bytes, modification time in ns]}`` of a case's input files (missing ones left out)."""
    found = {}
    for path in paths:
        if path is not None and Path(path).is_file():
            st = os.stat(path)
            found[os.path.abspath(path)] = [int(st.st_size), int(st.st_mtime_ns)]
    return found


def write_case(store: Path, patient: str, case: PreprocessedCase, sources: dict[str, str],
               inputs: dict[str, list[int]] | None = None) -> None:
    """Write one preprocessed case; the JSON written last marks it complete (``inputs``: :func:`input_fingerprint`)."""
    check_case_id(patient, store)
    images = case.images.numpy().astype(np.float16)
    masks = (case.masks if case.masks is not None else torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool))
    atomic_save_npy(images, store / "images" / f"{patient}.npy")
    atomic_save_npy(masks.numpy().astype(np.uint8), store / "masks" / f"{patient}.npy")
    meta = {
        "slices": case.geometry.slice_indices.tolist(),
        "has_label": case.masks is not None,
        "sources": sources,
        "slice_voxel_mm": list(case.geometry.slice_voxel_mm),
        "crop_box": None if case.geometry.crop_box is None else [list(a) for a in case.geometry.crop_box],
        "inputs": inputs,
    }
    atomic_write_text(store / "cases" / f"{patient}.json", json_text(meta, indent=None))


def assign_splits(patients: list[str], split: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Seeded patient-level split: every slice of a patient lands in the same split.

    Args:
        patients: the patient ids.
        split: the (train, val, test) fractions of the patients, summing to 1.
        seed: seed of the permutation.
    """
    if len(split) != 3 or any(f < 0 for f in split) or abs(sum(split) - 1.0) > 1e-6:
        raise InputError(f"split={split}: give three non-negative fractions (train, val, test) summing to 1", arguments="split")
    order = np.random.default_rng(seed).permutation(sorted(patients))
    n = len(order)
    n_train = int(round(split[0] * n))
    n_val = int(round(split[1] * n))
    if split[1] > 0 and n_val == 0 and n - n_train > 1:
        n_val = 1
    return {str(patient): "train" if i < n_train else ("val" if i < n_train + n_val else "test") for i, patient in enumerate(order)}


def write_manifest(store: Path, split_of: dict[str, str]) -> pd.DataFrame:
    """Build ``manifest.csv`` from the completed cases (one row per brain slice)."""
    rows = []
    for patient in sorted(split_of):
        meta = json.loads((store / "cases" / f"{patient}.json").read_text())
        masks = np.load(store / "masks" / f"{patient}.npy", mmap_mode="r")
        pixels = masks.reshape(masks.shape[0], -1).sum(axis=1)
        for slice_index, lesion in zip(meta["slices"], pixels):
            rows.append((patient, int(slice_index), split_of[patient], int(lesion > 0), int(lesion)))
    table = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    atomic_save_dataframe(table, store / MANIFEST_FILE)
    return table


def write_settings(store: Path, config: PreprocessConfig, split: tuple[float, float, float], seed: int) -> None:
    settings = {"preprocess": asdict(config), "split": list(split), "seed": seed}
    atomic_write_json(store / SETTINGS_FILE, settings)


class PreprocessedStore:
    """Read access to a store written by ``anofpdm preprocess``.

    Args:
        root: the store folder.

    Raises:
        InputError: the folder is missing, or has no manifest or no slices.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest = self.root / MANIFEST_FILE
        settings = self.root / SETTINGS_FILE
        if not manifest.is_file() or not settings.is_file():
            raise InputError(
                f"{self.root}: not a preprocessed store (no {MANIFEST_FILE}/{SETTINGS_FILE}); "
                "create one with: anofpdm preprocess -i RAW -o PREP --dataset brats"
            )
        self.manifest = pd.read_csv(manifest, dtype={"patient": str})
        if self.manifest.empty:
            raise InputError(f"{manifest}: the store holds no slices; rerun anofpdm preprocess on a cohort with brain images")
        for patient in self.manifest["patient"].unique():
            check_case_id(patient, manifest, "the patient column names the store's files: rerun anofpdm preprocess")
        try:
            self.settings = json.loads(settings.read_text())
            self.config = build_section(PreprocessConfig, self.settings.get("preprocess"), "preprocess")
        except (ValueError, AttributeError) as err:  # JSON errors are ValueErrors; a non-object has no .get
            detail = str(err).removeprefix("preprocess.")
            raise InputError(f"{settings}: {detail}; this is not a store anofpdm preprocess wrote: rerun it") from err
        self._images: dict[str, np.ndarray] = {}
        self._masks: dict[str, np.ndarray] = {}
        # Row of each manifest entry inside its patient's arrays.
        self.manifest["row"] = self.manifest.groupby("patient").cumcount()

    @property
    def num_channels(self) -> int:
        return len(self.config.channel_names)

    def images(self, patient: str) -> np.ndarray:
        """(N, C, S, S) float16 memory map of ``patient``'s slices."""
        if patient not in self._images:
            self._images[patient] = np.load(self.root / "images" / f"{patient}.npy", mmap_mode="r")
        return self._images[patient]

    def masks(self, patient: str) -> np.ndarray:
        """(N, S, S) uint8 memory map of ``patient``'s lesion masks."""
        if patient not in self._masks:
            self._masks[patient] = np.load(self.root / "masks" / f"{patient}.npy", mmap_mode="r")
        return self._masks[patient]

    def rows(self, split: str | None = None) -> pd.DataFrame:
        """Manifest rows of ``split`` (all rows when None)."""
        if split is None:
            return self.manifest
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; choose one of {SPLITS}")
        return self.manifest[self.manifest["split"] == split]

    def sample_rows(self, split: str, max_rows: int, seed: int, purpose: str) -> pd.DataFrame:
        """A seeded sample of at most ``max_rows`` manifest rows of ``split`` (in manifest order).

        Raises:
            InputError: the split is empty (``purpose`` says what the rows were wanted for).
        """
        rows = self.rows(split)
        if rows.empty:
            raise InputError(f"{self.root}: the '{split}' split holds no slices, needed {purpose}; preprocess again with split fractions that give {split} patients")
        if len(rows) > max_rows:
            rows = rows.sample(n=max_rows, random_state=seed).sort_index()
        return rows

    def case_meta(self, patient: str) -> dict:
        return json.loads((self.root / "cases" / f"{patient}.json").read_text())

    def load_slices(self, rows: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (N, C, S, S) float32, masks (N, S, S) bool and labels (N,) long of the given manifest rows."""
        images = [self.images(p)[r] for p, r in zip(rows["patient"], rows["row"])]
        masks = [self.masks(p)[r] for p, r in zip(rows["patient"], rows["row"])]
        return (
            torch.from_numpy(np.stack(images).astype(np.float32)),
            torch.from_numpy(np.stack(masks).astype(bool)),
            torch.tensor(rows["label"].to_numpy(), dtype=torch.long),  # copies: pandas may hand out a read-only array
        )


class SliceDataset(Dataset):
    """Slices of one split as ``(image (C, S, S) float32, label () long)`` pairs, read from the memory maps."""

    def __init__(self, store: PreprocessedStore, split: str = "train") -> None:
        self.store = store
        self.rows = store.rows(split).reset_index(drop=True)
        if self.rows.empty:
            raise InputError(f"{store.root}: the '{split}' split holds no slices; preprocess more cases or with other split fractions")
        self.patients = self.rows["patient"].to_numpy()
        self.row_in_patient = self.rows["row"].to_numpy()
        self.labels = self.rows["label"].to_numpy()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.store.images(self.patients[index])[self.row_in_patient[index]]
        return torch.from_numpy(image.astype(np.float32)), torch.tensor(int(self.labels[index]))
