"""Guarantee 14: a broken model stops with one line instead of calling every patient healthy.

* ``train`` stops at the first non-finite loss or weight (exit non-zero); the last checkpoint on disk
  stays the last finite one.
* A model folder whose weights hold NaN or infinite values is refused when it loads.
* A calibration whose forward-process statistics are not finite is refused, naming the cause.
* ``config.json`` is checked against the weights before the network is built: an absurd network
  (widths 8192, 16 residual blocks: hundreds of GiB) is refused without allocating it, and a width
  mismatch is called a width mismatch, not a channel mismatch.
"""

from __future__ import annotations

import json
import shutil
import time
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest
import torch

from anofpdm_monai.calibration import calibrate
from anofpdm_monai.config import DiffusionConfig
from anofpdm_monai.io import InputError
from anofpdm_monai.networks import HEALTHY, UNHEALTHY, build_scheduler, load_model_folder
from anofpdm_monai.training import check_finite_step

from . import volumes as V


def test_training_that_diverges_stops_and_keeps_the_last_finite_checkpoint(brats_store, tmp_path):
    model = tmp_path / "model"
    code, _, err = V.run_cli(["train", "-d", str(brats_store), "-o", str(model), "--steps", "8", "--batch-size", "2",
                              "--checkpoint-every", "1", "--lr", "1e8", "--device", "cpu"])  # fmt: skip
    assert code != 0, "training with NaN losses exited 0"
    errors = [x for x in V.lines(err) if "error" in x]
    assert len(errors) == 1 and "training diverged at step" in errors[0] and "--lr" in errors[0], err
    if (model / "model.pt").is_file():  # what is on disk is finite and loads
        load_model_folder(model)
        assert pd.read_csv(model / "log.csv")["loss"].notna().all()


def test_check_finite_step_names_the_step_and_the_cause(tmp_path):
    net = torch.nn.Linear(2, 2)
    check_finite_step(0.5, net, 3, tmp_path, 1e-4)
    with pytest.raises(InputError, match=r"diverged at step 3: the loss is nan .*no checkpoint was saved"):
        check_finite_step(float("nan"), net, 3, tmp_path, 1e-4)
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(InputError, match=r"the weights hold NaN or infinite values"):
        check_finite_step(0.5, net, 4, tmp_path, 1e-4)


@pytest.fixture
def model_copy(tiny_model_d1, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_d1, folder)
    return folder


def test_model_with_nan_weights_is_refused(model_copy, tmp_path):
    state = torch.load(model_copy / "model.pt", weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    torch.save(state, model_copy / "model.pt")
    V.write_case(tmp_path / "raw", "A")
    out = tmp_path / "out"
    code, _, err = V.run_cli(["segment", "-m", str(model_copy), "-i", str(tmp_path / "raw"), "-o", str(out), "--device", "cpu"])
    assert code == 2 and len(V.lines(err)) == 1, err
    assert "NaN or infinite values" in err and name in err and "lower learning rate" in err, err
    assert not out.exists()


def test_calibration_with_non_finite_statistics_is_refused():
    slices = torch.rand(4, 1, 8, 8) * 2 - 1
    labels = torch.tensor([HEALTHY, HEALTHY, UNHEALTHY, UNHEALTHY])

    def broken(x, t, labels):
        return torch.full_like(x, float("nan"))

    with pytest.raises(ValueError, match=r"of 4 of 4 validation slices are NaN or infinite.*not finite"):
        calibrate(broken, build_scheduler(DiffusionConfig()).alphas_cumprod, slices, labels, w_grid=[1.0], steps=4,
                  stride=2, map_channels=(0,), progress=False)  # fmt: skip


def test_absurd_network_config_is_refused_before_it_is_built(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["network"].update(channels=[8192, 8192, 8192], num_res_blocks=16, norm_num_groups=16, num_head_channels=32)
    (model_copy / "config.json").write_text(json.dumps(config))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InputError, match=r"weights do not fit config\.json .*num_res_blocks is 1 in the weights, 16 in config\.json"):
            load_model_folder(model_copy)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200e6, f"{peak / 1e6:.0f} MB allocated before the refusal"
    assert time.perf_counter() - start < 60


def test_a_width_mismatch_is_not_called_a_channel_mismatch(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["network"]["channels"] = [32, 64, 128]
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as err:
        load_model_folder(model_copy)
    assert "channels[2] is 64 in the weights, 128 in config.json" in str(err.value)
    assert "takes" not in str(err.value)  # not "the file's first layer takes 4 channels"
