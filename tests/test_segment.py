"""Tests of ``anofpdm segment`` and :class:`VolumeInferer`: inputs, outputs, geometry, resuming, bad inputs.

Cases are small hand-made volumes (40 x 48 x 12 voxels, an ellipsoid "brain" with a lesion placed
off-centre on every axis), so that a wrong flip or axis swap moves the lesion. Models are hand-made
model folders (config.json, model.pt of a seeded tiny network, calibration.json) unless a test needs
the trained ``tiny_model``. Where a test needs a model that actually finds the lesion, the network is
replaced by :class:`OracleHealer`, a noise predictor whose healthy-guided prediction removes the lesion.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from anofpdm_monai.calibration import Calibration
from anofpdm_monai.config import DiffusionConfig, ModelConfig, NetworkConfig, PreprocessConfig
from anofpdm_monai.inferers import VolumeInferer
from anofpdm_monai.io import save_like
from anofpdm_monai.networks import HEALTHY, build_network, build_scheduler
from anofpdm_monai.transforms import slices_to_volume
from pipelines.cli import main

BRATS = ("flair", "t1", "t1ce", "t2")
SHAPE = (40, 48, 12)
LESION_XY, LESION_RADIUS, LESION_Z = (13, 30), 4, (4, 8)


# ---------------------------------------------------------------- hand-made cases


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def affine_of(linear: np.ndarray, origin=(-40.0, -55.0, -20.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


ZOOMS = np.diag([2.0, 2.5, 3.0])
AFFINES = {
    "RAS": affine_of(ZOOMS),
    "LPS": affine_of(np.diag([-1.0, -1.0, 1.0]) @ ZOOMS, origin=(40.0, 60.0, -20.0)),
    "LAS": affine_of(np.diag([-1.0, 1.0, 1.0]) @ ZOOMS, origin=(40.0, -60.0, -20.0)),
    "OBLIQUE": affine_of(rotation(2, 25) @ rotation(0, 12) @ ZOOMS),
    # voxel axes (i, j, k) run along (A, S, L) after a small tilt: the axial slices cut voxel axis 1
    "PERMUTED": affine_of(rotation(1, 8) @ np.array([[0.0, 0, -1], [1, 0, 0], [0, 1, 0]]) @ ZOOMS),
}


def phantom(shape=SHAPE, lesion: bool = True) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Channels (flair, t1, t1ce, t2), lesion mask and brain mask of one case.

    Brain: constant intensity 100 in an ellipsoid. Lesion: a cylinder off-centre in every axis,
    bright on FLAIR (160) and dark on T1 (25 on its axis to 60 at its rim).
    """
    x, y, z = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    c = [(s - 1) / 2 for s in shape]
    brain = ((x - c[0]) / (0.4 * shape[0])) ** 2 + ((y - c[1]) / (0.4 * shape[1])) ** 2 + (
        (z - c[2]) / (0.6 * shape[2])
    ) ** 2 <= 1
    radius = np.sqrt((x - LESION_XY[0]) ** 2 + (y - LESION_XY[1]) ** 2)
    les = (radius <= LESION_RADIUS) & (z >= LESION_Z[0]) & (z <= LESION_Z[1]) & lesion
    assert (les <= brain).all()
    channels = []
    for name in BRATS:
        v = np.where(brain, 100.0, 0.0)
        if name == "flair":
            v[les] = 160.0
        elif name == "t1":
            v[les] = 25.0 + 35.0 * radius[les] / LESION_RADIUS
        channels.append(v.astype(np.float32))
    return channels, les, brain


def nifti(array: np.ndarray, affine: np.ndarray, qform: np.ndarray | None = None, dtype=np.float32) -> nib.Nifti1Image:
    image = nib.Nifti1Image(array.astype(dtype), affine)
    if qform is not None:
        image.set_qform(qform, code=1)  # scanner; the sform (code 2, aligned) stays the affine
    return image


def write_case(folder: Path, case_id: str, affine: np.ndarray, *, names=BRATS, label: bool = True, qform=None,
               dtype=np.float32, lesion: bool = True, layout: str = "brats") -> dict:
    """Write a case; ``layout`` 'brats' names files CASE_<name>.nii.gz, 'nnunet' CASE_0000.nii.gz ..."""
    folder.mkdir(parents=True, exist_ok=True)
    channels, les, brain = phantom(lesion=lesion)
    paths = []
    for i, (name, array) in enumerate(zip(names, channels)):
        path = folder / (f"{case_id}_{name}.nii.gz" if layout == "brats" else f"{case_id}_{i:04d}.nii.gz")
        nib.save(nifti(array, affine, qform, dtype), path)
        paths.append(path)
    label_path = None
    if label:
        label_path = folder / f"{case_id}_seg.nii.gz"
        nib.save(nifti(les, affine, qform, np.uint8), label_path)
    return {"paths": paths, "label": label_path, "lesion": les, "brain": brain, "affine": affine}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


# ---------------------------------------------------------------- hand-made model folders


def make_model(folder: Path, names=BRATS, map_channels=("flair", "t2"), *, w: float = 2.0, thr_01: float = 0.999,
               D: float = 10.0, calibrate: bool = True) -> Path:
    """A model folder as ``anofpdm train`` + ``calibrate`` leave it: config.json, model.pt, calibration.json.

    The network is a micro UNet (widths 8, 8, 16, 16) with seeded random weights (no training); the calibration is
    written by hand (N = 40, k = 20: two visited steps).
    """
    folder.mkdir(parents=True)
    config = ModelConfig(
        network=NetworkConfig(preset="test-micro", image_size=64, in_channels=len(names), channels=(8, 8, 16, 16),
                              attention_levels=(False,) * 4, num_head_channels=8, norm_num_groups=8),
        preprocess=PreprocessConfig(image_size=64, channel_names=tuple(names), map_channels=tuple(map_channels)),
    )
    config.save(folder / "config.json")
    torch.manual_seed(0)
    network = build_network(config.network)
    with torch.no_grad():
        network.out[-1].conv.weight.normal_(0, 0.1)  # MONAI zero-initialises the last layer: make eps non-trivial
    torch.save(network.state_dict(), folder / "model.pt")
    if calibrate:
        indices = [names.index(m) for m in map_channels]
        calibration = Calibration(w=w, thr_01=thr_01, D=[D] * len(indices), steps=40, stride=20, encoding="ddim",
                                  map_channels=list(map_channels), map_channel_indices=indices)  # fmt: skip
        calibration.save(folder / "calibration.json")
    return folder


class OracleHealer:
    """A noise predictor that knows what a lesion looks like (T1 much darker than FLAIR).

    Unconditional (null) noise is 0, so the unguided prediction is x_t / sqrt(abar_t); the
    healthy-conditioned noise is chosen so that the guided prediction (eq. 6-7 with strength ``w``)
    is that minus ``(1 - t / 40) * clamp(flair - t1 - 0.5, 0, 1)`` on the map channels: nothing
    outside the lesion, most at its centre, fading with t (so that the HGP and UGP error curves
    differ in shape on lesion slices). With it the whole pipeline finds the planted lesion, which
    lets a test check where the lesion lands in the output.
    """

    def __init__(self, w: float, map_channels=(0, 3)) -> None:
        self.abar = build_scheduler(DiffusionConfig()).alphas_cumprod.double()
        self.w = w
        self.map_channels = list(map_channels)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        abar = self.abar.to(x_t.device)[t].float()[:, None, None]
        x0_hat = x_t / abar.sqrt()[:, None]
        lesion = (x0_hat[:, 0] - x0_hat[:, 1] - 0.5).clamp(0, 1)  # (N, S, S)
        eps = torch.zeros_like(x_t)
        healthy = labels == HEALTHY
        fade = (1 - t.float() / 40).clamp_min(0)[:, None, None]
        scale = fade * abar.sqrt() / (1 - abar).sqrt() / (1 + self.w)
        for m in self.map_channels:
            eps[:, m] = torch.where(healthy[:, None, None], lesion * scale, torch.zeros_like(lesion))
        return eps


def use_oracle(monkeypatch: pytest.MonkeyPatch, w: float) -> None:
    """Make every VolumeInferer built from now on use :class:`OracleHealer` instead of its network."""
    monkeypatch.setattr("anofpdm_monai.model.NoisePredictor", lambda network, autocast=False, **layout: OracleHealer(w))


def segment(*args: str) -> int:
    return main(["segment", *[str(a) for a in args], "--device", "cpu"])


@pytest.fixture(scope="module")
def model4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("segment_models") / "brats4")


@pytest.fixture(scope="module")
def oracle_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calibration for :class:`OracleHealer`: healthy slices have sim = 1, lesion slices far less."""
    return make_model(tmp_path_factory.mktemp("segment_models") / "oracle", w=1.0, thr_01=0.99, D=10.0)


# ---------------------------------------------------------------- geometry of the outputs

GEOMETRY_CASES = {
    "RAS": dict(affine=AFFINES["RAS"]),
    "LPS": dict(affine=AFFINES["LPS"], qform=AFFINES["LPS"], dtype=np.int16),  # int16, qform = sform: as BraTS ships
    "OBLIQUE": dict(affine=AFFINES["OBLIQUE"]),
    # the qform (scanner) differs from the sform (aligned); nibabel's affine is the sform
    "QSFORM": dict(affine=AFFINES["OBLIQUE"], qform=AFFINES["RAS"]),
}


@pytest.fixture(scope="module")
def cohort_run(model4: Path, tmp_path_factory: pytest.TempPathFactory):
    """One ``anofpdm segment`` over a BraTS-layout cohort folder holding one case per geometry."""
    root = tmp_path_factory.mktemp("segment_cohort")
    cohort = root / "cohort"
    cases = {name: write_case(cohort / name, name, label=False, **kw) for name, kw in GEOMETRY_CASES.items()}
    out = root / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = segment("-m", model4, "-i", cohort, "-o", out)
    return {"rc": rc, "out": out, "cases": cases, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def test_cohort_folder_every_case_done(cohort_run):
    assert cohort_run["rc"] == 0, cohort_run["stderr"]
    names = sorted(p.name for p in cohort_run["out"].iterdir())
    expected = [f"{c}{s}" for c in GEOMETRY_CASES for s in (".nii.gz", "_anomaly.nii.gz", ".json")]
    assert names == sorted([*expected, "run.json", "segment.log"])  # outputs and settings records, the run record, the log
    for case in GEOMETRY_CASES:  # the summary line of every case
        assert f"{case}: " in cohort_run["stdout"] and "slices unhealthy, lesion" in cohort_run["stdout"]


@pytest.mark.parametrize("case", list(GEOMETRY_CASES))
def test_outputs_keep_the_input_geometry(cohort_run, case):
    source = nib.load(str(cohort_run["cases"][case]["paths"][0]))
    for suffix, dtype in (("", np.uint8), ("_anomaly", np.float32)):
        out = nib.load(str(cohort_run["out"] / f"{case}{suffix}.nii.gz"))
        assert out.shape == source.shape == SHAPE
        assert out.get_data_dtype() == np.dtype(dtype)
        np.testing.assert_allclose(out.affine, source.affine, atol=1e-5)
        for coded_out, coded_in in ((out.get_qform(coded=True), source.get_qform(coded=True)),
                                    (out.get_sform(coded=True), source.get_sform(coded=True))):  # fmt: skip
            assert int(coded_out[1]) == int(coded_in[1])
            if coded_in[0] is None:  # code 0: no transform
                assert coded_out[0] is None
            else:
                np.testing.assert_allclose(coded_out[0], coded_in[0], atol=1e-5)
        np.testing.assert_allclose(out.header.get_zooms(), source.header.get_zooms(), atol=1e-6)
        data = np.asarray(out.dataobj)
        assert data.dtype == dtype and np.isfinite(data).all()
    mask = np.asarray(nib.load(str(cohort_run["out"] / f"{case}.nii.gz")).dataobj)
    assert set(np.unique(mask).tolist()) <= {0, 1}
    assert not (mask.astype(bool) & ~cohort_run["cases"][case]["brain"]).any(), "lesion voxels outside the brain"
    anomaly = np.asarray(nib.load(str(cohort_run["out"] / f"{case}_anomaly.nii.gz")).dataobj)
    assert anomaly[cohort_run["cases"][case]["brain"]].any(), "the anomaly map is empty inside the brain"


def test_qform_and_sform_really_differ_in_that_case(cohort_run):
    """Guards the QSFORM case: it must keep two different transforms, or the test above proves less."""
    image = nib.load(str(cohort_run["out"] / "QSFORM.nii.gz"))
    (qform, qcode), (sform, scode) = image.get_qform(coded=True), image.get_sform(coded=True)
    assert (int(qcode), int(scode)) == (1, 2) and not np.allclose(qform, sform, atol=1e-2)


# ---------------------------------------------------------------- where the lesion lands


@pytest.mark.parametrize("orientation", list(AFFINES))
def test_lesion_round_trip_through_preprocessing_and_its_inverse(model4, tmp_path, orientation):
    """Planted lesion -> the model's preprocessing (RAS, 64 x 64 slices) -> slices_to_volume -> save_like."""
    case = write_case(tmp_path / "case", "C", AFFINES[orientation])
    inferer = VolumeInferer(model4, device="cpu")
    pre = inferer.preprocess(case["paths"], case["label"])
    assert pre.masks is not None and pre.masks.any()
    volume = slices_to_volume(pre.masks.float(), pre.geometry, "mask")
    out = save_like(volume, nib.load(str(case["paths"][0])), tmp_path / "C.nii.gz", np.uint8)
    written = nib.load(str(out))
    back = np.asarray(written.dataobj).astype(bool)
    assert dice(back, case["lesion"]) > 0.8
    # the same place in the world, not just the same voxel indices
    world_in = nib.affines.apply_affine(case["affine"], np.argwhere(case["lesion"]).mean(0))
    world_out = nib.affines.apply_affine(written.affine, np.argwhere(back).mean(0))
    assert np.linalg.norm(world_in - world_out) < 2.0  # mm; voxels are 2 to 3 mm
    # the test can tell a flipped or swapped result from a right one
    assert dice(back[::-1], case["lesion"]) < 0.2 and dice(back[:, ::-1], case["lesion"]) < 0.2


@pytest.mark.parametrize("orientation", list(AFFINES))
def test_segment_puts_a_found_lesion_on_the_planted_voxels(oracle_model, tmp_path, monkeypatch, capsys, orientation):
    """A full ``anofpdm segment`` run with a network that finds lesions: the mask is on the lesion, inside the brain."""
    use_oracle(monkeypatch, w=1.0)
    case = write_case(tmp_path / "Case", "Case", AFFINES[orientation], label=False)
    assert segment("-m", oracle_model, "-i", tmp_path / "Case", "-o", tmp_path / "out") == 0
    mask = np.asarray(nib.load(str(tmp_path / "out" / "Case.nii.gz")).dataobj).astype(bool)
    assert mask.any()
    assert not (mask & ~case["brain"]).any(), "mask voxels outside the brain"
    inside = (mask & case["lesion"]).sum()
    assert inside / mask.sum() > 0.9 and inside / case["lesion"].sum() > 0.2
    # axial slices across the lesion cylinder: found whole; along it (PERMUTED): only its core passes the 98 % quantile
    assert dice(mask, case["lesion"]) > (0.3 if orientation == "PERMUTED" else 0.7)
    assert dice(mask[::-1], case["lesion"]) < 0.1 and dice(mask[:, ::-1], case["lesion"]) < 0.1
    anomaly = np.asarray(nib.load(str(tmp_path / "out" / "Case_anomaly.nii.gz")).dataobj)
    assert anomaly[case["lesion"]].mean() > 10 * anomaly[case["brain"] & ~case["lesion"]].mean()
    out = capsys.readouterr().out
    assert "Case: 5/12 slices unhealthy" in out or orientation == "PERMUTED"


# ---------------------------------------------------------------- input kinds


def test_brats_case_folder_with_png_and_summary_line(model4, tmp_path, capsys):
    """A BraTS case folder (its sibling folders are not cases of this run); --save-png writes CASE.png."""
    case_id = "BraTS2021_01234"
    write_case(tmp_path / "raw" / case_id, case_id, AFFINES["LPS"], dtype=np.int16)
    write_case(tmp_path / "raw" / "BraTS2021_09999", "BraTS2021_09999", AFFINES["LPS"])
    assert segment("-m", model4, "-i", tmp_path / "raw" / case_id, "-o", tmp_path / "out", "--save-png") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"{case_id}.json", f"{case_id}.nii.gz", f"{case_id}.png", f"{case_id}_anomaly.nii.gz", "run.json", "segment.log"
    ]
    assert (tmp_path / "out" / f"{case_id}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"{case_id}: ")]
    assert len(line) == 1 and "/12 slices unhealthy, lesion " in line[0] and " ml, " in line[0]
    assert line[0].endswith(str(tmp_path / "out" / f"{case_id}.nii.gz"))


def test_atlas_t1w_file_with_a_one_channel_model(tmp_path, capsys):
    model = make_model(tmp_path / "atlas_model", names=("t1",), map_channels=("t1",))
    image = tmp_path / "sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz"
    nib.save(nifti(phantom()[0][1], AFFINES["RAS"]), image)
    assert segment("-m", model, "-i", image, "-o", tmp_path / "out") == 0
    out = nib.load(str(tmp_path / "out" / "sub-r001s001.nii.gz"))
    assert out.shape == SHAPE and (tmp_path / "out" / "sub-r001s001_anomaly.nii.gz").is_file()
    assert "sub-r001s001: " in capsys.readouterr().out


def test_nnunet_files_grouped_by_case(model4, tmp_path):
    for case_id in ("PAT_001", "PAT_002"):
        write_case(tmp_path / "imagesTs", case_id, AFFINES["RAS"], label=False, layout="nnunet")
    files = sorted((tmp_path / "imagesTs").iterdir())
    assert len(files) == 8
    assert segment("-m", model4, "-i", *files, "-o", tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "PAT_001.json", "PAT_001.nii.gz", "PAT_001_anomaly.nii.gz", "PAT_002.json", "PAT_002.nii.gz", "PAT_002_anomaly.nii.gz",
        "run.json", "segment.log",
    ]


# ---------------------------------------------------------------- --continue


def test_continue_skips_finished_cases(model4, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    for case_id in ("A", "B"):
        write_case(cohort / case_id, case_id, AFFINES["RAS"], label=False)
    out = tmp_path / "out"
    assert segment("-m", model4, "-i", cohort / "A", "-o", out) == 0
    mask = out / "A.nii.gz"
    before = mask.stat().st_mtime_ns
    os.utime(mask, ns=(before - 10**9, before - 10**9))  # so that a rewrite would show whatever the clock resolution
    before = mask.stat().st_mtime_ns
    capsys.readouterr()
    assert segment("-m", model4, "-i", cohort, "-o", out, "--continue") == 0
    printed = capsys.readouterr().out
    assert "A: done already, skipped (--continue)" in printed and "B: " in printed
    assert mask.stat().st_mtime_ns == before and (out / "B.nii.gz").is_file()
    # without --continue the case is done again
    assert segment("-m", model4, "-i", cohort / "A", "-o", out) == 0
    assert mask.stat().st_mtime_ns != before


# ---------------------------------------------------------------- bad inputs


def bad_case_errors(stderr: str, case_id: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if f"error: {case_id}: " in ln]


def test_bad_cases_are_reported_and_the_others_still_done(model4, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    write_case(cohort / "GOOD", "GOOD", AFFINES["RAS"], label=False)
    shape = write_case(cohort / "SHAPE", "SHAPE", AFFINES["RAS"], label=False)
    nib.save(nifti(np.ones((40, 48, 11)), AFFINES["RAS"]), shape["paths"][3])
    grid = write_case(cohort / "GRID", "GRID", AFFINES["RAS"], label=False)
    nib.save(nifti(phantom()[0][2], AFFINES["RAS"] + np.diag([0, 0, 0.5, 0])), grid["paths"][2])
    broken = write_case(cohort / "BROKEN", "BROKEN", AFFINES["RAS"], label=False)
    data = broken["paths"][1].read_bytes()
    broken["paths"][1].write_bytes(data[: len(data) // 2])  # a truncated download
    garbage = write_case(cohort / "GARBAGE", "GARBAGE", AFFINES["RAS"], label=False)
    garbage["paths"][0].write_bytes(b"\x1f\x8b this is not a gzip stream")
    out = tmp_path / "out"
    assert segment("-m", model4, "-i", cohort, "-o", out) == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    expected = {
        "SHAPE": (shape["paths"][3], "resample them onto one grid"),
        "GRID": (grid["paths"][2], "affine differs"),
        "BROKEN": (broken["paths"][1], "unreadable or truncated"),
        "GARBAGE": (garbage["paths"][0], "give a .nii or .nii.gz volume"),
    }
    for case_id, (path, fix) in expected.items():
        lines = bad_case_errors(stderr, case_id)
        assert len(lines) == 1, stderr
        assert str(path) in lines[0] and fix in lines[0]
        assert not list(out.glob(f"{case_id}*")), f"output written for the failed case {case_id}"
    assert "4 of 5 cases failed" in stderr
    assert (out / "GOOD.nii.gz").is_file() and (out / "GOOD_anomaly.nii.gz").is_file()


def test_channel_count_that_does_not_fit_the_model(model4, tmp_path, capsys):
    write_case(tmp_path / "in", "OK", AFFINES["RAS"], label=False, layout="nnunet")
    three = write_case(tmp_path / "in3", "THREE", AFFINES["RAS"], label=False, layout="nnunet")
    three["paths"][3].unlink()
    atlas = tmp_path / "sub-r002s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz"
    nib.save(nifti(phantom()[0][1], AFFINES["RAS"]), atlas)
    files = [*sorted((tmp_path / "in").iterdir()), *three["paths"][:3], atlas]
    assert segment("-m", model4, "-i", *files, "-o", tmp_path / "out") == 1
    stderr = capsys.readouterr().err
    for case_id, first, count in (("THREE", three["paths"][0], 3), ("sub-r002s001", atlas, 1)):
        lines = bad_case_errors(stderr, case_id)
        assert len(lines) == 1, stderr
        assert str(first) in lines[0]
        assert f"has {count} channel file(s) but the model takes 4 (flair, t1, t1ce, t2)" in lines[0]
        assert not list((tmp_path / "out").glob(f"{case_id}*"))
    assert (tmp_path / "out" / "OK.nii.gz").is_file()


def test_model_without_calibration(tmp_path, capsys):
    model = make_model(tmp_path / "uncalibrated", calibrate=False)
    write_case(tmp_path / "C", "C", AFFINES["RAS"], label=False)
    assert segment("-m", model, "-i", tmp_path / "C", "-o", tmp_path / "out") == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1
    assert str(model / "calibration.json") in stderr[0] and "anofpdm calibrate" in stderr[0]
    assert not list((tmp_path / "out").glob("C*"))


def test_output_folder_that_cannot_be_created(model4, tmp_path, capsys):
    write_case(tmp_path / "C", "C", AFFINES["RAS"], label=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert segment("-m", model4, "-i", tmp_path / "C", "-o", blocker / "out") == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1
    assert str(blocker / "out") in stderr[0] and "choose a writable --output" in stderr[0]


def test_output_file_that_cannot_be_written_leaves_nothing_behind(model4, tmp_path, capsys):
    """A mask that cannot be written (a folder squats on its name): an error, no half-written outputs, others done."""
    cohort = tmp_path / "cohort"
    for case_id in ("A", "B"):
        write_case(cohort / case_id, case_id, AFFINES["RAS"], label=False)
    out = tmp_path / "out"
    (out / "A.nii.gz").mkdir(parents=True)
    assert segment("-m", model4, "-i", cohort, "-o", out, "--save-png") == 1
    lines = bad_case_errors(capsys.readouterr().err, "A")
    assert len(lines) == 1 and str(out / "A.nii.gz") in lines[0] and "writable" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["A.nii.gz", "B.json", "B.nii.gz", "B.png", "B_anomaly.nii.gz", "run.json",
                                                    "segment.log"]  # fmt: skip
    assert (out / "A.nii.gz").is_dir()
