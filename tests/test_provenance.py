"""Run records (run.json, training.json, the calibration's precision), --continue checks, logging, --help and --version."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import warnings
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pytest
import torch

import anofpdm_monai
from anofpdm_monai.calibration import Calibration
from anofpdm_monai.io import InputError
from anofpdm_monai.logs import log_to_file, verb_logging
from anofpdm_monai.networks import use_bf16
from anofpdm_monai.provenance import check_continuation, run_record, write_run_record
from pipelines.cli import VERBS, build_parser, main

CPU_PRECISION = "bf16" if use_bf16("auto", torch.device("cpu")) else "fp32"  # what --precision auto resolves to here


def strict_load(path: Path):
    """Parse JSON refusing NaN / Infinity (strict JSON)."""

    def refuse(name):
        raise AssertionError(f"{path}: non-strict JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


# ---------------------------------------------------------------- version, --help


def test_version_has_one_source(capsys):
    assert metadata.version("anofpdm_monai") == anofpdm_monai.__version__
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"anofpdm {anofpdm_monai.__version__}"


def verb_parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_of_every_verb_has_a_help_text():
    parsers = verb_parsers()
    assert set(parsers) == set(VERBS)
    missing = [
        f"anofpdm {verb} {'/'.join(action.option_strings) or action.dest}"
        for verb, parser in parsers.items()
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert missing == [], "options without a help text: " + ", ".join(missing)


def test_help_shows_the_defaults():
    text = " ".join(verb_parsers()["evaluate"].format_help().split())
    assert "(default: 8 on a CPU; on a GPU as many as fit in half its free memory)" in text  # --batch-size
    assert "(default: 200)" in text  # --tune-slices
    assert "(default: None)" not in text and "(default: False)" not in text


# ---------------------------------------------------------------- run.json and --continue (library)


def test_run_record_is_complete_and_strict_json(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.pt").write_bytes(b"weights")
    settings = {"steps": 8, "D": (1.0, float("nan")), "store": tmp_path / "store", "precision": "fp32"}
    record = run_record("evaluate", ["anofpdm", "evaluate", "-o", "a b"], settings, model)
    path = write_run_record(tmp_path / "out", record)
    saved = strict_load(path)
    assert saved["command"] == "anofpdm evaluate -o 'a b'"
    assert saved["settings"] == {"steps": 8, "D": [1.0, None], "store": str(tmp_path / "store"), "precision": "fp32"}
    assert saved["model"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert {"anofpdm_monai", "torch", "monai", "nibabel", "numpy", "python"} <= set(saved["versions"])
    assert saved["versions"]["torch"] == torch.__version__.split("+")[0] or saved["versions"]["torch"] == torch.__version__
    assert saved["platform"] and datetime.fromisoformat(saved["date"].replace("Z", "+00:00")).tzinfo is not None
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["run.json"]  # no temporary file left


def test_check_continuation_names_the_setting_that_differs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.pt").write_bytes(b"weights")
    before = run_record("evaluate", None, {"steps": 8, "seed": 0, "batch_size": 8}, model)
    write_run_record(tmp_path, before)
    keys = ("steps", "seed")
    check_continuation(tmp_path, run_record("evaluate", None, {"steps": 8, "seed": 0, "batch_size": 16}, model), keys)
    with pytest.raises(InputError, match=r"run\.json: .*other settings \(steps: 8 -> 4\); choose a new output folder, or run without resume"):
        check_continuation(tmp_path, run_record("evaluate", None, {"steps": 4, "seed": 0}, model), keys)
    (model / "model.pt").write_bytes(b"retrained")
    with pytest.raises(InputError, match=r"another model \(model\.sha256: "):
        check_continuation(tmp_path, run_record("evaluate", None, {"steps": 8, "seed": 0}, model), keys)
    (tmp_path / "run.json").unlink()
    with pytest.raises(InputError, match=r"run\.json: missing or unreadable.*without resume"):
        check_continuation(tmp_path, before, keys)


# ---------------------------------------------------------------- logging


def test_verb_logging_shows_a_warning_once_on_one_line_and_in_the_log_file(tmp_path, capsys):
    before = warnings.showwarning
    with verb_logging("evaluate") as log:
        log_to_file(tmp_path, "evaluate")
        for _ in range(2):  # the same warning twice, with the once-per-location registry reset in between
            warnings.warn("model.pt: careful", UserWarning, stacklevel=1)
            with warnings.catch_warnings():
                pass
        log.info("a table")
    assert warnings.showwarning is before
    assert not logging.getLogger("anofpdm").handlers
    out, err = capsys.readouterr()
    assert err == "anofpdm evaluate: warning: model.pt: careful\n" and out == "a table\n"
    text = (tmp_path / "evaluate.log").read_text()
    assert "WARNING model.pt: careful" in text and "INFO a table" in text


# ---------------------------------------------------------------- the verbs' records


def test_train_and_calibrate_record_their_settings(tiny_model):
    """conftest's tiny_model: ``train --steps 3 --batch-size 4 --checkpoint-every 3``, then ``calibrate --stride 20``."""
    training = strict_load(tiny_model / "training.json")
    assert training["steps_done"] == 3 and training["total_steps"] == 3
    expected = {"lr": 1e-4, "batch_size": 4, "seed": 0, "ema": 0.9999, "p_uncond": 0.1, "max_train_timestep": 1000,
                "preset": "tiny", "autocast": "fp32", "device": "cpu"}  # fmt: skip
    assert {k: training[k] for k in expected} == expected
    assert [(r["start_step"], r["steps_done"]) for r in training["runs"]] == [(0, 3)]
    run = strict_load(tiny_model / "run.json")
    assert run["verb"] == "train" and run["argv"][:2] == ["anofpdm", "train"] and run["settings"]["batch_size"] == 4
    calibration = Calibration.load(tiny_model / "calibration.json")
    assert (calibration.precision, calibration.stride) == (CPU_PRECISION, 20)
    record = strict_load(tiny_model / "run_calibrate.json")
    assert record["verb"] == "calibrate" and record["settings"]["precision"] == CPU_PRECISION
    assert record["model"]["sha256"] == hashlib.sha256((tiny_model / "model.pt").read_bytes()).hexdigest()
    assert "N*=" in (tiny_model / "calibrate.log").read_text()


def test_resumed_training_keeps_the_history_of_its_runs(tiny_model, brats_store, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    assert main(["train", "-d", str(brats_store), "-o", str(folder), "--steps", "4", "--batch-size", "4", "--resume",
                 "--device", "cpu"]) == 0  # fmt: skip
    training = strict_load(folder / "training.json")
    assert training["steps_done"] == 4 and training["start_step"] == 3
    assert [(r["start_step"], r["steps_done"]) for r in training["runs"]] == [(0, 3), (3, 4)]


def test_calibration_without_precision_still_loads(tiny_model, tmp_path):
    data = json.loads((tiny_model / "calibration.json").read_text())
    del data["precision"]
    (tmp_path / "calibration.json").write_text(json.dumps(data))
    assert Calibration.load(tmp_path / "calibration.json").precision is None
    data["precision"] = "fp16"
    (tmp_path / "calibration.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="precision"):
        Calibration.load(tmp_path / "calibration.json")


def test_preprocess_records_its_settings(brats_store):
    record = strict_load(brats_store / "run.json")
    assert record["verb"] == "preprocess" and record["settings"]["preprocess"]["image_size"] == 64
    assert record["settings"]["split"] == [0.5, 0.25, 0.25]


@pytest.fixture(scope="module")
def model(tiny_model_d1: Path) -> Path:
    return tiny_model_d1


def evaluate(model: Path, store: Path, out: Path, *flags) -> int:
    return main(["evaluate", "-m", str(model), "-i", str(store), "-o", str(out), "--methods", "anofpdm-ddim",
                 "--max-slices", "2", "--device", "cpu", *[str(f) for f in flags]])  # fmt: skip


def test_evaluate_continue_refuses_another_model_or_steps(model, brats_store, tmp_path, capsys):
    out = tmp_path / "results"
    assert evaluate(model, brats_store, out, "--steps", 8, "--stride", 4) == 0
    err = capsys.readouterr().err
    # --steps/--stride differ from the calibration: one warning line, once (it used to come twice, with its source line)
    assert [ln for ln in err.splitlines() if "calibration was made with" in ln] == [
        "anofpdm evaluate: warning: inference uses N=8, k=4, ddim but the calibration was made with N=40, k=20, ddim; "
        "thr_01 and D may not transfer"
    ]
    record = strict_load(out / "run.json")
    assert record["settings"]["steps"] == 8 and record["settings"]["calibrations"]["ddim"]["steps"] == 8
    assert record["settings"]["precision"] == CPU_PRECISION and record["settings"]["device"] == "cpu"
    assert "calibration was made with" in (out / "evaluate.log").read_text()
    cases = sorted((out / "cases").glob("*.npz"))
    stamps = [p.stat().st_mtime_ns for p in cases]

    # the same settings: finished cases are reused
    assert evaluate(model, brats_store, out, "--steps", 8, "--stride", 4, "--continue") == 0
    assert [p.stat().st_mtime_ns for p in cases] == stamps
    capsys.readouterr()

    # another --steps: refused in one line, nothing touched
    assert evaluate(model, brats_store, out, "--steps", 12, "--stride", 4, "--continue") == 2  # (--steps 4 visits only t = 0: refused)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(lines) == 1 and "(steps: 8 -> 12; calibrations.ddim.steps: 8 -> 12)" in lines[0] and "new output folder, or run without --continue" in lines[0], lines
    assert strict_load(out / "run.json")["settings"]["steps"] == 8

    # another model (other weights, same folder layout): refused
    other = tmp_path / "other_model"
    shutil.copytree(model, other)
    state = torch.load(other / "model.pt", weights_only=True)
    torch.save({k: v + 1e-3 if v.is_floating_point() else v for k, v in state.items()}, other / "model.pt")
    assert evaluate(other, brats_store, out, "--steps", 8, "--stride", 4, "--continue") == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(lines) == 1 and "another model (model.sha256:" in lines[0], lines
    assert [p.stat().st_mtime_ns for p in cases] == stamps
