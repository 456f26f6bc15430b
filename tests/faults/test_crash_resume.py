"""Guarantee 2: a run killed part-way (SIGKILL) leaves only whole files, and a rerun finishes the job.

``segment`` and ``evaluate`` run over a two-case raw cohort in a child process (``python -m
pipelines.cli``) that is killed as soon as its first case is written; the rerun with ``--continue``
must not recompute finished cases (their files keep their mtimes and bytes), every file must load, and
the results must equal an uninterrupted run's (bit for bit; the tables apart from wall-time columns).
``train`` is killed after its first checkpoint and resumed with ``--resume``: the checkpoint loads after
the kill and the final weights equal an uninterrupted run of the same total steps, exactly (CPU training
is deterministic here: data order, noise, timesteps and label drops come from generators seeded by
(seed, step, rank), and the optimizer state is checkpointed).

Killing at a random moment cannot prove that no write is ever torn, so the atomic writers are also
tested directly: a writer that dies half-way leaves the previous file intact under its name.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from anofpdm_monai import io as aio
from anofpdm_monai.io import load_nifti, safe_torch_load
from anofpdm_monai.networks import load_model_folder

from . import volumes as V

CASES = ("case0", "case1")
TIME_COLUMNS = {"seconds", "seconds_per_slice", "wall_s"}


@pytest.fixture(scope="module")
def raw_cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash_raw")
    for i, case in enumerate(CASES):
        V.write_case(root, case, seed=i)
    return root


def _kill_after_first(argv: list[str], marker_glob: str, folder: Path, log: Path) -> list[Path]:
    """Run ``anofpdm ARGV`` in a child process, SIGKILL it once a file matching ``marker_glob`` exists."""
    proc = V.cli_subprocess(argv, log)
    killed = V.kill_when(proc, lambda: bool(folder.is_dir() and V.visible_files(folder, marker_glob)))
    stderr = log.read_text(errors="replace")
    assert killed, f"the child ended before it could be killed part-way (exit {proc.returncode}):\n{stderr}"
    assert proc.returncode == -9
    return V.visible_files(folder, marker_glob)


def _stamp(paths: list[Path]) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}


# --- segment ---------------------------------------------------------------------------------------------------


def test_segment_killed_then_continue(raw_cohort, tiny_model, tmp_path):
    out, ref = tmp_path / "out", tmp_path / "ref"
    argv = ["segment", "-m", str(tiny_model), "-i", str(raw_cohort), "-o", str(out), "--device", "cpu"]
    done = _kill_after_first(argv, "case?.json", out, tmp_path / "child.log")  # a case's settings record: written last
    assert 1 <= len(done) < len(CASES), f"killed after {[p.name for p in done]}: not part-way"
    for path in V.visible_files(out, "*.nii.gz"):  # whatever the kill left under a final name is whole
        load_nifti(path)
    finished = done + [p.with_suffix(".nii.gz") for p in done] + [p.with_name(p.stem + "_anomaly.nii.gz") for p in done]
    before = _stamp(finished)

    code, out_text, err = V.run_cli(argv + ["--continue"])
    assert code == 0, err
    assert _stamp(finished) == before, "--continue recomputed (rewrote) a finished case"
    assert sum("done already, skipped (--continue)" in line for line in V.lines(out_text + err)) == len(done)

    assert V.run_cli([a if a != str(out) else str(ref) for a in argv])[0] == 0  # uninterrupted
    for case in CASES:
        for name in (f"{case}.nii.gz", f"{case}_anomaly.nii.gz"):
            got, want = nib.load(str(out / name)), nib.load(str(ref / name))
            assert np.array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj)), name
            assert got.header.get_data_dtype() == want.header.get_data_dtype()
            assert np.array_equal(got.affine, want.affine)


# --- evaluate --------------------------------------------------------------------------------------------------


def _tables(results: Path) -> dict[str, object]:
    slices = pd.read_csv(results / "slices.csv")
    cases = pd.read_csv(results / "cases.csv")
    summary = json.loads((results / "summary.json").read_text())
    for row in summary.values():
        for key in TIME_COLUMNS & set(row):
            row.pop(key)
    return {
        "slices": slices.drop(columns=sorted(TIME_COLUMNS & set(slices.columns))),
        "cases": cases.drop(columns=sorted(TIME_COLUMNS & set(cases.columns))),
        "summary": summary,
    }


def test_evaluate_killed_then_continue(raw_cohort, tiny_model, tmp_path):
    out, ref = tmp_path / "out", tmp_path / "ref"
    argv = ["evaluate", "-m", str(tiny_model), "-i", str(raw_cohort), "-o", str(out), "--device", "cpu",
            "--methods", "anofpdm-ddim,anofpdm-ddim-last,threshold"]  # fmt: skip
    done = _kill_after_first(argv, "case?.json", out / "cases", tmp_path / "child.log")  # settings record: written last
    assert 1 <= len(done) < len(CASES), f"killed after {[p.name for p in done]}: not part-way"
    for path in V.visible_files(out / "cases", "*.npz"):
        with np.load(path) as data:
            [data[k] for k in data.files]
    done += [p.with_suffix(".npz") for p in done]
    before = _stamp(done)

    code, _, err = V.run_cli(argv + ["--continue"])
    assert code == 0, err
    assert _stamp(done) == before, "--continue recomputed (rewrote) a finished case"
    for name in ("slices.csv", "cases.csv"):
        assert not pd.read_csv(out / name).empty
    json.loads((out / "summary.json").read_text())

    ref_argv = [a if a != str(out) else str(ref) for a in argv]
    assert V.run_cli(ref_argv)[0] == 0  # uninterrupted
    got, want = _tables(out), _tables(ref)
    pd.testing.assert_frame_equal(got["slices"], want["slices"])
    pd.testing.assert_frame_equal(got["cases"], want["cases"])
    assert got["summary"] == want["summary"]
    assert (out / "summary.md").is_file()


# --- train -----------------------------------------------------------------------------------------------------

STEPS = 3


def _state(model_dir: Path) -> dict:
    return safe_torch_load(model_dir / "train_state.pt")


def test_train_killed_then_resume(brats_store, tmp_path):
    model, ref = tmp_path / "model", tmp_path / "ref"
    argv = ["train", "-d", str(brats_store), "-o", str(model), "--steps", str(STEPS), "--batch-size", "2",
            "--checkpoint-every", "1", "--device", "cpu", "--seed", "3"]  # fmt: skip
    _kill_after_first(argv, "train_state.pt", model, tmp_path / "child.log")
    # the checkpoint on disk loads after the kill, and so does the model folder
    killed_at = int(_state(model)["step"])
    assert 1 <= killed_at < STEPS, f"killed at step {killed_at}: not part-way"
    load_model_folder(model)
    log = pd.read_csv(model / "log.csv")
    assert list(log["step"]) == list(range(1, len(log) + 1))

    code, _, err = V.run_cli(argv + ["--resume"])
    assert code == 0, err
    assert V.run_cli([a if a != str(model) else str(ref) for a in argv])[0] == 0  # uninterrupted

    got, want = _state(model), _state(ref)
    assert got["step"] == want["step"] == STEPS
    for part in ("model", "ema"):
        for key, value in want[part].items():
            assert torch.equal(got[part][key], value), f"{part}.{key} differs after kill + resume"
    assert json.dumps(got["optimizer"]["param_groups"]) == json.dumps(want["optimizer"]["param_groups"])
    for key, value in want["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(got["optimizer"]["state"][key][name], tensor), f"optimizer {key}.{name}"
    final, final_ref = safe_torch_load(model / "model.pt"), safe_torch_load(ref / "model.pt")
    assert all(torch.equal(final[k], final_ref[k]) for k in final_ref)
    log, log_ref = pd.read_csv(model / "log.csv"), pd.read_csv(ref / "log.csv")
    pd.testing.assert_frame_equal(log.drop(columns="wall_s"), log_ref.drop(columns="wall_s"))


# --- the atomic writers, killed mid-write ----------------------------------------------------------------------


class Killed(BaseException):
    """Stands for the process dying inside a write (BaseException: nothing may swallow it)."""


def _dies_half_way(path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"half a file")
    raise Killed


def test_checkpoint_write_dies_half_way(tmp_path, monkeypatch):
    path = tmp_path / "train_state.pt"
    aio.atomic_torch_save({"w": torch.ones(3)}, path)
    monkeypatch.setattr(torch, "save", lambda obj, f: _dies_half_way(f))
    with pytest.raises(Killed):
        aio.atomic_torch_save({"w": torch.zeros(3)}, path)
    assert torch.equal(safe_torch_load(path)["w"], torch.ones(3)), "the previous checkpoint was damaged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt"]


def test_nifti_write_dies_half_way(tmp_path, monkeypatch):
    reference = nib.load(str(V.save_nifti(tmp_path / "in.nii.gz", np.ones(V.SHAPE, np.int16))))
    out = tmp_path / "out.nii.gz"
    monkeypatch.setattr(nib, "save", lambda image, f: _dies_half_way(f))
    with pytest.raises(Killed):
        aio.save_like(np.zeros(V.SHAPE), reference, out, np.uint8)
    assert not out.exists(), "a half-written NIfTI was left under its final name"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz"]


def test_table_and_array_writes_die_half_way(tmp_path, monkeypatch):
    table, array = tmp_path / "cases.csv", tmp_path / "case.npz"
    aio.atomic_save_dataframe(pd.DataFrame({"case": ["a"], "dice": [0.5]}), table)
    aio.atomic_write_bytes(array, b"whole")
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda self, f, **kw: _dies_half_way(f))
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: _dies_half_way(self))
    with pytest.raises(Killed):
        aio.atomic_save_dataframe(pd.DataFrame({"case": ["b"], "dice": [0.1]}), table)
    with pytest.raises(Killed):
        aio.atomic_write_bytes(array, b"new")
    monkeypatch.undo()
    assert pd.read_csv(table).to_dict("list") == {"case": ["a"], "dice": [0.5]}
    assert array.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.npz", "cases.csv"]


def test_train_state_is_written_last(tmp_path, monkeypatch):
    """train_state.pt marks a checkpoint; every file resume reads must be at least as new when it appears."""
    from anofpdm_monai import training
    from anofpdm_monai.config import ModelConfig, network_preset
    from anofpdm_monai.networks import build_network

    order: list[str] = []
    real_torch_save, real_df_save = training.atomic_torch_save, training.atomic_save_dataframe
    monkeypatch.setattr(training, "atomic_torch_save", lambda obj, p: (order.append(Path(p).name), real_torch_save(obj, p))[1])
    monkeypatch.setattr(training, "atomic_save_dataframe", lambda df, p: (order.append(Path(p).name), real_df_save(df, p))[1])
    config = ModelConfig(network=network_preset("tiny", 1))
    model = build_network(config.network)
    optimizer = torch.optim.AdamW(model.parameters())
    training.save_checkpoint(tmp_path, config, model, model, optimizer, 1, [{"step": 1, "loss": 1.0, "lr": 1e-4, "wall_s": 0.1}])
    assert order[-1] == "train_state.pt" and {"model.pt", "log.csv"} <= set(order), order
