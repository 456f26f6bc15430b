"""Guarantee 8: a model folder's config.json and calibration.json are checked field by field on load.

A hand-edited or damaged settings file must not run: a NaN or negative ``thr_01`` would call every
slice healthy and write empty masks with exit code 0, and an ``image_size`` of 100000 would try to
allocate about 160 GB. Every field is checked for type, range and finiteness before anything runs,
and the error is one line naming the file, the field and the fix (exit code 2). The output folder is
not even created.

The model folder here is built from scratch (random weights, a made-up calibration): its outputs
mean nothing, but every file is as ``train`` and ``calibrate`` write it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from anofpdm_monai.calibration import Calibration
from anofpdm_monai.config import ModelConfig, PreprocessConfig, network_preset
from anofpdm_monai.io import InputError
from anofpdm_monai.networks import build_network

from . import volumes as V

CALIBRATION = dict(w=1.0, thr_01=0.5, D=[0.1, 0.1], steps=20, stride=10, encoding="ddim",
                   map_channels=["flair", "t2"], map_channel_indices=[0, 3])  # fmt: skip


def make_model(folder: Path) -> Path:
    """A tiny-preset model folder (config.json, model.pt, calibration.json) with random weights."""
    folder.mkdir(parents=True)
    config = ModelConfig(network=network_preset("tiny", 4), preprocess=PreprocessConfig(image_size=64))
    config.save(folder / "config.json")
    torch.manual_seed(0)
    torch.save(build_network(config.network).state_dict(), folder / "model.pt")
    Calibration(**CALIBRATION).save(folder / "calibration.json")
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("settings") / "model")


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("settings_case")
    V.write_case(root, "P1")
    return root / "P1"


def edited_model(model: Path, tmp_path: Path, file: str, edit) -> Path:
    """A copy of ``model`` whose ``file`` (config.json or calibration.json) went through ``edit(dict)``."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    data = json.loads((copy / file).read_text())
    edit(data)
    (copy / file).write_text(json.dumps(data))  # allow_nan: a NaN is written as the bare token NaN
    return copy


def segment(model: Path, case: Path, out: Path) -> tuple[int, str]:
    code, _, err = V.run_cli(["segment", "-m", str(model), "-i", str(case), "-o", str(out), "--device", "cpu"])
    return code, err


def test_the_untouched_model_folder_segments(model, case, tmp_path):
    code, err = segment(model, case, tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "P1.nii.gz").is_file()


def _set(path: str, value):
    def edit(data):
        *parents, last = path.split(".")
        target = data
        for p in parents:
            target = target[p]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value

    return edit


DELETE = object()

CALIBRATION_FAULTS = {
    "thr_nan": ("thr_01", math.nan),
    "thr_negative": ("thr_01", -0.5),
    "thr_above_one": ("thr_01", 1.5),
    "thr_text": ("thr_01", "0.5"),
    "D_text": ("D", "0.1,0.1"),
    "D_short": ("D", [0.1]),
    "D_zero": ("D", [0.0, 0.1]),
    "D_nan": ("D", [math.nan, 0.1]),
    "D_infinite": ("D", [math.inf, 0.1]),
    "w_nan": ("w", math.nan),
    "w_negative": ("w", -1.0),
    "steps_zero": ("steps", 0),
    "steps_fraction": ("steps", 2.5),
    "stride_zero": ("stride", 0),
    "encoding": ("encoding", "ddxm"),
    "inversion": ("inversion", "other"),
    "include_end_step": ("include_end_step", "yes"),
    "indices": ("map_channel_indices", [0, 9]),
    "missing_w": ("w", DELETE),
    "unknown_field": ("colour", "blue"),
}


@pytest.mark.parametrize("fault", list(CALIBRATION_FAULTS))
def test_bad_calibration_field_one_line_and_nothing_written(model, case, tmp_path, fault):
    field, value = CALIBRATION_FAULTS[fault]
    broken = edited_model(model, tmp_path, "calibration.json", _set(field, value))
    out = tmp_path / "out"
    code, err = segment(broken, case, out)
    assert code == 2, err
    lines = V.lines(err)
    assert len(lines) == 1, err
    assert str(broken / "calibration.json") in lines[0] and field in lines[0], lines[0]
    assert "anofpdm calibrate" in lines[0], f"the line does not say how to fix it: {lines[0]}"
    assert not out.exists(), "nothing may be written for a refused model folder"


def test_calibration_load_names_file_and_field(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({**CALIBRATION, "thr_01": None}))
    with pytest.raises(InputError, match=r"calibration\.json: .*thr_01 = None"):
        Calibration.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(InputError, match=r"calibration\.json: .*object"):
        Calibration.load(path)


def test_calibration_whose_D_does_not_fit_the_config(model, case, tmp_path):
    """len(D) must equal the number of map channels in config.json (here 2: flair, t2)."""
    def edit(data):
        data.update(D=[0.1, 0.1, 0.1], map_channels=["flair", "t1", "t2"], map_channel_indices=[0, 1, 3])

    broken = edited_model(model, tmp_path, "calibration.json", edit)
    code, err = segment(broken, case, tmp_path / "out")
    assert code == 2 and len(V.lines(err)) == 1, err
    assert "calibration.json" in err and "D" in err and "config.json" in err, err


CONFIG_FAULTS = {
    "net_size_negative": ("network.image_size", -64),
    "net_size_huge": ("network.image_size", 100000),
    "net_size_not_divisible": ("network.image_size", 66),
    "net_size_text": ("network.image_size", "64"),
    "net_in_channels": ("network.in_channels", 0),
    "net_widths": ("network.channels", [32, -64, 64]),
    "net_groups": ("network.norm_num_groups", 0),
    "net_res_blocks": ("network.num_res_blocks", 0),
    "pre_size_negative": ("preprocess.image_size", -64),
    "pre_size_huge": ("preprocess.image_size", 100000),
    "percentile_nan": ("preprocess.percentile", math.nan),
    "percentile_zero": ("preprocess.percentile", 0),
    "percentile_above": ("preprocess.percentile", 150),
    "brain_fraction": ("preprocess.min_brain_fraction", 2.0),
    "channel_names_empty": ("preprocess.channel_names", []),
    "channel_names_twice": ("preprocess.channel_names", ["flair", "flair", "t1ce", "t2"]),
    "map_channels_empty": ("preprocess.map_channels", []),
    "crop_margin_negative": ("preprocess.crop_margin_mm", -1.0),
    "crop_margin_nan": ("preprocess.crop_margin_mm", math.nan),
    "crop_flag_text": ("preprocess.crop_foreground", "yes"),
    "timesteps_zero": ("diffusion.num_train_timesteps", 0),
    "beta_above_one": ("diffusion.beta_end", 2.0),
    "beta_order": ("diffusion.beta_start", 0.5),
    "schedule": ("diffusion.schedule", "quadratic"),
    "register_missing": ("preprocess.register_to", "/nonexistent/template.nii.gz"),
    "register_number": ("preprocess.register_to", 3),
    "unknown_field": ("network.colour", "blue"),
    "missing_section": ("diffusion", DELETE),
}


@pytest.mark.parametrize("fault", list(CONFIG_FAULTS))
def test_bad_config_field_one_line_and_nothing_written(model, case, tmp_path, fault):
    field, value = CONFIG_FAULTS[fault]
    broken = edited_model(model, tmp_path, "config.json", _set(field, value))
    out = tmp_path / "out"
    code, err = segment(broken, case, out)
    assert code == 2, err
    lines = V.lines(err)
    assert len(lines) == 1, err
    assert str(broken / "config.json") in lines[0] and field in lines[0], lines[0]
    assert "use the config.json saved with" in lines[0] or "fix" in lines[0], lines[0]
    assert not out.exists()


def test_config_register_to_a_file_that_is_no_image(model, case, tmp_path):
    text = tmp_path / "template.nii.gz"
    text.write_text("not an image\n")
    broken = edited_model(model, tmp_path, "config.json", _set("preprocess.register_to", str(text)))
    code, err = segment(broken, case, tmp_path / "out")
    assert code == 2 and len(V.lines(err)) == 1, err
    assert "config.json" in err and "register_to" in err and str(text) in err and "not a NIfTI" in err, err


def test_config_load_directly_and_a_valid_round_trip(tmp_path):
    config = ModelConfig(network=network_preset("tiny", 4), preprocess=PreprocessConfig(image_size=64))
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == config
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(InputError, match=r"config\.json: not valid JSON"):
        ModelConfig.load(tmp_path / "config.json")


def test_preprocess_refuses_a_size_out_of_range_before_writing(case, tmp_path):
    out = tmp_path / "store"
    code, _, err = V.run_cli(["preprocess", "-i", str(case.parent), "-o", str(out), "--dataset", "brats", "--size", "100000"])
    assert code == 2 and len(V.lines(err)) == 1, err
    assert "image_size" in err and "1024" in err, err
    assert not out.exists()


def test_preprocess_refuses_a_register_to_that_is_no_image(case, tmp_path):
    text = tmp_path / "template.nii.gz"
    text.write_text("not an image\n")
    out = tmp_path / "store"
    code, _, err = V.run_cli(["preprocess", "-i", str(case.parent), "-o", str(out), "--dataset", "brats",
                              "--size", "64", "--register-to", str(text)])  # fmt: skip
    assert code == 2 and len(V.lines(err)) == 1, err
    assert "--register-to" in err and "not a NIfTI" in err, err
    assert not out.exists()


def test_store_with_a_bad_settings_file(case, tmp_path):
    from anofpdm_monai.data import PreprocessedStore

    store = tmp_path / "store"
    code, _, err = V.run_cli(["preprocess", "-i", str(case.parent), "-o", str(store), "--dataset", "brats", "--size", "64",
                              "--split", "0,0,1"])  # fmt: skip
    assert code == 0, err
    settings = json.loads((store / "settings.json").read_text())
    settings["preprocess"]["percentile"] = -3
    (store / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(InputError, match=r"settings\.json: percentile"):
        PreprocessedStore(store)
