"""``anofpdm demo --layout atlas``: fresh ATLAS-layout phantom patients, segmented and evaluated end to end.

The bundled ATLAS model may not be in the package yet, so the demo's library path (:func:`run_demo`)
runs here with a tiny one-channel model trained for a few steps on two ATLAS-layout phantom patients.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import anofpdm_monai.bundled as bundled
from data_prep.phantom import generate_cohort
from pipelines.cli import main
from pipelines.demo import run_demo


@pytest.fixture(scope="module")
def tiny_atlas_model(tmp_path_factory):
    """A tiny-preset T1w model (3 training steps, a quick calibration of both families) on ATLAS-layout phantoms."""
    root = tmp_path_factory.mktemp("atlas")
    generate_cohort(root / "raw", "atlas", cases=2, healthy_fraction=0.0, seed=5, progress=False)
    store, model = root / "store", root / "model"
    assert main(["preprocess", "-i", str(root / "raw"), "-o", str(store), "--dataset", "atlas", "--size", "64",
                 "--split", "0.5,0.5,0", "--workers", "1"]) == 0  # fmt: skip
    assert main(["train", "-d", str(store), "-o", str(model), "--steps", "3", "--batch-size", "4",
                 "--checkpoint-every", "3", "--device", "cpu"]) == 0  # fmt: skip
    assert main(["calibrate", "-m", str(model), "-d", str(store), "--n-val", "12", "--steps", "40", "--stride", "20",
                 "--w-grid", "1,20", "--batch-size", "12", "--volume-cases", "1", "--device", "cpu"]) == 0  # fmt: skip
    return model


def test_atlas_demo_segments_and_evaluates_fresh_patients(tiny_atlas_model, tmp_path, capsys):
    assert run_demo(tmp_path, "atlas", 1, tiny_atlas_model, device="cpu", batch_size=16) == 0
    printed = capsys.readouterr().out
    assert "ATLAS-layout" in printed and "oracle intensity threshold on T1, lesions darker" in printed
    t1 = next((tmp_path / "phantom").rglob("*_T1w.nii.gz"))
    case = t1.name.split("_")[0]
    mask = nib.load(str(tmp_path / "segmentations" / f"{case}.nii.gz"))
    assert mask.shape == nib.load(str(t1)).shape == (197, 233, 189)
    assert np.allclose(mask.affine, nib.load(str(t1)).affine)
    assert (tmp_path / "segmentations" / f"{case}.png").is_file()
    summary = json.loads((tmp_path / "evaluation" / "summary.json").read_text())
    assert {"anofpdm-ddim-volume", "anofpdm-ddim", "threshold"} <= set(summary)
    # T1w stroke lesions are hypointense: the oracle cuts from below because of the sequence, not the labels
    assert summary["threshold"]["oracle_direction"] == "low"


def test_atlas_demo_without_the_bundled_model_says_so_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(bundled.BUNDLED_MODELS, "bundled-atlas", "no_such_model_folder")
    assert main(["demo", "--layout", "atlas", "-o", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bundled model 'bundled-atlas' is missing" in err and "\n" not in err
    assert not (tmp_path / "demo").exists(), "nothing is generated before the model is found"
