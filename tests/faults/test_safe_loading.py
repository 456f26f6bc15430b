"""Guarantee 5: model files are loaded weights-only; anything else is refused with one clear line.

* a ``model.pt`` whose pickle would run code is refused, and the code does not run (a side-effect
  marker proves it);
* a whole pickled module (a common way to save "a model") is refused;
* a ``train_state.pt`` carrying such a payload is refused by ``train --resume``;
* a model folder whose ``config.json`` does not fit its weights is refused;
* every ``torch.load`` in the package passes ``weights_only=True`` (source check).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from anofpdm_monai.config import NetworkConfig
from anofpdm_monai.io import InputError, safe_torch_load
from anofpdm_monai.networks import build_network, load_model_folder

from . import volumes as V


class Payload:
    """Unpickling this creates the folder ``marker``: the proof that a full unpickler ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def case(tmp_path) -> Path:
    V.write_case(tmp_path / "raw", "case", seed=0, shape=(40, 48, 3))
    return tmp_path / "raw" / "case"


def _model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    return model


def _segment_refused(model: Path, case: Path, tmp_path: Path, pattern: str) -> str:
    out = tmp_path / "out"
    code, _, err = V.run_cli(["segment", "-m", str(model), "-i", str(case), "-o", str(out), "--device", "cpu"])
    assert code != 0
    found = [line for line in V.lines(err) if "error" in line]
    assert len(found) == 1, err
    assert str(model / "model.pt") in found[0] and re.search(pattern, found[0]), found[0]
    assert not out.exists() or not list(out.glob("*.nii.gz")), "outputs written by a refused model"
    return found[0]


def _poison(checkpoint, marker):
    """Add a pickled object that creates ``marker`` when unpickled; return ``marker``."""
    state = torch.load(checkpoint, weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, checkpoint)
    return marker


def test_model_with_code_payload_is_refused_and_not_run(tiny_model, case, tmp_path):
    model = _model_copy(tiny_model, tmp_path)
    marker = _poison(model / "model.pt", tmp_path / "payload_ran")
    line = _segment_refused(model, case, tmp_path, r"refused to load: it is not a weights-only checkpoint")
    assert "torch.save(model.state_dict())" in line  # the fix
    assert not marker.exists(), "loading model.pt ran code from the pickle"


def test_whole_pickled_module_is_refused(tiny_model, case, tmp_path):
    model = _model_copy(tiny_model, tmp_path)
    network, _ = load_model_folder(tiny_model)
    torch.save(network, model / "model.pt")  # the whole module, pickled
    _segment_refused(model, case, tmp_path, r"not a weights-only checkpoint")


def test_config_that_does_not_fit_the_weights_is_refused(tiny_model, case, tmp_path):
    model = _model_copy(tiny_model, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["network"]["channels"] = [16, 32, 32]
    (model / "config.json").write_text(json.dumps(config))
    _segment_refused(model, case, tmp_path, r"weights do not fit config\.json .*use the config\.json saved with these weights")


def test_weights_of_another_channel_count_are_refused(tiny_model, tmp_path):
    model = _model_copy(tiny_model, tmp_path)
    config = json.loads((model / "config.json").read_text())
    other = build_network(NetworkConfig(**{**config["network"], "in_channels": 2}))
    torch.save(other.state_dict(), model / "model.pt")
    with pytest.raises(InputError, match=r"weights do not fit config\.json .*takes 2 channels"):
        load_model_folder(model)


def test_resume_refuses_a_train_state_with_code(tiny_model, brats_store, tmp_path):
    model = _model_copy(tiny_model, tmp_path)
    marker = _poison(model / "train_state.pt", tmp_path / "payload_ran")
    code, _, err = V.run_cli(["train", "-d", str(brats_store), "-o", str(model), "--steps", "4", "--batch-size", "2",
                              "--resume", "--device", "cpu"])  # fmt: skip
    assert code != 0
    found = [line for line in V.lines(err) if "error" in line]
    assert len(found) == 1 and "train_state.pt: refused to load" in found[0], err
    assert not marker.exists()


def test_safe_torch_load_refuses_payload_directly(tmp_path):
    marker = tmp_path / "payload_ran"
    torch.save({"w": torch.ones(1), "x": Payload(marker)}, tmp_path / "x.pt")
    with pytest.raises(InputError, match="not a weights-only checkpoint"):
        safe_torch_load(tmp_path / "x.pt")
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    root = Path(__file__).resolve().parents[2]
    calls = []
    for folder in ("anofpdm_monai", "pipelines", "data_prep"):
        for path in (root / folder).rglob("*.py"):
            for match in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", path.read_text()):
                calls.append((path.name, match.group(0)))
    assert calls, "no torch.load found: the check would be empty"
    unsafe = [c for c in calls if "weights_only=True" not in c[1]]
    assert unsafe == [], f"torch.load without weights_only=True: {unsafe}"
