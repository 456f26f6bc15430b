"""Behaviour pin (issue 21): what ``anofpdm segment`` writes with the bundled model does not change under refactoring.

The hashes were taken on the code before the method registry was reworked: one BraTS-layout phantom
patient (seed 21, the only case of its cohort) cut to the 20 axial planes around its tumour (to keep
the test cheap: 20 slices of 10 network calls each), the bundled model with its calibrations as they
are, on the CPU in fp32 with one torch thread. The NIfTI data arrays are hashed (dtype, shape,
bytes), not the gzip files, whose headers carry a timestamp.

Changed on purpose once (issue 27): the volume family's mask, now decided on the input grid with the
bundled model's recalibrated volume section (minimum lesion size by the false-positive rate); its
anomaly map and the paper family's files kept their hashes.

Float results are only reproducible on the same build: the pin is skipped, saying so, under another
torch version than the one it was taken with.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from data_prep.phantom import generate_cohort
from pipelines.cli import main

PINNED_TORCH = "2.13.0+cpu"
CASE = "BraTS2021_00000"
PLANES = slice(84, 104)  # the tumour's centre is at z = 94 (phantom_lesions.json)
SETTINGS = ("--device", "cpu", "--precision", "fp32", "--threads", "1", "--seed", "0")
# method -> (sha256 of the mask array, sha256 of the anomaly-map array), as written by segment
PINNED = {
    "anofpdm-ddim": ("9464343695d30c10fa7abc7dd4d3022946be42acc8de6dd859cc6957020510fb",
                     "7f2066f5c802d10d2027cf2330f4cbe74648b94010dea332142e2218228a3aac"),
    "anofpdm-ddim-volume": ("2820200ddb967ff4722f8ec86042cd80ec58720848db5fe7035836b53c53b9cf",
                            "470b3f5275d6b8c73b6f35ff196bc0b948e1e3ec6701c7a3a50f778bb1f3d4bf"),
}


def array_sha256(path: Path) -> str:
    """sha256 of a NIfTI file's data array: its dtype, shape and bytes (C order)."""
    data = np.ascontiguousarray(np.asanyarray(nib.load(str(path)).dataobj))
    digest = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    digest.update(data.tobytes())
    return digest.hexdigest()


def pin_case(folder: Path) -> Path:
    """Write the pinned case (every file cut to :data:`PLANES`, affines following) into ``folder``; returns its cohort folder."""
    full, root = folder / "full", folder / "cut"
    generate_cohort(full, "brats", cases=1, healthy_fraction=0.0, seed=21, progress=False)
    (root / CASE).mkdir(parents=True)
    for path in sorted((full / CASE).glob("*.nii.gz")):
        nib.save(nib.load(str(path)).slicer[:, :, PLANES], str(root / CASE / path.name))
    return root


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pin_case(tmp_path_factory.mktemp("pin"))


@pytest.mark.skipif(torch.__version__ != PINNED_TORCH, reason=f"the pin was taken with torch {PINNED_TORCH}")
@pytest.mark.parametrize("method", list(PINNED))
def test_bundled_model_writes_the_pinned_mask_and_map(phantom_case: Path, tmp_path: Path, method: str):
    assert main(["segment", "-m", "bundled", "-i", str(phantom_case), "-o", str(tmp_path), "--method", method, *SETTINGS]) == 0
    mask, anomaly = tmp_path / f"{CASE}.nii.gz", tmp_path / f"{CASE}_anomaly.nii.gz"
    assert np.asanyarray(nib.load(str(mask)).dataobj).any(), "the pinned case must have a non-empty mask to pin anything"
    assert (array_sha256(mask), array_sha256(anomaly)) == PINNED[method]
