"""Inferers: decisions once per volume, outputs independent of batching, and one path for segment and evaluate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_segment import AFFINES, make_model, use_oracle, write_case

from anofpdm_monai.calibration import Calibration
from anofpdm_monai.evaluation import Cohort, CohortEvaluator, load_case_results
from anofpdm_monai.inferers import VolumeInferer, slice_seeds
from anofpdm_monai.volume_mode import VolumeCalibration

VOLUME_SECTION = dict(map_filter=3, pixel_quantile=0.99, pixel_threshold=1e-4, min_lesion_mm3=20.0, health="dmax",
                      smooth_slices=True, health_threshold=1e-4, accuracy=0.9, mask_accuracy=0.9)  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    """A model folder with DDIM and DDPM calibrations, both with the volume family (run with the OracleHealer)."""
    folder = make_model(tmp_path_factory.mktemp("inferers") / "model", w=1.0, thr_01=0.99, D=10.0)
    calibration = Calibration.load(folder / "calibration.json")
    calibration.sections["volume"] = VolumeCalibration(**VOLUME_SECTION)
    calibration.save(folder / "calibration.json")
    calibration.encoding = "ddpm"
    calibration.save(folder / "calibration_ddpm.json")
    return folder


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("inferers_case") / "BraTS2021_00007"
    return write_case(folder, "BraTS2021_00007", AFFINES["LPS"], names=("flair", "t1", "t1ce", "t2"))


def test_slice_seeds_depend_on_case_and_slice_only():
    assert slice_seeds(0, "A", [3, 4]) == slice_seeds(0, "A", [7, 3, 4])[1:]
    assert slice_seeds(0, "A", [3]) != slice_seeds(0, "B", [3]) != slice_seeds(1, "A", [3])


@pytest.mark.parametrize("method", ["anofpdm-ddim", "anofpdm-ddpm", "anofpdm-ddim-volume", "anofpdm-ddpm-volume"])
def test_masks_and_maps_do_not_depend_on_the_batch_size(model, case, method, monkeypatch):
    use_oracle(monkeypatch, w=1.0)
    outputs = []
    for batch_size in (3, 8):
        inferer = VolumeInferer(model, method=method, batch_size=batch_size, device="cpu", precision="fp32")
        result = inferer(case["paths"], case_id="BraTS2021_00007")
        outputs.append(result)
    a, b = outputs
    assert a.slices.masks.any() and (a.slices.maps > 0).any(), "an empty output would prove nothing"
    torch.testing.assert_close(a.slices.maps, b.slices.maps, rtol=0, atol=1e-6)
    assert torch.equal(a.slices.masks, b.slices.masks)
    assert np.array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.anomaly, b.anomaly, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["anofpdm-ddpm", "anofpdm-ddim-volume"])
def test_segment_and_evaluate_give_the_same_mask(model, case, method, monkeypatch):
    """The mixed-setup mask evaluate scores is the one segment writes (same case id, same settings)."""
    use_oracle(monkeypatch, w=1.0)
    inferer = VolumeInferer(model, method=method, batch_size=4, device="cpu", precision="fp32")
    segmented = inferer(case["paths"], case["label"], case_id="BraTS2021_00007")
    cohort_root = case["paths"][0].parent.parent
    results = cohort_root.parent / f"results_{method}"
    evaluator = CohortEvaluator(VolumeInferer(inferer.model, inferer.settings, batch_size=5), [method], results)
    evaluator.evaluate_case(Cohort(cohort_root, inferer).load("BraTS2021_00007"))
    arrays, facts = load_case_results(evaluator.case_file("BraTS2021_00007"))
    assert segmented.slices.masks.any()
    assert np.array_equal(arrays[f"{method}/mixed_masks"], segmented.slices.masks.numpy())
    np.testing.assert_allclose(arrays[f"{method}/maps"], segmented.slices.maps.numpy(), rtol=0, atol=1e-6)
    # the 3-D DICE evaluate reports is that of the mask segment writes on the input grid
    from anofpdm_monai.metrics import volume_dice
    from anofpdm_monai.scoring import match_lesions, read_mask

    truth, label_image = read_mask(case["label"])
    assert facts[method]["dice_3d_native"] == pytest.approx(volume_dice(segmented.mask.astype(bool), truth))
    assert facts[method]["lesions"] == match_lesions(segmented.mask.astype(bool), truth, label_image.affine).to_dict()


def test_a_calibration_without_the_volume_section_runs_the_paper_family_and_says_to_recalibrate(tmp_path):
    from anofpdm_monai.io import InputError
    from anofpdm_monai.model import available_methods as supported_methods

    folder = make_model(tmp_path / "old")  # a calibration.json as written before the volume family existed
    VolumeInferer(folder, method="anofpdm-ddim", device="cpu")
    with pytest.raises(InputError, match="recalibrate"):
        VolumeInferer(folder, method="anofpdm-ddim-volume", device="cpu")
    assert "anofpdm-ddim-volume" not in supported_methods(folder) and "anofpdm-ddim" in supported_methods(folder)


def test_the_volume_family_decides_on_the_input_grid_in_mm3(model, case, monkeypatch):
    """segment's volume-family mask: thresholded from the upsampled map, components sized in the input's mm^3,
    anchored to slices predicted unhealthy in the mixed setup."""
    import dataclasses

    from scipy import ndimage

    from anofpdm_monai.volume_mode import input_grid_mask

    use_oracle(monkeypatch, w=1.0)
    inferer = VolumeInferer(model, method="anofpdm-ddim-volume", batch_size=4, device="cpu", precision="fp32")
    result = inferer(case["paths"], case_id="BraTS2021_00007")
    section, geometry = inferer.slice_inferer.sections["volume"], result.case.geometry
    assert result.mask.shape == result.anomaly.shape and result.mask.any(), "an empty mask would prove nothing"
    assert (result.anomaly[result.mask > 0] >= section.pixel_threshold).all(), "every mask voxel passes on the input grid"
    labels, count = ndimage.label(result.mask, np.ones((3, 3, 3), dtype=bool))
    voxel_mm3 = abs(np.linalg.det(np.asarray(geometry.input_affine)[:3, :3]))
    sizes = np.bincount(labels.ravel())[1:] * voxel_mm3
    assert sizes.min() >= section.min_lesion_mm3
    larger = dataclasses.replace(section, min_lesion_mm3=float(sizes.max()) + voxel_mm3 / 2)
    assert not input_grid_mask(result.slices, geometry, larger, "mixed").any(), "the size filter runs in input mm^3"
    smaller = dataclasses.replace(section, min_lesion_mm3=float(sizes.max()) - voxel_mm3 / 2)
    assert input_grid_mask(result.slices, geometry, smaller, "mixed").any()
    healthy = dataclasses.replace(result.slices, predicted_unhealthy=torch.zeros_like(result.slices.predicted_unhealthy))
    assert not input_grid_mask(healthy, geometry, section, "mixed").any(), "no anchor, no component"
    assert np.array_equal(input_grid_mask(healthy, geometry, section, "unhealthy"), input_grid_mask(result.slices, geometry, section, "unhealthy"))


def test_segment_defaults_to_the_volume_family_where_the_calibration_has_it(model, tmp_path):
    import json

    from anofpdm_monai.model import default_method
    from pipelines.cli import main

    assert default_method(model) == "anofpdm-ddim-volume"
    assert default_method(make_model(tmp_path / "old")) == "anofpdm-ddim", "no volume section: the paper's method"
    case = write_case(tmp_path / "BraTS2021_00008", "BraTS2021_00008", AFFINES["LPS"], names=("flair", "t1", "t1ce", "t2"))
    assert main(["segment", "-m", str(model), "-i", str(case["paths"][0].parent), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "out" / "BraTS2021_00008.json").read_text())["settings"]["method"] == "anofpdm-ddim-volume"
