"""The method registry: names, kinds, pixel-label footnotes; the summary's footnotes come from it."""

from __future__ import annotations

import pytest

from anofpdm_monai.inferers import ANOFPDM_METHODS, VARIANTS
from anofpdm_monai.methods import REGISTRY, Method, get_method, register
from anofpdm_monai.metrics import summary_markdown


def test_every_anofpdm_method_names_a_known_encoding_and_variant():
    assert set(ANOFPDM_METHODS) == {n for n, m in REGISTRY.items() if m.kind == "anofpdm"}
    for encoding, variant in ANOFPDM_METHODS.values():
        assert encoding in ("ddim", "ddpm") and variant in VARIANTS
    assert {"anofpdm-ddim-volume", "anofpdm-ddpm-volume", "ddib", "threshold"} <= set(REGISTRY)


def test_registration_is_checked():
    with pytest.raises(ValueError, match="registered already"):
        register(Method("ddib", "ddib", "again"))
    with pytest.raises(ValueError, match="footnote"):
        Method("peek", "threshold", "tuned on masks", uses_pixel_labels=True)
    with pytest.raises(ValueError, match="encoding and variant"):
        Method("half", "anofpdm", "no encoding")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


def test_summary_footnotes_come_from_the_registry(monkeypatch):
    monkeypatch.setitem(REGISTRY, "peek", Method("peek", "threshold", "x", uses_pixel_labels=True, footnote="peek saw the masks"))
    rows = {"anofpdm-ddim": {"uses_pixel_labels": False}, "peek": {"uses_pixel_labels": True}}
    assert summary_markdown(rows).splitlines()[-1] == "† uses pixel labels: peek saw the masks."
