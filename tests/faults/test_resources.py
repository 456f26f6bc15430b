"""Guarantee 6 (the part a unit test can check): ``--batch-size`` bounds what the network sees at once.

Each network call evaluates a batch of slices for the condition and for null together, so the largest
input batch must be 2 x --batch-size, whatever the number of slices. Peak memory itself is measured by
``benchmarks/memory.py`` and reported in docs/reliability.md.
"""

from __future__ import annotations

import math

import pytest

from anofpdm_monai.networks import NoisePredictor

from . import volumes as V


@pytest.fixture
def recorded(monkeypatch) -> list[int]:
    """Batch sizes of every network call made through NoisePredictor."""
    sizes: list[int] = []
    original = NoisePredictor.__call__

    def call(self, x_t, t, labels):
        sizes.append(int(x_t.shape[0]))
        return original(self, x_t, t, labels)

    monkeypatch.setattr(NoisePredictor, "__call__", call)
    return sizes


@pytest.mark.parametrize("batch_size", [2])
def test_segment_batch_size_bounds_network_batch(tiny_model, tmp_path, recorded, batch_size):
    V.write_case(tmp_path / "raw", "case", seed=0, shape=(40, 48, 5))
    code, _, err = V.run_cli(["segment", "-m", str(tiny_model), "-i", str(tmp_path / "raw" / "case"),
                              "-o", str(tmp_path / "out"), "--device", "cpu", "--batch-size", str(batch_size)])  # fmt: skip
    assert code == 0, err
    slices, steps = 5, 2  # five brain slices; N=40, k=20 visits t = 0, 20
    assert max(recorded) == 2 * min(batch_size, slices)
    assert len(recorded) == math.ceil(slices / batch_size) * steps
