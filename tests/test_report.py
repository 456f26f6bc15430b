"""Tests of the cohort report (``anofpdm report``, ``evaluate --report``), rendered in headless Chromium.

The results folder comes from a tiny ``evaluate --report`` run on the session's ``brats_store``
(train split: two patients, one healthy) with a copy of ``tiny_model`` whose D is well conditioned
(as in test_evaluate.py): the numbers mean nothing, the page and its bookkeeping are what is tested.
The browser tests skip when ``chromium`` is not installed, unless ``ANOFPDM_REQUIRE_CHROMIUM=1``
(set by .ci/run), where its absence fails them.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from anofpdm_monai.io import InputError
from anofpdm_monai.methods import REGISTRY
from anofpdm_monai.report import page, write_report
from anofpdm_monai.visualize import PREDICTION_COLOUR, TRUTH_COLOUR, overlay_png, overlay_slices
from pipelines.cli import main

METHODS = "anofpdm-ddim,anofpdm-ddim-volume,threshold"


@pytest.fixture(scope="module")
def model(tiny_model_d1: Path) -> Path:
    return tiny_model_d1


@pytest.fixture(scope="module")
def results(model: Path, brats_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``evaluate --report`` over the train split's two patients (16 slices)."""
    from anofpdm_monai.model import available_methods as supported_methods

    methods = ",".join(m for m in METHODS.split(",") if m in supported_methods(model))
    out = tmp_path_factory.mktemp("report") / "results"
    assert main(["evaluate", "-m", str(model), "-i", str(brats_store), "-o", str(out), "--split", "train",
                 "--methods", methods, "--max-slices", "16", "--device", "cpu", "--report"]) == 0  # fmt: skip
    return out


class Page(HTMLParser):
    """The parts of a report page the tests read: tables (rows of cell texts), images, sections."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.sections: list[str] = []
        self.html_attrs: dict[str, str | None] = {}
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "html":
            self.html_attrs = attrs
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs.get("src") or "")
        elif tag == "section":
            self.sections.append(attrs.get("id") or "")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def read_page(path: Path) -> tuple[str, Page]:
    text = path.read_text()
    return text, Page(text)


def png_pixels(png: bytes) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]


def has_colour(pixels: np.ndarray, colour: str, tolerance: float = 0.08) -> bool:
    rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return bool((np.abs(pixels - rgb).max(axis=-1) < tolerance).any())


# ---------------------------------------------------------------- the page's content


def test_evaluate_report_writes_the_page_from_the_results(results, model):
    text, doc = read_page(results / "report" / "index.html")
    summary = json.loads((results / "summary.json").read_text())
    cases = pd.read_csv(results / "cases.csv", dtype={"case": str})
    # Table 1: one row per method, the pixel-label methods marked, their footnote from the registry
    table1 = doc.tables[0]
    assert [row[0] for row in table1[1:]] == [m + (" †" if summary[m]["uses_pixel_labels"] else "") for m in summary]
    assert "threshold †" in [row[0] for row in table1[1:]] and REGISTRY["threshold"].footnote in text
    mixed = table1[0].index("mixed DICE")
    for row in table1[1:]:
        assert row[mixed] == format(summary[row[0].rstrip(" †")]["mixed_dice"] * 100, ".1f")
    # the per-case table: one row per (case, method) of cases.csv, its 3-D DICE and slice counts
    head, *rows = doc.tables[1]
    assert head[:3] == ["case", "method", "3-D DICE"] and "lesion ml" in head and "predicted unhealthy slices" in head
    assert sorted((r[0], r[1]) for r in rows) == sorted(zip(cases["case"], cases["method"]))
    slices = pd.read_csv(results / "slices.csv", dtype={"case": str})
    for r in rows:
        want = cases[(cases["case"] == r[0]) & (cases["method"] == r[1])].iloc[0]
        assert r[2] == ("–" if np.isnan(want["dice_3d"]) else format(want["dice_3d"] * 100, ".1f"))
        mine = slices[(slices["case"] == r[0]) & (slices["method"] == r[1])]
        assert r[head.index("true unhealthy slices")] == str(int((mine["label"] == 1).sum()))
        predicted = r[head.index("predicted unhealthy slices")]
        assert predicted == ("–" if r[1] == "threshold" else str(int((mine["pred_label"] == 1).sum())))
        with np.load(results / "cases" / f"{r[0]}.npz") as data:
            voxel_ml = float(np.prod(data["voxel_mm"])) / 1000
        assert float(r[head.index("lesion ml")]) == pytest.approx(want["lesion_pixels"] * voxel_ml, abs=0.006)
    # per case: a section with its overlay and curves; plus the model's calibration plot(s); all inline
    assert doc.sections == [f"case-{c}" for c in sorted(cases["case"].unique())]
    plots = sorted(model.glob("calibration*.png"))
    assert plots and len(doc.images) == len(plots) + 2 * len(doc.sections)
    assert all(src.startswith("data:image/png;base64,") for src in doc.images)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing fetched from a network


def test_report_verb_says_when_the_model_folder_is_unknown(results, model, tmp_path, capsys):
    copy = tmp_path / "results"
    shutil.copytree(results, copy, ignore=shutil.ignore_patterns("report", "run.json"))
    assert main(["report", str(copy)]) == 0
    assert str(copy / "report" / "index.html") in capsys.readouterr().out
    text, doc = read_page(copy / "report" / "index.html")
    assert "does not record its model folder" in text
    assert len(doc.images) == 2 * len(doc.sections)
    assert main(["report", str(copy), "-m", str(model), "--method", "threshold"]) == 2  # the oracle stores no maps
    assert "no maps of method 'threshold'" in capsys.readouterr().err


def test_report_of_a_folder_that_is_not_a_results_folder(tmp_path):
    with pytest.raises(InputError, match="summary.json: not found"):
        write_report(tmp_path)
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        write_report(tmp_path)


def test_case_files_hold_the_curves(results):
    with np.load(next((results / "cases").glob("*.npz"))) as data:
        n = len(data["slice_indices"])
        k = len(data["anofpdm-ddim/timesteps"])
        assert data["anofpdm-ddim/divergence"].shape == (n, k) and data["anofpdm-ddim/health"].shape == (n,)
        assert np.allclose(data["anofpdm-ddim/health"], 1 - data["anofpdm-ddim/sim"], atol=1e-6)


def test_segment_keeps_the_health_score_and_d_of_its_decision():
    """The stored curves are the decision's own: unhealthy iff health >= its threshold (the paper: sim <= thr_01)."""
    from anofpdm_monai.calibration import Calibration
    from anofpdm_monai.forward_process import ForwardProcessResult
    from anofpdm_monai.segmentation import decide_slices as segment

    b, k, m, s = 4, 3, 2, 8
    g = torch.Generator().manual_seed(0)
    mse_u = torch.rand(1, b, k, m, generator=g) + 0.1
    mse_h = mse_u.clone()
    mse_h[0, 1:, 0] *= torch.tensor([3.0, 0.2, 1.5])[:, None]  # three slices whose error curves bend away
    divergence = torch.rand(1, b, k, m, generator=g)
    result = ForwardProcessResult(
        timesteps=torch.tensor([0, 5, 10]), guidance_scales=torch.tensor([1.0]), mse_h=mse_h, mse_u=mse_u,
        divergence=divergence, end_index=divergence.argmax(dim=2), dmax=divergence.amax(dim=2),
        maps={"aggregated": torch.rand(1, b, m, s, s, generator=g), "last": torch.rand(1, b, m, s, s, generator=g)},
        network_calls=k, map_channels=(0, 1),
    )  # fmt: skip
    sim = F.cosine_similarity(mse_h[0].mean(-1), mse_u[0].mean(-1), dim=-1)
    thr_01 = float(sim.sort().values[1:3].mean())  # between the 2nd and 3rd lowest: two slices unhealthy
    calibration = Calibration(w=1.0, thr_01=thr_01, D=[1.0, 1.0], steps=15, stride=5, encoding="ddim", map_channels=[0, 1],
                              map_channel_indices=[0, 1])  # fmt: skip
    out = segment(result, calibration)
    assert out.predicted_unhealthy.sum() == 2
    assert torch.equal(out.predicted_unhealthy, out.health >= out.health_threshold)
    assert torch.allclose(out.health, 1 - sim) and out.health_threshold == pytest.approx(1 - thr_01)
    assert torch.equal(out.divergence, divergence[0].mean(-1)) and torch.equal(out.timesteps, result.timesteps)


# ---------------------------------------------------------------- the overlay (segment --save-png and the report)


def test_overlay_shows_the_largest_predicted_and_true_lesions_first():
    maps = torch.zeros(5, 4, 4)
    maps[:, 0, 0] = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7])
    masks = torch.zeros(5, 4, 4, dtype=torch.bool)
    truth = torch.zeros(5, 4, 4, dtype=torch.bool)
    masks[3, :2] = True  # predicted: slice 3 largest, then 0
    masks[0, 0] = True
    truth[2, :3] = True  # true: slice 2 largest, then 0
    truth[0, 0, :2] = True
    assert overlay_slices(maps, masks, 4, truth).tolist() == [3, 2, 0, 1]
    assert overlay_slices(maps, masks, 4).tolist() == [3, 0, 1, 4]  # without truth: as before


def test_overlay_has_a_legend_in_the_outline_colours():
    images, maps = torch.rand(3, 16, 16), torch.rand(3, 16, 16)
    empty = torch.zeros(3, 16, 16, dtype=torch.bool)  # no outline: the colours can only come from the legend
    with_truth = png_pixels(overlay_png(images, maps, empty, truth=empty, title="case"))
    without = png_pixels(overlay_png(images, maps, empty, title="case"))
    assert has_colour(with_truth, PREDICTION_COLOUR) and has_colour(with_truth, TRUTH_COLOUR)
    assert has_colour(without, PREDICTION_COLOUR) and not has_colour(without, TRUTH_COLOUR)


# ---------------------------------------------------------------- rendered in a real browser


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("ANOFPDM_REQUIRE_CHROMIUM") == "1":
            pytest.fail("ANOFPDM_REQUIRE_CHROMIUM=1 but no 'chromium' on PATH (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium); set ANOFPDM_REQUIRE_CHROMIUM=1 to require it")
    return path


def render(chromium: str, html_file: Path, *mode: str) -> str:
    """Run headless Chromium on ``html_file`` with ``mode`` (e.g. --dump-dom); its stdout."""
    command = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--window-size=1280,2000",
               "--virtual-time-budget=5000", *mode, html_file.resolve().as_uri()]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(html_file.parent)})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def broken_images(chromium: str, html_file: Path) -> int:
    """How many images the browser failed to load, as the page's own script counted them after loading."""
    dom = render(chromium, html_file, "--dump-dom")
    found = re.search(r'data-broken-images="(\d+)"', dom)
    assert found, "the page's script did not run"
    return int(found.group(1))


def test_the_page_renders_in_chromium(chromium, results, tmp_path):
    html_file = results / "report" / "index.html"
    assert broken_images(chromium, html_file) == 0
    shot = tmp_path / "page.png"
    render(chromium, html_file, f"--screenshot={shot}")
    pixels = png_pixels(shot.read_bytes())
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 0.05  # not blank
    top = pixels[:300]  # the heading and Table 1: dark text and the tinted header row
    assert (top.mean(axis=-1) < 0.3).mean() > 0.002
    assert has_colour(top, "#e8eef6", tolerance=0.02)
    colourful = pixels.max(axis=-1) - pixels.min(axis=-1) > 0.3  # the figures, not the grey tables
    assert colourful.mean() > 0.005


def test_the_browser_check_catches_a_broken_image(chromium, tmp_path):
    html_file = tmp_path / "broken.html"
    html_file.write_text(page('<img alt="missing" src="missing.png"><p>text</p>'))
    assert broken_images(chromium, html_file) == 1
