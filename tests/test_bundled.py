"""The models shipped inside the package: each name resolves, loads, and its config and calibrations fit its weights.

Parametrized over every bundled name, so a model folder missing from the package fails here
(``bundled-atlas`` fails until its folder is committed) instead of being skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import anofpdm_monai.bundled as bundled
from anofpdm_monai.bundled import BUNDLED_MODELS, bundled_model_dir, resolve_model_dir
from anofpdm_monai.calibration import Calibration
from anofpdm_monai.config import ModelConfig
from anofpdm_monai.io import InputError, safe_torch_load
from anofpdm_monai.networks import load_model_folder

MAX_BUNDLE_BYTES = 20 * 1024 * 1024
# name -> (channels, map channels, smallest largest-w of the calibration grid); the ATLAS model is calibrated
# over the large guidance strengths of the paper's ATLAS runs (w up to 30)
EXPECTED = {
    "bundled": (("flair", "t1", "t1ce", "t2"), ("flair", "t2"), 5.0),
    "bundled-atlas": (("t1",), ("t1",), 30.0),
}
PACKAGE = Path(bundled.__file__).resolve().parent


def test_every_bundled_name_is_checked_here():
    assert set(BUNDLED_MODELS) == set(EXPECTED)


@pytest.mark.parametrize("name, folder", [("bundled", "tiny_brats_phantom"), ("bundled-atlas", "tiny_atlas_phantom")])
def test_names_resolve_to_their_package_folders(name, folder):
    assert resolve_model_dir(name) == PACKAGE / folder  # fails while the folder is missing from the package
    assert resolve_model_dir(Path(name)) == PACKAGE / folder
    assert resolve_model_dir("some/model_dir") == Path("some/model_dir")


def test_missing_bundled_folder_is_a_one_line_input_error(monkeypatch, tmp_path):
    monkeypatch.setitem(BUNDLED_MODELS, "bundled-atlas", "no_such_model_folder")
    with pytest.raises(InputError, match="bundled model 'bundled-atlas' is missing from this installation") as err:
        resolve_model_dir("bundled-atlas")
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="no bundled model of this name"):
        bundled_model_dir("bundled-stroke")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_bundled_model_loads_and_matches_its_config_and_calibration(name):
    folder = bundled_model_dir(name)
    channels, map_channels, min_w_max = EXPECTED[name]
    config = ModelConfig.load(folder / "config.json")
    network, loaded = load_model_folder(folder)
    assert loaded == config
    state = safe_torch_load(folder / "model.pt")
    assert set(state) == set(network.state_dict())
    assert config.network.preset == "tiny"
    names = config.preprocess.channel_names
    assert tuple(names) == channels and tuple(config.preprocess.map_channels) == map_channels
    assert config.network.in_channels == len(channels)
    for encoding in ("ddim", "ddpm"):
        path = folder / ("calibration.json" if encoding == "ddim" else "calibration_ddpm.json")
        calibration = Calibration.load(path)  # both encodings are calibrated
        assert calibration.encoding == encoding
        assert [names[i] for i in calibration.map_channel_indices] == list(config.preprocess.map_channels)
        assert len(calibration.D) == len(config.preprocess.map_channels) and all(d > 0 for d in calibration.D)
        assert calibration.w in calibration.w_grid and max(calibration.w_grid) >= min_w_max
        assert 1 <= calibration.stride and calibration.steps <= config.diffusion.num_train_timesteps
        assert calibration.steps in calibration.steps_grid or not calibration.steps_grid
        assert calibration.section("volume") is not None, "the bundled calibrations carry the volume family"
    assert config.preprocess.crop_foreground, "the bundled models are trained on the brain-cropped chain"
    s = config.network.image_size
    x = torch.zeros(2, config.network.in_channels, s, s)
    out = network(x, timesteps=torch.tensor([0, 599]), class_labels=torch.tensor([0, 2]))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_bundle_is_small(name):
    total = sum(p.stat().st_size for p in bundled_model_dir(name).iterdir() if p.is_file())
    assert total <= MAX_BUNDLE_BYTES
