"""anofpdm_monai.config: the settings dataclasses, their checks, presets, and the config.json round trip."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from anofpdm_monai.config import (
    PRESETS,
    DiffusionConfig,
    ModelConfig,
    NetworkConfig,
    PreprocessConfig,
    check_register_to,
    network_preset,
)
from anofpdm_monai.io import InputError


def a_config() -> ModelConfig:
    """A config unlike the defaults in every section, so a round trip that drops a field fails."""
    return ModelConfig(
        network=network_preset("paper", 2),
        diffusion=DiffusionConfig(num_train_timesteps=500, beta_start=2e-4, beta_end=0.03, schedule="scaled_linear_beta"),
        preprocess=PreprocessConfig(image_size=128, channel_names=("t1", "flair"), map_channels=("flair",), percentile=98.5,
                                    min_brain_fraction=0.1, dataset="atlas", crop_foreground=True, crop_margin_mm=2.5),
    )  # fmt: skip


def test_round_trip_through_a_dict_and_a_strict_json_file(tmp_path):
    config = a_config()
    assert ModelConfig.from_dict(config.to_dict()) == config
    config.save(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["network"]["channels"] == [128, 128, 256, 384, 512] and data["preprocess"]["map_channels"] == ["flair"]
    loaded = ModelConfig.load(tmp_path / "config.json")
    assert loaded == config and isinstance(loaded.network.channels, tuple) and loaded != ModelConfig()
    assert loaded.preprocess.map_channel_indices == (1,)


def test_presets():
    tiny = network_preset("tiny", 4)
    assert (tiny.preset, tiny.in_channels, tiny.image_size) == ("tiny", 4, PRESETS["tiny"]["image_size"])
    assert network_preset("paper", 1).channels == PRESETS["paper"]["channels"]
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        network_preset("huge", 4)


@pytest.mark.parametrize(
    "section, change, needle",
    [
        (NetworkConfig, {"image_size": 7}, "image_size = 7: must be an integer in [8, 1024]"),
        (NetworkConfig, {"image_size": True}, "image_size = True: must be an integer"),
        (NetworkConfig, {"channels": (32, 64)}, "must have the same length"),
        (NetworkConfig, {"norm_num_groups": 24}, "norm_num_groups=24 must divide every width"),
        (NetworkConfig, {"image_size": 66}, "image_size=66 must be divisible by 2**2"),
        (NetworkConfig, {"channels": "64"}, "channels = '64': must be a non-empty list"),
        (DiffusionConfig, {"beta_start": 0.1, "beta_end": 0.01}, "beta_start = 0.1: must not exceed beta_end"),
        (DiffusionConfig, {"beta_end": float("nan")}, "beta_end = nan: must be a finite number"),
        (DiffusionConfig, {"schedule": "exotic"}, "schedule = 'exotic': must be one of"),
        (PreprocessConfig, {"map_channels": ("dwi",)}, "map_channels ['dwi'] are not among channel_names"),
        (PreprocessConfig, {"channel_names": ("t1", "t1")}, "must hold distinct, non-empty names"),
        (PreprocessConfig, {"percentile": 0.0}, "percentile = 0.0: must be a number in (0.0, 100.0]"),
        (PreprocessConfig, {"crop_foreground": "yes"}, "crop_foreground = 'yes': must be true or false"),
    ],
)
def test_each_section_refuses_bad_values_naming_the_field(section, change, needle):
    with pytest.raises(ValueError) as err:
        section(**change)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d["network"].update(widths=[1]), "network.widths: unknown field"),
        (lambda d: d.pop("diffusion"), "diffusion: section missing"),
        (lambda d: d.update(preprocess=[1, 2]), "preprocess: must be an object, found list"),
        (lambda d: d["network"].update(image_size="64"), "network.image_size = '64': must be an integer"),
        (lambda d: d["preprocess"].update(map_channels=["t2"]), "preprocess.map_channels ['t2'] are not among"),
    ],
)
def test_from_dict_names_section_and_field(edit, needle):
    data = a_config().to_dict()
    edit(data)
    with pytest.raises(ValueError) as err:
        ModelConfig.from_dict(data)
    assert str(err.value).startswith(needle), str(err.value)


def test_load_refusals_are_one_line_and_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(FileNotFoundError, match="no model config"):
        ModelConfig.load(path)
    for text, needle in (("{not json", "not valid JSON"), ("[1, 2]", "holds a list"),
                         ('{"network": {}, "diffusion": {}, "preprocess": {"percentile": -1}}', "preprocess.percentile = -1")):  # fmt: skip
        path.write_text(text)
        with pytest.raises(InputError) as err:
            ModelConfig.load(path)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and needle in message and "\n" not in message, message


def test_folders_saved_before_a_field_existed_load_with_its_old_meaning(tmp_path):
    """Missing fields take their defaults: a config.json written before cropping existed keeps the paper's chain."""
    data = a_config().to_dict()
    for name in ("crop_foreground", "crop_margin_mm"):
        del data["preprocess"][name]
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = ModelConfig.load(tmp_path / "config.json")
    assert loaded.preprocess.crop_foreground is False and loaded.preprocess.crop_margin_mm == 5.0
    assert dataclasses.replace(loaded.preprocess, crop_foreground=True, crop_margin_mm=2.5) == a_config().preprocess


def test_check_register_to(tmp_path):
    check_register_to(None)
    with pytest.raises(ValueError, match="file not found"):
        check_register_to(str(tmp_path / "template.nii.gz"))
    (tmp_path / "text.nii.gz").write_text("no image")
    with pytest.raises(ValueError, match=r"preprocess.register_to = .*not a NIfTI image"):
        check_register_to(str(tmp_path / "text.nii.gz"), "preprocess.register_to")
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(ValueError, match="the template is 2-D"):
        check_register_to(str(tmp_path / "flat.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "t.nii.gz")
    check_register_to(str(tmp_path / "t.nii.gz"))
    with pytest.raises(ValueError, match="or null for no registration"):
        check_register_to("")


def test_config_schema_version_older_files_load_and_newer_ones_are_refused(tmp_path):
    from anofpdm_monai.config import CONFIG_SCHEMA_VERSION, ModelConfig

    config = ModelConfig()
    config.save(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["schema_version"] == CONFIG_SCHEMA_VERSION
    del data["schema_version"]  # a config.json of version 1
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert ModelConfig.load(tmp_path / "old.json") == config
    (tmp_path / "new.json").write_text(json.dumps({**data, "schema_version": CONFIG_SCHEMA_VERSION + 1}))
    with pytest.raises(InputError, match=rf"new.json: written with schema_version {CONFIG_SCHEMA_VERSION + 1}, "
                                         rf"but this anofpdm_monai reads up to {CONFIG_SCHEMA_VERSION}"):  # fmt: skip
        ModelConfig.load(tmp_path / "new.json")
