"""anofpdm_monai.io: InputError and its argument names, atomic writers, strict JSON, read_json, safe_torch_load, the voxel limit."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from anofpdm_monai import io
from anofpdm_monai.io import InputError


# ---------------------------------------------------------------- InputError


def test_input_error_names_arguments_and_the_cli_renames_whole_words_only():
    err = InputError("/runs/split/store: split=(0.5, 0.6) must sum to 1; change split, not split_seed", arguments="split")
    assert err.arguments == ("split",) and isinstance(err, ValueError)
    assert err.renamed({"split": "--split"}) == (
        "/runs/split/store: --split=(0.5, 0.6) must sum to 1; change --split, not split_seed"
    )
    assert err.renamed({}) == str(err), "an argument the front end lacks keeps its Python name"
    assert InputError("x").arguments == () and InputError("x").renamed({"x": "--x"}) == "x", "undeclared: unchanged"
    two = InputError("resume needs a model_dir", arguments=("resume", "model_dir"))
    assert two.renamed({"resume": "--resume", "model_dir": "-o"}) == "--resume needs a -o"


def test_input_error_keeps_its_arguments_through_pickle():
    """Errors cross process boundaries (a preprocessing worker, DDP ranks) as pickles."""
    err = pickle.loads(pickle.dumps(InputError("lr=0 must be positive", arguments="lr")))
    assert str(err) == "lr=0 must be positive" and err.arguments == ("lr",)


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_creates_folders_and_leaves_only_the_file(tmp_path):
    path = tmp_path / "a" / "b" / "out.json"
    io.atomic_write_text(path, "hello")
    assert path.read_text() == "hello" and os.listdir(path.parent) == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "not mkstemp's 0600"


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, failure):
    path = tmp_path / "out.csv"
    path.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half a fi")
        raise failure

    with pytest.raises(type(failure)):
        io.atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.csv"], "no temporary file left behind"
    fresh = tmp_path / "new.csv"
    with pytest.raises(type(failure)):
        io.atomic_write(fresh, half_then_fail)
    assert not fresh.exists() and os.listdir(tmp_path) == ["out.csv"]


def test_atomic_savers_round_trip(tmp_path):
    array = np.arange(12, dtype=np.float16).reshape(3, 4)
    assert np.array_equal(np.load(io.atomic_save_npy(array, tmp_path / "a.npy"), mmap_mode="r"), array)
    frame = pd.DataFrame({"patient": ["p1", "p2"], "slice": [3, 4]})
    pd.testing.assert_frame_equal(pd.read_csv(io.atomic_save_dataframe(frame, tmp_path / "t.csv")), frame)
    state = {"w": torch.randn(2, 3)}
    assert torch.equal(io.safe_torch_load(io.atomic_torch_save(state, tmp_path / "m.pt"))["w"], state["w"])
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "m.pt", "t.csv"]


# ---------------------------------------------------------------- strict JSON


def test_json_is_strict_and_plain():
    value = {"nan": float("nan"), "inf": [float("-inf"), 1.5], "np": np.float32(0.25), "arr": np.array([1, 2]), 3: (True, None)}
    text = io.json_text(value)
    assert json.loads(text) == {"nan": None, "inf": [None, 1.5], "np": 0.25, "arr": [1, 2], "3": [True, None]}
    assert "NaN" not in text and "Infinity" not in text


def test_read_json_explains_bad_files(tmp_path):
    good = io.atomic_write_json(tmp_path / "good.json", {"w": [1.0, float("nan")]})
    assert io.read_json(good, "fix it") == {"w": [1.0, None]}
    for name, data in (("truncated.json", b'{"w": [1.0,'), ("binary.json", b"\xff\xfe\x00garbage")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError) as err:
            io.read_json(tmp_path / name, "rerun the step that writes it")
        message = str(err.value)
        assert message.startswith(f"{tmp_path / name}: not valid JSON") and message.endswith("; rerun the step that writes it")
        assert "\n" not in message
    with pytest.raises(FileNotFoundError):
        io.read_json(tmp_path / "missing.json", "fix it")


# ---------------------------------------------------------------- safe_torch_load


class Payload:
    """Any class: unpickling it would import and run code, so a weights-only load must refuse it."""


def test_safe_torch_load_refusals(tmp_path):
    with pytest.raises(FileNotFoundError):
        io.safe_torch_load(tmp_path / "none.pt")
    torch.save({"w": torch.zeros(1), "obj": Payload()}, tmp_path / "pickled.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name in ("pickled.pt", "text.pt"):
        with pytest.raises(InputError, match=r"refused to load: it is not a weights-only checkpoint") as err:
            io.safe_torch_load(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name)) and "\n" not in str(err.value)
    io.atomic_torch_save({"step": 3, "w": torch.ones(2)}, tmp_path / "plain.pt")
    assert io.safe_torch_load(tmp_path / "plain.pt")["step"] == 3


# ---------------------------------------------------------------- the voxel limit


def test_max_voxels_from_the_environment_and_set_max_voxels(monkeypatch):
    monkeypatch.setenv(io.MAX_VOXELS_ENV, "")  # restored to its value before the test afterwards
    assert io.max_voxels() == io.DEFAULT_MAX_VOXELS
    io.set_max_voxels(None)
    assert io.max_voxels() == io.DEFAULT_MAX_VOXELS, "None keeps the current limit"
    io.set_max_voxels(1234)
    assert os.environ[io.MAX_VOXELS_ENV] == "1234" and io.max_voxels() == 1234
    with pytest.raises(InputError) as err:
        io.set_max_voxels(0)
    assert str(err.value).startswith("max_voxels=0: give a positive whole number") and err.value.arguments == ("max_voxels",)
    assert io.max_voxels() == 1234, "a refused limit changes nothing"
    for bad in ("lots", "-5", "0"):
        monkeypatch.setenv(io.MAX_VOXELS_ENV, bad)
        with pytest.raises(InputError, match=f"{io.MAX_VOXELS_ENV}={bad!r}"):
            io.max_voxels()


def test_save_like_refuses_an_array_off_the_reference_grid(tmp_path):
    import nibabel as nib

    reference = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    saved = nib.load(io.save_like(np.ones((4, 5, 6)), reference, tmp_path / "m.nii.gz", np.uint8))
    assert saved.get_data_dtype() == np.uint8 and np.allclose(saved.affine, reference.affine)
    with pytest.raises(ValueError, match="differs from the reference grid"):
        io.save_like(np.ones((4, 5, 7)), reference, tmp_path / "bad.nii.gz", np.uint8)
    assert not (tmp_path / "bad.nii.gz").exists()


def test_spacing_volume_is_the_affine_volume_on_an_axis_aligned_grid():
    spacing = (0.9375, 1.2, 3.0)
    assert io.spacing_volume_mm3(spacing) == pytest.approx(io.voxel_volume_mm3(np.diag([*spacing, 1.0])))
    sheared = np.diag([1.0, 1.0, 2.0, 1.0])
    sheared[0, 1] = 1.0  # column norms (1, sqrt 2, 2): their product is not the voxel's volume
    assert io.voxel_volume_mm3(sheared) == pytest.approx(2.0)
    assert io.spacing_volume_mm3(np.linalg.norm(sheared[:3, :3], axis=0)) == pytest.approx(2.0 * np.sqrt(2.0))
