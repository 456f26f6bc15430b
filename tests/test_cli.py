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


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "segment" in out.stdout


def test_unknown_verb_exits_nonzero():
    with pytest.raises(SystemExit) as err:
        main(["frobnicate"])
    assert err.value.code != 0
