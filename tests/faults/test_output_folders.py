"""Guarantee 13: an output folder never destroys an input, never mixes settings, and has one writer at a time.

* No output path may be an input file of the run: the same path, a symbolic link or a hard link to it
  (``segment -i d/A.nii.gz -o d`` overwrote the scan with its mask). Refused before anything is written.
* ``_anomaly`` is a reserved case-id suffix (``A_anomaly`` would write ``A``'s map; ``--continue`` and
  ``score`` took one for the other).
* Every finished case records the settings it was made with (``CASE.json``); ``--continue`` refuses a
  folder whose cases were made with other settings, naming the setting.
* ``preprocess`` keys a finished case by its input files: a case whose files changed is made again.
* ``anofpdm.lock`` (O_EXCL, holding the pid) keeps a second run out; a stale one is taken over with a
  warning; Ctrl-C prints one line, exits 130 and removes the lock.
* A log file is never written through a symbolic link planted in the output folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anofpdm_monai.io import InputError, check_case_id
from anofpdm_monai.outputs import LOCK_NAME, check_outputs_spare_inputs, lock_folder, release_locks
from anofpdm_monai.readers import records_for_inference

from . import volumes as V


def manifest(path: Path, rows: dict[str, dict[str, Path]]) -> Path:
    """A manifest CSV: ``case_id`` and the four channel columns."""
    table = pd.DataFrame([{"case_id": case, **{c: str(p) for c, p in channels.items()}} for case, channels in rows.items()])
    table.to_csv(path, index=False)
    return path


# --- 1. outputs never land on an input ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_an_output_that_is_an_input_is_refused(tmp_path, how):
    scan = tmp_path / "in" / "scan.nii.gz"
    scan.parent.mkdir()
    scan.write_bytes(b"scan")
    out = tmp_path / "out" / "A.nii.gz"
    out.parent.mkdir()
    if how == "same":
        out = scan
    elif how == "symlink":
        out.symlink_to(scan)
    else:
        os.link(scan, out)
    with pytest.raises(InputError, match=r"would overwrite the input .*scan\.nii\.gz") as err:
        check_outputs_spare_inputs([scan], [tmp_path / "out" / "B.nii.gz", out], "choose another -o")
    assert {"same": "the same file", "symlink": "a symbolic link", "hardlink": "a hard link"}[how] in str(err.value)
    check_outputs_spare_inputs([scan], [tmp_path / "out" / "B.nii.gz"], "choose another -o")  # apart: fine


def test_segment_into_the_input_folder_is_refused_before_writing(tiny_model_d1, tmp_path):
    """The manifest names d/A.nii.gz as A's flair channel; ``-o d`` would write A's mask onto it."""
    channels, _ = V.write_case(tmp_path / "raw", "A")
    folder = tmp_path / "d"
    folder.mkdir()
    flair = folder / "A.nii.gz"
    flair.write_bytes(channels["flair"].read_bytes())
    before = flair.read_bytes()
    rows = {"A": {**channels, "flair": flair}}
    code, _, err = V.run_cli(["segment", "-m", str(tiny_model_d1), "-i", str(manifest(tmp_path / "m.csv", rows)),
                              "-o", str(folder), "--device", "cpu"])  # fmt: skip
    assert code == 2, err
    assert len(V.lines(err)) == 1 and "would overwrite the input" in err and str(flair) in err, err
    assert flair.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["A.nii.gz"], "something was written"


def test_preprocess_into_the_folder_of_its_manifest_is_refused(tmp_path):
    channels, _ = V.write_case(tmp_path / "raw", "A")
    folder = tmp_path / "d"
    folder.mkdir()
    table = manifest(folder / "manifest.csv", {"A": channels})
    before = table.read_bytes()
    code, _, err = V.run_cli(["preprocess", "-i", str(table), "-o", str(folder), "--dataset", "manifest", "--size", "64"])
    assert code == 2 and "would overwrite the input" in err, err
    assert table.read_bytes() == before


# --- 2. the reserved suffix ----------------------------------------------------------------------------------------


def test_anomaly_suffix_is_reserved(tmp_path):
    with pytest.raises(InputError, match=r"ends with '_anomaly' \(reserved"):
        check_case_id("A_anomaly", "manifest.csv")
    for name in ("A", "A_anomaly"):
        V.write_case(tmp_path / "cohort", name)
    with pytest.raises(InputError, match=r"A_anomaly.*reserved"):
        records_for_inference([tmp_path / "cohort"])


def test_score_refuses_a_label_named_like_a_map(tmp_path):
    _, seg = V.write_case(tmp_path / "raw", "A")
    preds, labels = tmp_path / "preds", tmp_path / "labels"
    preds.mkdir()
    labels.mkdir()
    (labels / "A_anomaly.nii.gz").write_bytes(seg.read_bytes())
    (preds / "A_anomaly.nii.gz").write_bytes(seg.read_bytes())
    code, _, err = V.run_cli(["score", "-p", str(preds), "-l", str(labels), "-o", str(tmp_path / "s"), "--missing-as-empty"])
    assert code == 2 and "reserved" in err and len(V.lines(err)) == 1, err


# --- 3. per-case settings and the folder lock ----------------------------------------------------------------------


def test_continue_refuses_cases_made_with_other_settings(tiny_model_d1, tmp_path):
    """S0, S1 at the calibrated 40 steps; S0 again at 20; then S0, S1 at 20 with --continue: S1 is refused."""
    for i, case in enumerate(("S0", "S1")):
        V.write_case(tmp_path / "raw", case, seed=i)
    out = tmp_path / "out"
    base = ["segment", "-m", str(tiny_model_d1), "-o", str(out), "--device", "cpu"]
    both = ["-i", str(tmp_path / "raw" / "S0"), str(tmp_path / "raw" / "S1")]
    assert V.run_cli([*base, *both])[0] == 0
    assert json.loads((out / "S1.json").read_text())["settings"]["steps"] == 40
    assert V.run_cli([*base, "-i", str(tmp_path / "raw" / "S0"), "--steps", "20", "--stride", "10"])[0] == 0
    mask = (out / "S1.nii.gz").read_bytes()
    code, _, err = V.run_cli([*base, *both, "--steps", "20", "--stride", "10", "--continue"])
    assert code == 2, err
    line = [x for x in V.lines(err) if "error" in x]
    assert len(line) == 1 and "S1.json" in line[0] and "steps 40" in line[0] and "has 20" in line[0], err
    assert "--continue" in line[0], line  # the flag, as the CLI spells it
    assert (out / "S1.nii.gz").read_bytes() == mask
    # the same settings: S0 is reused, S1 made again without --continue is fine
    assert V.run_cli([*base, *both, "--steps", "20", "--stride", "10"])[0] == 0
    code, out_text, err = V.run_cli([*base, *both, "--steps", "20", "--stride", "10", "--continue"])
    assert code == 0 and sum("done already" in x for x in V.lines(out_text)) == 2, err
    assert not (out / LOCK_NAME).exists()


def test_a_case_without_its_settings_record_is_not_finished(tiny_model_d1, tmp_path):
    """A run killed between the mask and CASE.json leaves the case unfinished: --continue makes it again."""
    V.write_case(tmp_path / "raw", "S0")
    out = tmp_path / "out"
    argv = ["segment", "-m", str(tiny_model_d1), "-i", str(tmp_path / "raw" / "S0"), "-o", str(out), "--device", "cpu"]
    assert V.run_cli(argv)[0] == 0
    (out / "S0.json").unlink()
    code, out_text, _ = V.run_cli(argv + ["--continue"])
    assert code == 0 and not any("done already" in x for x in V.lines(out_text))
    assert (out / "S0.json").is_file()


def test_lock_keeps_a_second_run_out_and_a_stale_one_is_taken_over(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        held = {"pid": sleeper.pid, "host": os.uname().nodename, "verb": "segment", "started": "2026-01-01T00:00:00Z"}
        (folder / LOCK_NAME).write_text(json.dumps(held))
        with pytest.raises(InputError, match=rf"anofpdm segment \(process {sleeper.pid}, started .*\) is writing into"):
            lock_folder(folder, "segment")
        with pytest.raises(InputError, match="is writing into"):  # a part of a sharded run is kept out too
            lock_folder(folder, "segment", (0, 2))
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(UserWarning, match=rf"process {sleeper.pid}.*no longer running.*taking the folder over"):
        path = lock_folder(folder, "segment")
    assert json.loads(path.read_text())["pid"] == os.getpid()
    release_locks()
    assert not path.exists()


def test_the_cli_refuses_a_locked_folder_in_one_line(tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": os.uname().nodename, "verb": "preprocess", "started": "x"}))
    V.write_case(tmp_path / "raw", "A")
    code, _, err = V.run_cli(["preprocess", "-i", str(tmp_path / "raw"), "-o", str(folder), "--dataset", "brats", "--size", "64"])
    assert code == 2 and len(V.lines(err)) == 1 and "process 1" in err and "is writing into" in err, err
    assert (folder / LOCK_NAME).is_file()  # not ours: left alone


def test_ctrl_c_one_line_exit_130_no_lock_left(tiny_model_d1, tmp_path, monkeypatch):
    import anofpdm_monai.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(anofpdm_monai.api, "segment_records", interrupted)  # the loop segment_cohort runs
    V.write_case(tmp_path / "raw", "S0")
    out = tmp_path / "out"
    code, _, err = V.run_cli(["segment", "-m", str(tiny_model_d1), "-i", str(tmp_path / "raw"), "-o", str(out), "--device", "cpu"])
    assert code == 130
    assert V.lines(err) == [V.lines(err)[0]] and "interrupted (Ctrl-C)" in err and "Traceback" not in err, err
    assert not (out / LOCK_NAME).exists()
    assert [p for p in out.iterdir() if p.name.startswith(".")] == []


# --- 4. preprocess redoes a case whose files changed ----------------------------------------------------------------


def test_preprocess_redoes_a_case_whose_input_files_changed(tmp_path):
    V.write_case(tmp_path / "A", "P1", shape=(40, 48, 4))
    V.write_case(tmp_path / "B", "P1", shape=(40, 48, 6))  # the same id, another volume (more slices)
    store = tmp_path / "store"
    argv = ["-o", str(store), "--dataset", "brats", "--size", "64", "--split", "1,0,0"]
    def slices() -> int:
        count = len(np.load(store / "images" / "P1.npy"))
        assert count == len(json.loads((store / "cases" / "P1.json").read_text())["slices"])
        return count

    assert V.run_cli(["preprocess", "-i", str(tmp_path / "A"), *argv])[0] == 0
    from_a = slices()
    assert V.run_cli(["preprocess", "-i", str(tmp_path / "B"), *argv])[0] == 0
    from_b = slices()
    assert from_b > from_a, "the store kept A's slices for B's case"
    assert len(pd.read_csv(store / "manifest.csv")) == from_b
    stamp = (store / "cases" / "P1.json").stat().st_mtime_ns
    assert V.run_cli(["preprocess", "-i", str(tmp_path / "B"), *argv])[0] == 0  # unchanged: kept
    assert (store / "cases" / "P1.json").stat().st_mtime_ns == stamp
    V.write_case(tmp_path / "A", "P1", shape=(40, 48, 4))
    V.write_case(tmp_path / "B", "P1", shape=(40, 48, 4))  # re-exported, now like A's
    assert V.run_cli(["preprocess", "-i", str(tmp_path / "B"), *argv])[0] == 0
    assert slices() == from_a


# --- 16. logs do not follow links ----------------------------------------------------------------------------------


def test_log_file_does_not_follow_a_planted_symlink(tmp_path):
    V.write_case(tmp_path / "raw", "A")
    store = tmp_path / "store"
    store.mkdir()
    target = tmp_path / "outside.txt"
    target.write_text("precious\n")
    (store / "preprocess.log").symlink_to(target)
    code, _, err = V.run_cli(["preprocess", "-i", str(tmp_path / "raw"), "-o", str(store), "--dataset", "brats", "--size", "64"])
    assert code == 2 and "symbolic link" in err and len(V.lines(err)) == 1, err
    assert target.read_text() == "precious\n"
