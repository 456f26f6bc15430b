from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import VERBS, build_parser, cli_reference, main

ROOT = Path(__file__).resolve().parents[1]


def test_docs_cli_md_is_the_current_help():
    assert (ROOT / "docs" / "cli.md").read_text() == cli_reference(), (
        "docs/cli.md is stale: regenerate it with the command at its top"
    )


def test_help_lists_exactly_the_verbs_that_have_a_run():
    import importlib

    parser = build_parser()
    help_text = parser.format_help()
    for verb, (module, _) in VERBS.items():
        assert verb in help_text
        assert callable(importlib.import_module(f"pipelines.{module}").run)


IMPORTED = "import sys; from pipelines.cli import main\ntry:\n    main({argv})\nexcept SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'monai', 'monai.networks') if m in sys.modules))"


@pytest.mark.parametrize("argv, imported", [(["--help"], []), (["phantom", "--help"], ["torch"]), (["report", "--help"], ["torch"])])
def test_help_and_light_verbs_import_no_monai_networks(argv, imported):
    """``anofpdm --help`` imports neither torch nor MONAI; verbs that build no network do not import MONAI's networks."""
    out = subprocess.run([sys.executable, "-c", IMPORTED.format(argv=argv)], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == str(imported)


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "segment" in out.stdout


def test_unknown_verb_exits_nonzero():
    with pytest.raises(SystemExit) as err:
        main(["frobnicate"])
    assert err.value.code != 0


# ---------------------------------------------------------------- library arguments shown as flags


def test_flag_names_come_from_the_verb_parser():
    from pipelines import evaluate, train
    from pipelines.options import flag_names

    names = flag_names(train.add_arguments)
    assert names["batch_size"] == "--batch-size" and names["output"] == "--output" and names["resume"] == "--resume"
    assert flag_names(evaluate.add_arguments)["resume"] == "--continue", "dest -> the flag that sets it, not a guess"
    assert "dataset" not in flag_names(evaluate.add_arguments)


def test_cli_message_renames_only_the_declared_whole_words():
    from anofpdm_monai.io import InputError
    from pipelines import calibrate
    from pipelines.options import cli_message

    err = InputError("/data/n_val/x: no unhealthy slices; n_val_healthy=0; give more slices (n_val)", arguments="n_val")
    assert cli_message(err, calibrate.add_arguments) == "/data/n_val/x: no unhealthy slices; n_val_healthy=0; give more slices (--n-val)"
    undeclared = InputError("batch_size=0 must be at least 1")
    assert cli_message(undeclared, calibrate.add_arguments) == str(undeclared)
    assert cli_message(ValueError("batch_size=0"), calibrate.add_arguments) == "batch_size=0"


@pytest.mark.parametrize(
    "argv, needle",
    [(["--threads", "0"], "anofpdm segment: error: --threads=0: give at least 1"),
     (["--max-voxels", "0"], "anofpdm segment: error: --max-voxels=0: give a positive whole number of voxels")],
)  # fmt: skip
def test_the_cli_names_the_flag_where_the_library_names_the_argument(tmp_path, capsys, argv, needle):
    code = main(["segment", "-m", str(tmp_path / "m"), "-i", str(tmp_path / "x"), "-o", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [err] and err.startswith(needle), err


def test_calibrate_with_one_class_names_the_n_val_flag(tmp_path, capsys, brats_store):
    from test_segment import make_model

    model = make_model(tmp_path / "m", calibrate=False)
    code = main(["calibrate", "-m", str(model), "-d", str(brats_store), "--n-val", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "calibration needs both classes (give more validation slices, --n-val)" in err, err
    assert not list(model.glob("calibration*.json")), "nothing written"


@pytest.mark.parametrize(
    "verb, argv",
    [("segment", ["-m", "bundled", "-i", "{missing}", "--device", "cpu"]),
     ("evaluate", ["-m", "bundled", "-i", "{missing}", "--device", "cpu"]),
     ("preprocess", ["-i", "{missing}", "--dataset", "brats"]),
     ("score", ["-p", "{missing}", "-l", "{missing}"])],
)  # fmt: skip
def test_a_refused_input_leaves_no_output_folder(tmp_path, capsys, verb, argv):
    """A missing input is refused in one line naming it, before the output folder exists."""
    missing, out = tmp_path / "no_such_input", tmp_path / "out"
    code = main([verb, *[a.format(missing=missing) for a in argv], "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(missing) in err and len(err.splitlines()) == 1, err
    assert not out.exists(), f"{verb} left {sorted(p.name for p in out.rglob('*'))}"
