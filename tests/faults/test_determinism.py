"""Guarantee 4: the same seed gives bit-identical anomaly maps and masks on CPU, for DDIM and DDPM.

Each run builds its own :class:`VolumeInferer` (a fresh model load and fresh generators), as two
``anofpdm segment`` invocations would. A different seed must change the DDPM map (DDPM draws fresh
noise at every visited step), which shows that the seed is what makes the runs agree.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from anofpdm_monai.inferers import VolumeInferer

from . import volumes as V

SHAPE = (40, 48, 2)  # two slices: determinism does not need more


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> list[str]:
    channels, _ = V.write_case(tmp_path_factory.mktemp("determinism"), "case", seed=5, shape=SHAPE)
    return [str(p) for p in channels.values()]


def _run(model, case, method: str, seed: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny model has no DDPM calibration; the DDIM one stands in
        inferer = VolumeInferer(model, method=method, device="cpu", seed=seed)
    result = inferer(case)
    return result.anomaly, result.mask, result.slices


@pytest.mark.parametrize("method", ["anofpdm-ddim", "anofpdm-ddpm"])
def test_same_seed_bit_identical(tiny_model, case, method):
    map_a, mask_a, slices_a = _run(tiny_model, case, method, seed=7)
    map_b, mask_b, slices_b = _run(tiny_model, case, method, seed=7)
    assert map_a.tobytes() == map_b.tobytes(), f"{method}: anomaly maps differ between two runs with one seed"
    assert mask_a.tobytes() == mask_b.tobytes(), f"{method}: masks differ between two runs with one seed"
    for field in ("maps", "sim", "threshold", "end_step"):
        assert getattr(slices_a, field).numpy().tobytes() == getattr(slices_b, field).numpy().tobytes(), field
    assert np.abs(map_a).max() > 0, "an all-zero map would make the comparison empty"


def test_ddpm_seed_matters(tiny_model, case):
    map_a, _, _ = _run(tiny_model, case, "anofpdm-ddpm", seed=7)
    map_b, _, _ = _run(tiny_model, case, "anofpdm-ddpm", seed=8)
    assert not np.array_equal(map_a, map_b), "DDPM maps do not depend on the seed: the seed is not used"
