"""Guarantee 10: every JSON file anofpdm writes is strict JSON; an undefined metric is null, with the reason.

Python's json module writes NaN as the bare token ``NaN``, which strict parsers (JavaScript, jq,
Go, ...) reject. An all-healthy cohort has no unhealthy slice, so several summary metrics are
undefined there: they are written as ``null`` and the row's ``undefined`` object says why. The
``threshold`` baseline row is kept (with nulls and its reason), not dropped silently.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from anofpdm_monai.io import atomic_write_json, strict_json

from . import volumes as V


def strict_load(path: Path):
    """json.load that refuses NaN, Infinity and -Infinity, as strict parsers do."""

    def refuse(token):
        raise ValueError(f"{path}: non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_strict_json_writes_null_for_nan_and_infinity(tmp_path):
    data = {"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": np.float32("nan"), "d": np.int64(3), "e": (np.float64(2.5),)}
    assert strict_json(data) == {"a": None, "b": [1.0, None, None], "c": None, "d": 3, "e": [2.5]}
    atomic_write_json(tmp_path / "x.json", data)
    assert strict_load(tmp_path / "x.json")["b"] == [1.0, None, None]


def test_calibration_and_config_files_are_strict(tmp_path):
    from anofpdm_monai.calibration import Calibration
    from anofpdm_monai.config import ModelConfig

    calibration = Calibration(w=1.0, thr_01=0.5, D=[0.1], steps=4, stride=1, encoding="ddim", map_channels=["flair"],
                              map_channel_indices=[0], w_grid=[1.0, 2.0], accuracy=[0.5, math.nan], thresholds=[0.5, math.nan])  # fmt: skip
    calibration.save(tmp_path / "calibration.json")
    assert strict_load(tmp_path / "calibration.json")["thresholds"] == [0.5, None]
    assert Calibration.load(tmp_path / "calibration.json").thr_01 == 0.5
    ModelConfig().save(tmp_path / "config.json")
    strict_load(tmp_path / "config.json")


@pytest.fixture(scope="module")
def healthy_run(tiny_model, tmp_path_factory) -> Path:
    """``evaluate`` (AnoFPDM and the oracle threshold) on a cohort whose lesion masks are all empty."""
    root = tmp_path_factory.mktemp("healthy_raw")
    for seed, case in enumerate(("H1", "H2")):
        V.write_case(root, case, seed=seed, seg=np.zeros(V.SHAPE, np.uint8))
    out = tmp_path_factory.mktemp("healthy_eval")
    code, _, err = V.run_cli(["evaluate", "-m", str(tiny_model), "-i", str(root), "-o", str(out), "--device", "cpu",
                              "--methods", "anofpdm-ddim,threshold"])  # fmt: skip
    assert code == 0, err
    return out


def test_summary_of_an_all_healthy_cohort_is_strict_json(healthy_run):
    rows = strict_load(healthy_run / "summary.json")
    assert set(rows) == {"anofpdm-ddim", "threshold"}, "the threshold row must not vanish"
    row = rows["anofpdm-ddim"]
    assert row["n_unhealthy"] == 0
    for metric in ("unhealthy_dice", "unhealthy_iou", "unhealthy_auprc"):
        assert row[metric] is None
        assert "no unhealthy slice" in row["undefined"][metric], row["undefined"]
    assert all(v is not None for k, v in row.items() if k not in row["undefined"])


def test_threshold_row_says_why_it_is_empty(healthy_run):
    row = strict_load(healthy_run / "summary.json")["threshold"]
    assert row["mixed_dice"] is None and row["unhealthy_dice"] is None
    assert "no lesion voxel" in row["undefined"]["oracle_threshold"], row["undefined"]
    text = (healthy_run / "summary.md").read_text()
    assert "threshold" in text
