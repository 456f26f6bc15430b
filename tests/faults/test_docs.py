"""docs/reliability.md states the tolerances the code uses and names tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

from anofpdm_monai.forward_process import X0_TOLERANCE
from anofpdm_monai.io import AFFINE_TOLERANCE_MM

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def test_doc_states_the_current_tolerances():
    text = DOC.read_text()
    assert f"`AFFINE_TOLERANCE_MM = {AFFINE_TOLERANCE_MM:g}`" in text
    assert f"`X0_TOLERANCE = {X0_TOLERANCE:g}`" in text


def test_doc_names_only_tests_that_exist():
    here = Path(__file__).resolve().parent
    defined = {m for f in here.glob("test_*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    named = set(re.findall(r"`(test_\w+)(?:\[[^\]]*\])?`", DOC.read_text()))
    assert named, "the doc names no tests"
    assert named <= defined, f"docs/reliability.md names tests that do not exist: {sorted(named - defined)}"
    assert defined - {"test_doc_states_the_current_tolerances", "test_doc_names_only_tests_that_exist"} <= named, (
        f"tests not listed in docs/reliability.md: {sorted(defined - named)}"
    )
