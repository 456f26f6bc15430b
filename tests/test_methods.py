"""The method registry: names, kinds, pixel-label footnotes; the summary's footnotes come from it."""

from __future__ import annotations

import pytest

from anofpdm_monai.methods import (
    DECISIONS,
    REGISTRY,
    AnoFPDMMethod,
    Decision,
    MethodContext,
    ReconstructionMethod,
    ThresholdMethod,
    all_methods,
    anofpdm_methods,
    calibration_sections,
    get_decision,
    get_method,
    grid_points,
    register,
    register_decision,
)
from anofpdm_monai.metrics import summary_markdown


def test_every_anofpdm_method_names_a_known_encoding_and_a_registered_decision():
    assert set(anofpdm_methods()) == {n for n, m in all_methods().items() if m.kind == "anofpdm"}
    for method in anofpdm_methods().values():
        assert method.encoding in ("ddim", "ddpm") and get_decision(method.variant).name == method.variant
    assert {"anofpdm-ddim-volume", "anofpdm-ddpm-volume", "ddib", "threshold"} <= set(all_methods())
    assert list(all_methods())[:2] == ["anofpdm-ddim", "anofpdm-ddim-last"] and list(all_methods())[-1] == "threshold"
    assert get_decision("volume").section is calibration_sections()["volume"] and get_decision("volume").needs_volume
    assert isinstance(get_method("ddib"), ReconstructionMethod) and isinstance(get_method("threshold"), ThresholdMethod)


def test_registration_is_checked():
    with pytest.raises(ValueError, match="registered already"):
        register(ThresholdMethod("threshold", "again", footnote="x"))
    with pytest.raises(ValueError, match="footnote"):
        ThresholdMethod("peek", "tuned on masks")
    with pytest.raises(ValueError, match="encoding 'dd' must be one of"):
        AnoFPDMMethod("half", "bad encoding", encoding="dd")
    with pytest.raises(ValueError, match="needs its maps function"):
        ReconstructionMethod("nomaps", "x", footnote="x")
    with pytest.raises(ValueError, match="must be non-empty without"):
        ThresholdMethod("a/b", "x", footnote="x")
    with pytest.raises(ValueError, match="decision 'aggregated' is registered already"):
        register_decision(Decision("aggregated", lambda *a: None))
    with pytest.raises(ValueError, match="unknown method 'nope'|method='nope' is unknown"):
        get_method("nope")
    with pytest.raises(ValueError, match="unknown decision variant 'nope'"):
        get_decision("nope")
    assert "aggregated" in DECISIONS


def test_a_reconstruction_methods_grid_takes_the_runs_candidates_and_refuses_unknown_ones():
    method = ReconstructionMethod("toy", "x", maps=lambda *a: None, grid=lambda context: {"a": [1, 2], "b": [3]}, footnote="x")
    context = MethodContext(model=None, settings=None)
    assert method.tuning_grid(context) == {"a": [1, 2], "b": [3]}
    assert method.tuning_grid(context, {"b": [4, 5]}) == {"a": [1, 2], "b": [4, 5]}
    assert grid_points(method.tuning_grid(context, {"b": [4, 5]})) == [{"a": 1, "b": 4}, {"a": 1, "b": 5}, {"a": 2, "b": 4}, {"a": 2, "b": 5}]
    with pytest.raises(ValueError, match=r"tune: toy has no hyperparameter \['c'\]; it has \['a', 'b'\]"):
        method.tuning_grid(context, {"c": [1]})


def test_summary_footnotes_come_from_the_registry(monkeypatch):
    monkeypatch.setitem(REGISTRY, "peek", ThresholdMethod("peek", "x", footnote="peek saw the masks"))
    rows = {"anofpdm-ddim": {"uses_pixel_labels": False}, "peek": {"uses_pixel_labels": True}}
    assert summary_markdown(rows).splitlines()[-1] == "† uses pixel labels: peek saw the masks."
