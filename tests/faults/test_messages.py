"""Guarantee 16: careless input gets one line that says what is wrong, never a traceback or a silent wrong result.

Hand-edited ``summary.json`` (report), ``phantom -o FILE``, CSV cells that a spreadsheet would run as a
formula, the bundle's README on configs as code, and the weak messages of the third adversarial pass.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from anofpdm_monai.io import InputError, atomic_save_dataframe, check_case_id
from anofpdm_monai.readers import read_cases, read_manifest

from . import volumes as V


@pytest.mark.parametrize(
    "edit, needle",
    [
        ({"unhealthy_dice": [0.5]}, r"unhealthy_dice = \[0\.5\]: must be a number or null"),
        ({"undefined": {"unhealthy_dice": 3}}, r"undefined = .*must map metrics to reasons"),
        ({"uses_pixel_labels": "yes"}, r"uses_pixel_labels = \"yes\": must be true or false"),
    ],
)
def test_report_on_a_hand_edited_summary_is_one_line(tmp_path, edit, needle):
    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.json").write_text(json.dumps({"anofpdm-ddim": {"unhealthy_dice": 0.5, **edit}}))
    code, _, err = V.run_cli(["report", str(results)])
    assert code == 2 and len(V.lines(err)) == 1 and "Traceback" not in err, err
    assert "anofpdm-ddim." in err and re.search(needle, err), err


def test_phantom_into_an_existing_file_is_refused_first(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    code, _, err = V.run_cli(["phantom", "-o", str(target), "--cases", "1"])
    assert code == 2 and "is not a folder" in err and len(V.lines(err)) == 1, err
    assert target.read_text() == "x"


def test_csv_cells_that_look_like_formulas_are_escaped(tmp_path):
    table = pd.DataFrame({"case_id": ["=HYPERLINK(1)", "+1", "@x", "-2", "ok"], "value": [-1.5, 2.0, 3.0, -4.0, 5.0]})
    atomic_save_dataframe(table, tmp_path / "t.csv")
    back = pd.read_csv(tmp_path / "t.csv")
    assert back["case_id"].tolist() == ["'=HYPERLINK(1)", "'+1", "'@x", "'-2", "ok"]
    assert back["value"].tolist() == [-1.5, 2.0, 3.0, -4.0, 5.0]  # numbers stay numbers
    with pytest.raises(InputError, match=r"starts with '-'"):  # so no case id needs escaping
        check_case_id("-rm", "manifest.csv")


def test_bundle_readme_says_configs_are_code():
    from anofpdm_monai.bundle import bundle_readme
    from anofpdm_monai.config import ModelConfig

    text = bundle_readme(ModelConfig(), "phantoms", ["anofpdm-ddim"])
    assert "configs are code" in text and "trust" in text


# --- weak messages --------------------------------------------------------------------------------------------


def test_num_parts_zero_names_the_flags(tiny_model_d1, tmp_path):
    V.write_case(tmp_path / "raw", "A")
    code, _, err = V.run_cli(["segment", "-m", str(tiny_model_d1), "-i", str(tmp_path / "raw"), "-o", str(tmp_path / "o"),
                              "--num-parts", "0"])  # fmt: skip
    assert code == 2 and "--num-parts=0" in err and "--part-id" in err and "num_parts=" not in err, err


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--steps", "1001"], r"--steps=1001: the model was trained with 1000 diffusion timesteps"),
        (["--steps", "20", "--stride", "50"], r"--stride=50 with --steps=20 visits only t = 0"),
    ],
)
def test_step_budget_messages_name_the_flags(tiny_model_d1, tmp_path, flags, needle):
    V.write_case(tmp_path / "raw", "A")
    code, _, err = V.run_cli(["segment", "-m", str(tiny_model_d1), "-i", str(tmp_path / "raw"), "-o", str(tmp_path / "o"),
                              "--device", "cpu", *flags])  # fmt: skip
    assert code == 2 and re.search(needle, err) and "alphas_cumprod" not in err, err
    assert not (tmp_path / "o").exists()


def test_score_refuses_the_same_folder_and_a_probability_label(tmp_path):
    _, seg = V.write_case(tmp_path / "raw", "A")
    folder = tmp_path / "masks"
    folder.mkdir()
    (folder / "A.nii.gz").write_bytes(seg.read_bytes())
    code, _, err = V.run_cli(["score", "-p", str(folder), "-l", str(folder), "-o", str(tmp_path / "s")])
    assert code == 2 and "the same folder" in err, err
    labels = tmp_path / "labels"
    labels.mkdir()
    V.spoil_fractional_labels({}, V.save_nifti(labels / "A.nii.gz", V._data(seg)))
    code, _, err = V.run_cli(["score", "-p", str(folder), "-l", str(labels), "-o", str(tmp_path / "s")])
    assert code != 0 and "not a probability map" in err, err


def test_case_ids_that_differ_only_by_case_are_refused(tmp_path):
    V.write_case(tmp_path / "cohort", "Case1")
    V.write_case(tmp_path / "cohort", "case1")
    with pytest.raises(InputError, match=r"'Case1'.*'case1' differ only by upper/lower case"):
        read_cases(tmp_path / "cohort", "brats")


def test_manifest_with_spaces_after_commas(tmp_path):
    channels, _ = V.write_case(tmp_path / "raw", "A")
    table = tmp_path / "m.csv"
    table.write_text("case_id, flair, t1, t1ce, t2\n" + "A, " + ", ".join(str(p) for p in channels.values()) + "\n")
    (record,) = read_manifest(table)
    assert list(record.channels) == list(channels) and list(record.channels.values()) == list(channels.values())


def test_evaluate_a_missing_input_leaves_no_folder(tiny_model_d1, tmp_path):
    out = tmp_path / "out"
    code, _, err = V.run_cli(["evaluate", "-m", str(tiny_model_d1), "-i", str(tmp_path / "missing"), "-o", str(out),
                              "--device", "cpu"])  # fmt: skip
    assert code == 2, err
    assert not out.exists()
