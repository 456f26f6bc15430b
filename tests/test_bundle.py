"""``anofpdm export-bundle`` and the MONAI bundle it writes.

The bundle of the trained ``tiny_model`` runs under ``python -m monai.bundle run`` in a subprocess on one
phantom case with few steps, and its masks and maps must be those of ``anofpdm segment`` with the
same settings, byte for byte and on the same affine.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from anofpdm_monai.bundle import PHANTOM_DATA, UNKNOWN_DATA, bundle_model, export_bundle
from anofpdm_monai.config import ModelConfig
from anofpdm_monai.io import InputError, safe_torch_load
from anofpdm_monai.networks import load_model_folder, network_arguments
from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"steps": "8", "stride": "4", "device": "cpu", "precision": "fp32"}  # the same settings for both paths
# The mandatory keys of metadata.json (MONAI bundle specification) and of each tensor format specifier.
META_KEYS = {"version", "monai_version", "pytorch_version", "numpy_version", "optional_packages_version", "task",
             "description", "authors", "copyright", "network_data_format"}  # fmt: skip
TENSOR_KEYS = {"type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data", "channel_def"}


@pytest.fixture(scope="module")
def bundle(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "anofpdm_bundle"
    assert main(["export-bundle", "-m", str(tiny_model), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def one_case(brats_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset folder holding one phantom BraTS case with a lesion, cut to 12 axial slices through the lesion
    and every third voxel in plane (nibabel's slicer keeps the affine right), so that inference takes seconds."""
    case = next(p for p in sorted(brats_cohort.iterdir()) if p.is_dir() and np.asanyarray(nib.load(p / f"{p.name}_seg.nii.gz").dataobj).any())
    lesion_slices = np.flatnonzero(np.asanyarray(nib.load(case / f"{case.name}_seg.nii.gz").dataobj).any(axis=(0, 1)))
    middle = int(lesion_slices.mean())
    cases = tmp_path_factory.mktemp("bundle_cases")
    (cases / case.name).mkdir()
    for channel in ("flair", "t1", "t1ce", "t2"):
        name = f"{case.name}_{channel}.nii.gz"
        nib.save(nib.load(case / name).slicer[::3, ::3, middle - 6 : middle + 6], cases / case.name / name)
    return cases


def parsed(bundle: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), "device": "cpu", **overrides})
    parser.parse()
    return parser


def test_bundle_layout_and_model_files_are_the_model_folders(bundle, tiny_model):
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md", "docs/license.txt"):
        assert (bundle / name).is_file(), name
    for name in ("model.pt", "config.json", "calibration.json"):
        assert (bundle / "models" / name).read_bytes() == (tiny_model / name).read_bytes()
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o777 & ~umask  # not left private like a temporary folder


def test_metadata_states_inputs_outputs_data_and_licence(bundle, tiny_model):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    config = ModelConfig.load(tiny_model / "config.json")
    assert META_KEYS <= set(meta)
    assert meta["monai_version"] and meta["pytorch_version"] and "+" not in meta["pytorch_version"]
    assert meta["license"] == "Apache-2.0"
    assert meta["data_source"] == UNKNOWN_DATA  # a user's model folder does not record its data
    image = meta["network_data_format"]["inputs"]["image"]
    assert TENSOR_KEYS <= set(image)
    assert image["channel_def"] == {str(i): name for i, name in enumerate(config.preprocess.channel_names)}
    assert image["num_channels"] == config.network.in_channels
    assert image["spatial_shape"] == [config.preprocess.image_size] * 2 and image["value_range"] == [-1, 1]
    assert image["orientation"] == "RAS" and f"{config.preprocess.percentile:g}th percentile" in image["intensity"]
    outputs = meta["network_data_format"]["outputs"]
    assert set(outputs) == {"mask", "anomaly_map"} and all(TENSOR_KEYS <= set(o) for o in outputs.values())
    assert outputs["mask"]["dtype"] == "uint8"


def test_bundled_model_metadata_names_the_phantom_cohort(tmp_path):
    meta = json.loads((export_bundle("bundled", tmp_path / "b") / "configs" / "metadata.json").read_text())
    assert meta["data_source"] == PHANTOM_DATA and "no real patient" in meta["data_source"]
    assert "anofpdm-ddim-volume" in meta["methods"]


def test_network_arguments_are_named_and_the_exported_weights_load_into_them(bundle, tiny_model):
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    config = ModelConfig.load(tiny_model / "config.json")
    network_def = inference["network_def"]
    assert network_def["_target_"] == "monai.networks.nets.DiffusionModelUNet"
    assert {k: v for k, v in network_def.items() if k != "_target_"} == network_arguments(config.network)
    network = parsed(bundle).get_parsed_content("network_def")
    network.load_state_dict(safe_torch_load(bundle / "models" / "model.pt"))  # strict: every key and shape fits
    reference, _ = load_model_folder(tiny_model)
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), reference.state_dict().values()))
    model = parsed(bundle).get_parsed_content("model")
    assert model.config == config


def test_an_edited_network_argument_is_refused_in_one_line(bundle):
    parser = parsed(bundle, **{"network_def::channels": [32, 64, 128]})
    with pytest.raises(InputError, match="weights do not fit") as err:
        bundle_model(bundle / "models", parser.get_parsed_content("network_def"), parser.get_parsed_content("model_config"), "cpu")
    assert "\n" not in str(err.value)


def test_monai_bundle_run_writes_the_masks_of_segment(bundle, tiny_model, one_case, tmp_path):
    segment_out, bundle_out = tmp_path / "segment", tmp_path / "bundle_run"
    flags = [f"--{k}={v}" for k, v in QUICK.items()]
    assert main(["segment", "-m", str(tiny_model), "-i", str(one_case), "-o", str(segment_out), "--threads", "1"] + flags) == 0
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
               "--bundle_root", str(bundle), "--dataset_dir", str(one_case), "--output_dir", str(bundle_out),
               "--progress", "False"] + [a for k, v in QUICK.items() for a in (f"--{k}", v)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    written = sorted(p.name for p in segment_out.glob("*.nii.gz"))
    assert len(written) == 2 and sorted(p.name for p in bundle_out.glob("*.nii.gz")) == written
    assert np.asanyarray(nib.load(next(segment_out.glob("*_anomaly.nii.gz"))).dataobj).any()  # a map to compare
    for name in written:
        ours, theirs = nib.load(bundle_out / name), nib.load(segment_out / name)
        assert np.array_equal(ours.affine, theirs.affine)
        assert ours.get_data_dtype() == theirs.get_data_dtype()
        assert np.array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj)), name


def test_refusals_exit_2_and_write_nothing(tiny_model, tmp_path, capsys):
    missing = tmp_path / "no_model"
    assert main(["export-bundle", "-m", str(missing), "-o", str(tmp_path / "b1")]) == 2
    message = capsys.readouterr().err
    assert "not found" in message and "as --model" in message and not (tmp_path / "b1").exists()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["export-bundle", "-m", str(tiny_model), "-o", str(busy)]) == 2
    message = capsys.readouterr().err
    assert "not an empty folder" in message and "as --output" in message
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    uncalibrated = tmp_path / "uncalibrated"
    uncalibrated.mkdir()
    for name in ("config.json", "model.pt"):
        shutil.copyfile(tiny_model / name, uncalibrated / name)
    assert main(["export-bundle", "-m", str(uncalibrated), "-o", str(tmp_path / "b2")]) == 2
    assert "calibrate the model first" in capsys.readouterr().err and not (tmp_path / "b2").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export-bundle", "-m", str(tiny_model), "-o", str(empty)]) == 0  # an empty folder is fine
    assert (empty / "configs" / "inference.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
