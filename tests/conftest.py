"""Shared fixtures: tiny phantom cohorts, stores and models, built once per test session."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import pytest
import torch

from data_prep.phantom import generate_cohort

torch.set_num_threads(1)  # tests run tiny tensors; one thread avoids oversubscription with subprocesses
# --precision auto without timing the network (bf16 where the CPU advertises it, the default layout), and no cache
# written into the user's home; tests of the timing set these themselves (subprocesses inherit them)
os.environ["ANOFPDM_MEASURE"] = "0"
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="anofpdm_test_cache_")


@pytest.fixture(scope="session")
def brats_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four BraTS-layout phantom cases, one of them healthy."""
    root = tmp_path_factory.mktemp("brats_raw")
    generate_cohort(root, "brats", cases=4, healthy_fraction=0.25, seed=123, progress=False)
    return root


@pytest.fixture(scope="session")
def brats_store(brats_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cohort above preprocessed at 64 px (the tiny preset's size)."""
    from pipelines import preprocess

    store = tmp_path_factory.mktemp("brats_store")
    args = argparse.Namespace(
        input=str(brats_cohort), output=str(store), dataset="brats", size=64, split="0.5,0.25,0.25", seed=0,
        register_to=None, map_channels=None, workers=1, allow_skips=False, no_crop=False, crop_margin=5.0, brain_mask=None,
    )
    assert preprocess.run(args) == 0
    return store


@pytest.fixture(scope="session")
def tiny_model(brats_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-preset model folder trained for a few steps on ``brats_store``, with a quick calibration.

    Its outputs are not meaningful segmentations; it exercises every file and code path.
    """
    from pipelines.cli import main

    model = tmp_path_factory.mktemp("tiny_model") / "model"
    assert main(["train", "-d", str(brats_store), "-o", str(model), "--steps", "3", "--batch-size", "4",
                 "--checkpoint-every", "3", "--device", "cpu"]) == 0  # fmt: skip
    assert main(["calibrate", "-m", str(model), "-d", str(brats_store), "--n-val", "12", "--steps", "40",
                 "--stride", "20", "--w-grid", "1,2", "--batch-size", "12", "--device", "cpu"]) == 0  # fmt: skip
    return model


@pytest.fixture(scope="session")
def tiny_model_d1(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_model`` with D = 1 for every map channel (shared by tests about files and bookkeeping).

    Three training steps leave the network's output layer near MONAI's zero initialisation, so the
    calibrated D is ~1e-9 (or 0, which inference refuses) and the dynamic quantile hangs on the last
    bits of dmax. This copy's dynamic threshold is well conditioned (quantile 0.98 throughout);
    weights, config and thr_01 are the trained model's. Tests must not write into it.
    """
    import json
    import shutil

    folder = tmp_path_factory.mktemp("model_d1") / "model"
    shutil.copytree(tiny_model, folder)
    calibration = json.loads((folder / "calibration.json").read_text())
    calibration["D"] = [1.0] * len(calibration["D"])
    (folder / "calibration.json").write_text(json.dumps(calibration))
    return folder
