"""The model shipped inside the package: it loads, its config and calibration fit its weights."""

from __future__ import annotations

import torch

from anofpdm_monai.bundled import bundled_model_dir
from anofpdm_monai.calibration import Calibration
from anofpdm_monai.config import ModelConfig
from anofpdm_monai.io import safe_torch_load
from anofpdm_monai.networks import load_model_folder

MAX_BUNDLE_BYTES = 20 * 1024 * 1024


def test_bundled_model_loads_and_matches_its_config_and_calibration():
    folder = bundled_model_dir()
    config = ModelConfig.load(folder / "config.json")
    network, loaded = load_model_folder(folder)
    assert loaded == config
    state = safe_torch_load(folder / "model.pt")
    assert set(state) == set(network.state_dict())
    assert config.network.preset == "tiny"
    assert (folder / "calibration.json").is_file()
    names = config.preprocess.channel_names
    for encoding in ("ddim", "ddpm"):
        path = folder / ("calibration.json" if encoding == "ddim" else "calibration_ddpm.json")
        if not path.is_file():
            continue
        calibration = Calibration.load(path)
        assert calibration.encoding == encoding
        assert [names[i] for i in calibration.map_channel_indices] == list(config.preprocess.map_channels)
        assert len(calibration.D) == len(config.preprocess.map_channels) and all(d > 0 for d in calibration.D)
        assert calibration.w in calibration.w_grid
        assert 1 <= calibration.stride and calibration.steps <= config.diffusion.num_train_timesteps
        assert calibration.steps in calibration.steps_grid or not calibration.steps_grid
        assert calibration.volume is not None, "the bundled calibrations carry the volume family"
    assert config.preprocess.crop_foreground, "the bundled model was trained on the brain-cropped chain"
    s = config.network.image_size
    x = torch.zeros(2, config.network.in_channels, s, s)
    out = network(x, timesteps=torch.tensor([0, 599]), class_labels=torch.tensor([0, 2]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bundle_is_small():
    total = sum(p.stat().st_size for p in bundled_model_dir().iterdir() if p.is_file())
    assert total <= MAX_BUNDLE_BYTES
