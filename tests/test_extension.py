"""Methods as the unit of extension (docs/architecture.md, "How to add a method").

This module registers two throw-away methods the way a new system is added, without editing any
library module, and runs them through ``evaluate_cohort`` and ``segment``:

* ``anofpdm-ddim-half``: an AnoFPDM decision variant with its own calibration section ("half": the
  fraction of the slice's map maximum a pixel must reach), on the shared DDIM forward process;
* ``toyrecon``: a pixel-label-tuned reconstruction baseline that needs a component
  (``MODEL/baselines/toylevel/``), with a one-hyperparameter grid.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_segment import AFFINES, make_model, write_case

from anofpdm_monai import methods as registry
from anofpdm_monai.api import segment
from anofpdm_monai.calibration import Calibration
from anofpdm_monai.evaluation import EvaluationSettings, evaluate_cohort, load_case_results
from anofpdm_monai.forward_process import MAP_REDUCERS, MapReducer, register_map_reducer
from anofpdm_monai.methods import (
    AnoFPDMMethod,
    CalibrationSection,
    Component,
    Decision,
    MapsResult,
    ReconstructionMethod,
    register,
    register_decision,
)
from anofpdm_monai.model import AnoFPDMModel, InferenceSettings, available_methods
from anofpdm_monai.segmentation import decide_slices, mixed_setup_masks
from pipelines.cli import main

HALF, TOY = "anofpdm-ddim-half", "toyrecon"


@dataclasses.dataclass
class HalfCalibration:
    fraction: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HalfCalibration:
        return cls(**data)


def half_masks(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, S, S) maps -> masks: the pixels at or above ``fraction`` of their slice's maximum (and above 0)."""
    peak = maps.flatten(1).max(dim=1).values[:, None, None]
    return (maps >= fraction * peak) & (maps > 0)


def half_decision(result, volume, calibration, section: HalfCalibration, setup: str):
    """The paper's health decision and map; the mask from the section's fraction."""
    out = decide_slices(result, calibration, setup=setup)
    masks = half_masks(out.maps, section.fraction)
    mixed = mixed_setup_masks(masks, out.predicted_unhealthy)
    return dataclasses.replace(out, masks=mixed if setup == "mixed" else masks, mixed_masks=mixed)


def toy_maps(context, x0: torch.Tensor, seeds, params) -> MapsResult:
    """|mean of the map channels - the component's level| times the gain: (B, S, S)."""
    channels = list(context.calibration("ddim").map_channel_indices)
    return MapsResult((x0[:, channels].mean(dim=1) - context.components["toylevel"]).abs() * params["gain"], network_calls=0)


SECTION = CalibrationSection("half", HalfCalibration, calibrate=lambda context: HalfCalibration(0.5), missing="add the 'half' section")
COMPONENT = Component("toylevel", load=lambda model, device: json.loads((model.folder / "baselines" / "toylevel" / "level.json").read_text())["level"],
                      command=lambda folder: f"python make_toylevel.py {folder}")  # fmt: skip


@pytest.fixture(scope="module")
def registered():
    """The two methods in the registry for this module's tests only."""
    register_decision(Decision("half", half_decision, section=SECTION))
    register(AnoFPDMMethod(HALF, "the paper's map, half-maximum masks", encoding="ddim", variant="half"))
    register(ReconstructionMethod(TOY, "distance to a level", maps=toy_maps, grid=lambda context: {"gain": [1.0, 2.0]},
                                  components=(COMPONENT,), footnote="toyrecon's gain and threshold are tuned on validation masks"))  # fmt: skip
    yield
    for table, name in ((registry.REGISTRY, HALF), (registry.REGISTRY, TOY), (registry.DECISIONS, "half"), (registry.SECTIONS, "half")):
        table.pop(name)


@pytest.fixture(scope="module")
def model(registered, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-made model folder with the 'half' section in its calibration and the toy component."""
    folder = make_model(tmp_path_factory.mktemp("extension") / "model", w=1.0, thr_01=0.999, D=10.0)
    assert HALF not in available_methods(folder) and TOY not in available_methods(folder)
    calibration = Calibration.load(folder / "calibration.json")
    calibration.sections["half"] = HalfCalibration(0.5)
    calibration.save(folder / "calibration.json")
    (folder / "baselines" / "toylevel").mkdir(parents=True)
    (folder / "baselines" / "toylevel" / "level.json").write_text(json.dumps({"level": -0.5}))
    assert {HALF, TOY} <= set(available_methods(folder))
    assert json.loads((folder / "calibration.json").read_text())["half"] == {"fraction": 0.5}
    return folder


def test_registered_methods_run_through_evaluate_cohort(model, brats_store, tmp_path):
    results = tmp_path / "results"
    settings = InferenceSettings(seed=0, precision="fp32")
    evaluation = EvaluationSettings(methods=("anofpdm-ddim", HALF, TOY, "threshold"), max_slices=6, tune_slices=8)
    outcome = evaluate_cohort(AnoFPDMModel.from_folder(model, "cpu"), brats_store, results, settings, evaluation, progress=False)
    assert outcome.skipped == {} and not outcome.failed and set(outcome.summary) == {"anofpdm-ddim", HALF, TOY, "threshold"}
    assert outcome.summary[TOY]["uses_pixel_labels"] and not outcome.summary[HALF]["uses_pixel_labels"]
    assert "toyrecon's gain and threshold are tuned on validation masks" in (results / "summary.md").read_text()
    tuned = outcome.tuning[TOY].setups
    assert tuned["mixed"].params == {"gain": 1.0}  # the gain scales the maps: DICE ties, the first grid point wins
    assert json.loads((results / "run.json").read_text())["settings"]["tuning"][TOY]["unhealthy"]["params"] == {"gain": 1.0}
    assert (results / "tuning" / f"{TOY}.json").is_file()
    for case in outcome.done:
        arrays, facts = load_case_results(results / "cases" / f"{case}.npz")
        # the variant decided on the same forward process as anofpdm-ddim: same maps, its own masks
        np.testing.assert_array_equal(arrays[f"{HALF}/maps"], arrays["anofpdm-ddim/maps"])
        np.testing.assert_array_equal(arrays[f"{HALF}/masks"], half_masks(torch.from_numpy(arrays[f"{HALF}/maps"]), 0.5).numpy())
        assert facts[HALF]["calls"] == facts["anofpdm-ddim"]["calls"] == 2
        # the baseline: its maps from the component, its masks from its tuned threshold within the brain
        images = torch.from_numpy(arrays["intensity"])
        np.testing.assert_allclose(arrays[f"{TOY}/maps"], (images + 0.5).abs().numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(arrays[f"{TOY}/masks"], (arrays[f"{TOY}/maps"] >= tuned["unhealthy"].threshold) & arrays["foreground"])


def test_a_method_whose_component_is_missing_is_skipped_in_one_line(model, brats_store, tmp_path, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    shutil.rmtree(bare / "baselines")
    evaluation = EvaluationSettings(methods=("anofpdm-ddim", TOY), max_slices=2)
    outcome = evaluate_cohort(AnoFPDMModel.from_folder(bare, "cpu"), brats_store, tmp_path / "results", None, evaluation, progress=False)
    line = outcome.skipped[TOY]
    assert line == f"{TOY} skipped: {bare / 'baselines' / 'toylevel'} is missing; make it with: python make_toylevel.py {bare}"
    assert set(outcome.summary) == {"anofpdm-ddim"} and TOY not in available_methods(bare)


def test_a_registered_variant_runs_through_segment(model, tmp_path):
    case = write_case(tmp_path / "BraTS2021_00009", "BraTS2021_00009", AFFINES["LPS"])
    [out] = segment([str(tmp_path / "BraTS2021_00009")], model, method=HALF, device="cpu", progress=False, output_dir=tmp_path / "out")
    slices = out.result.slices
    expected = mixed_setup_masks(half_masks(slices.maps, 0.5), slices.predicted_unhealthy)
    assert torch.equal(slices.masks, expected) and out.mask.shape == case["lesion"].shape
    assert (tmp_path / "out" / "BraTS2021_00009.nii.gz").is_file()
    # and from the command line: the verb's --method takes every registered AnoFPDM method
    assert main(["segment", "-m", str(model), "-i", str(tmp_path / "BraTS2021_00009"), "-o", str(tmp_path / "cli"),
                 "--method", HALF, "--device", "cpu"]) == 0  # fmt: skip


def test_a_calibration_hook_makes_its_section(model, brats_store, tmp_path):
    """``calibrate_model`` runs every registered section's hook: the 'half' one is written beside the volume family's."""
    from anofpdm_monai.cohorts import CalibrationSettings, calibrate_model

    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    settings = CalibrationSettings(w_grid=(1.0,), n_val=8, steps=(40,), stride=20, section_cases=1, batch_size=8)
    outcome = calibrate_model(AnoFPDMModel.from_folder(folder, "cpu"), brats_store, settings)
    saved = json.loads((folder / "calibration.json").read_text())
    assert saved["half"] == {"fraction": 0.5} and saved["volume"]["n_val_volumes"] == 1
    assert outcome.calibration.section("half") == HalfCalibration(0.5)


# ---------------------------------------------------------------- a new reduction of the forward process's maps

PEAK = "anofpdm-ddim-peak"


class PeakMap(MapReducer):
    """The largest SAM of each pixel over every visited step (a reduction the engine does not know)."""

    def __init__(self, like: torch.Tensor, include_end_step: bool) -> None:
        super().__init__(like, include_end_step)
        self.peak = torch.zeros_like(like)

    def update(self, sam: torch.Tensor, improved: torch.Tensor) -> None:
        self.peak = torch.maximum(self.peak, sam)

    def result(self, end_index: torch.Tensor) -> torch.Tensor:
        return self.peak


def peak_decision(result, volume, calibration, section: HalfCalibration, setup: str):
    """The paper's health decision; the map from the 'peak' reducer (channel mean), masks at half its slice maximum."""
    out = decide_slices(result, calibration, setup=setup)
    maps = result.maps["peak"][0].mean(dim=1)
    masks = half_masks(maps, section.fraction)
    mixed = mixed_setup_masks(masks, out.predicted_unhealthy)
    return dataclasses.replace(out, maps=maps, masks=mixed if setup == "mixed" else masks, mixed_masks=mixed)


@pytest.fixture(scope="module")
def peak_registered(registered):
    register_map_reducer("peak", PeakMap)
    register_decision(Decision("peak", peak_decision, section=SECTION))
    register(AnoFPDMMethod(PEAK, "the largest SAM over the steps, half-maximum masks", encoding="ddim", variant="peak"))
    yield
    for table, name in ((registry.REGISTRY, PEAK), (registry.DECISIONS, "peak"), (MAP_REDUCERS, "peak")):
        table.pop(name)


def test_a_registered_map_reducer_feeds_a_new_variant_through_evaluate_and_segment(peak_registered, model, brats_store, tmp_path):
    """A map the engine never computed, added from this module: every forward process runs it, and the
    variant reading it goes through evaluate_cohort and segment with no library edit."""
    results = tmp_path / "results"
    evaluation = EvaluationSettings(methods=("anofpdm-ddim", "anofpdm-ddim-last", PEAK), max_slices=6)
    outcome = evaluate_cohort(AnoFPDMModel.from_folder(model, "cpu"), brats_store, results, InferenceSettings(precision="fp32"),
                              evaluation, progress=False)  # fmt: skip
    assert not outcome.failed and PEAK in outcome.summary
    for case in outcome.done:
        arrays, facts = load_case_results(results / "cases" / f"{case}.npz")
        peak, last = arrays[f"{PEAK}/maps"], arrays["anofpdm-ddim-last/maps"]
        assert facts[PEAK]["calls"] == facts["anofpdm-ddim"]["calls"], "one forward process for the three"
        assert (peak > 0).any() and not np.array_equal(peak, last)
    write_case(tmp_path / "BraTS2021_00011", "BraTS2021_00011", AFFINES["LPS"])
    [out] = segment([str(tmp_path / "BraTS2021_00011")], model, method=PEAK, device="cpu", progress=False, output_dir=tmp_path / "out")
    assert (tmp_path / "out" / "BraTS2021_00011.nii.gz").is_file() and out.result.slices.maps.shape[0] > 0


def test_map_reducers_refuse_a_taken_name_or_a_non_reducer():
    with pytest.raises(ValueError, match="already registered"):
        register_map_reducer("aggregated", PeakMap)
    with pytest.raises(ValueError, match="not a MapReducer subclass"):
        register_map_reducer("nope", dict)
