"""The Python API (``am.segment``), the loaded-model object, sharded and overlapped ``segment`` runs, ``--save-anomaly``."""

from __future__ import annotations

import re
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_segment import AFFINES, make_model, use_oracle, write_case

import anofpdm_monai as am
from anofpdm_monai.api import shard
from anofpdm_monai.inferers import VolumeInferer
from anofpdm_monai.io import InputError
from anofpdm_monai.model import AnoFPDMModel, InferenceSettings
from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("api") / "model", w=1.0, thr_01=0.99, D=10.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three BraTS-layout cases in one cohort folder (one without a lesion)."""
    root = tmp_path_factory.mktemp("api_cohort")
    for index, affine in enumerate(("RAS", "LPS", "OBLIQUE")):
        case_id = f"BraTS2021_0000{index}"
        write_case(root / case_id, case_id, AFFINES[affine], lesion=index != 2)
    return root


def segment_cli(*args) -> int:
    return main(["segment", *[str(a) for a in args], "--device", "cpu", "--precision", "fp32"])


def test_settings_refuse_bad_values_naming_the_argument():
    for bad, argument in ((dict(method="nope"), "method"), (dict(steps=0), "steps"), (dict(batch_size=-1), "batch_size"),
                          (dict(precision="fp8"), "precision"), (dict(keep_3d_components=True), "keep_3d_components")):  # fmt: skip
        with pytest.raises(ValueError, match=f"^{argument}="):
            InferenceSettings(**bad)
    assert InferenceSettings(method="anofpdm-ddpm-volume").encoding == "ddpm"
    assert InferenceSettings(method="anofpdm-ddpm-volume").variant == "volume"


def test_a_loaded_model_serves_several_inferers(model, cohort, monkeypatch):
    use_oracle(monkeypatch, w=1.0)
    loaded = AnoFPDMModel.from_folder(model, "cpu")
    assert loaded.config.network.in_channels == 4 and loaded.alphas_cumprod.shape == (1000,)
    assert loaded.calibration("ddim") is loaded.calibration("ddim")  # read once
    assert re.fullmatch(r"[0-9a-f]{64}", loaded.sha256)
    paths = [cohort / "BraTS2021_00000" / f"BraTS2021_00000_{n}.nii.gz" for n in ("flair", "t1", "t1ce", "t2")]
    from_object = VolumeInferer(loaded, InferenceSettings(precision="fp32"))(paths, case_id="BraTS2021_00000")
    from_folder = VolumeInferer(model, device="cpu", precision="fp32")(paths, case_id="BraTS2021_00000")
    assert from_object.mask.any()
    assert np.array_equal(from_object.mask, from_folder.mask)
    with pytest.raises(TypeError, match="unknown inference setting"):
        VolumeInferer(loaded, step=3)


def test_am_segment_equals_the_cli_for_paths_nibabel_images_and_metatensors(model, cohort, tmp_path, monkeypatch):
    from monai.data import MetaTensor

    use_oracle(monkeypatch, w=1.0)
    assert segment_cli("-m", model, "-i", cohort / "BraTS2021_00001", "-o", tmp_path / "cli") == 0
    written = nib.load(str(tmp_path / "cli" / "BraTS2021_00001.nii.gz"))
    case_dir = cohort / "BraTS2021_00001"
    files = [case_dir / f"BraTS2021_00001_{n}.nii.gz" for n in ("flair", "t1", "t1ce", "t2")]

    by_path = am.segment([case_dir], model, device="cpu", precision="fp32", progress=False)
    assert [o.case_id for o in by_path] == ["BraTS2021_00001"]
    assert np.array_equal(by_path[0].mask.get_fdata(), written.get_fdata()) and written.get_fdata().any()
    assert np.allclose(by_path[0].mask.affine, written.affine)

    images = tuple(nib.load(str(f)) for f in files)
    # in-memory cases are named image000, ...: the two runs below share that id, so their noise too
    by_image = am.segment([images], model, device="cpu", precision="fp32", progress=False)
    tensors = tuple(MetaTensor(np.asarray(i.dataobj, dtype=np.float32)[None], affine=i.affine) for i in images)
    by_tensor = am.segment([tensors], model, device="cpu", precision="fp32", progress=False)
    assert np.array_equal(by_image[0].mask.get_fdata(), by_tensor[0].mask.get_fdata())
    assert np.allclose(by_tensor[0].mask.affine, written.affine)
    assert by_image[0].mask.shape == written.shape


def test_sharded_runs_give_the_union_of_a_full_run(model, cohort, tmp_path, monkeypatch):
    use_oracle(monkeypatch, w=1.0)
    assert segment_cli("-m", model, "-i", cohort, "-o", tmp_path / "full") == 0
    for part in (0, 1):
        assert segment_cli("-m", model, "-i", cohort, "-o", tmp_path / "parts", "--num-parts", 2, "--part-id", part) == 0
    full = sorted(p.name for p in (tmp_path / "full").glob("*.nii.gz"))
    assert len(full) == 6  # three cases, mask + map each
    assert sorted(p.name for p in (tmp_path / "parts").glob("*.nii.gz")) == full
    merged = json.loads((tmp_path / "parts" / "run.json").read_text())  # the last part to finish names both
    assert [p["file"] for p in merged["parts"]] == ["run.part-0-of-2.json", "run.part-1-of-2.json"]
    assert [p["cases"] for p in merged["parts"]] == [2, 1] and all(p["state"] == "finished" for p in merged["parts"])
    assert sorted(p.name for p in (tmp_path / "parts").glob("segment*.log")) == ["segment.part-0-of-2.log", "segment.part-1-of-2.log"]
    for name in full:
        a, b = nib.load(str(tmp_path / "full" / name)), nib.load(str(tmp_path / "parts" / name))
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), name
    assert shard(list(range(7)), 3, 1) == [1, 4]
    assert sorted(sum((shard(list(range(7)), 3, i) for i in range(3)), [])) == list(range(7))


def test_save_anomaly_masked_full_and_none(model, cohort, tmp_path, monkeypatch):
    use_oracle(monkeypatch, w=1.0)
    case = cohort / "BraTS2021_00000"
    for mode in ("full", "masked", "none"):
        assert segment_cli("-m", model, "-i", case, "-o", tmp_path / mode, "--save-anomaly", mode) == 0
    full = np.asarray(nib.load(str(tmp_path / "full" / "BraTS2021_00000_anomaly.nii.gz")).dataobj)
    masked = np.asarray(nib.load(str(tmp_path / "masked" / "BraTS2021_00000_anomaly.nii.gz")).dataobj)
    assert not (tmp_path / "none" / "BraTS2021_00000_anomaly.nii.gz").exists()
    assert (tmp_path / "none" / "BraTS2021_00000.nii.gz").is_file()
    image = np.asarray(nib.load(str(case / "BraTS2021_00000_flair.nii.gz")).dataobj)
    outside = image == 0  # the phantom's background, outside the brain mask of the nonzero mode
    # since the brain-mask step (docs/data.md) every output is zero outside the brain mask, so under the nonzero
    # mode the full map equals the masked one; both must carry the map inside the brain
    assert (masked[outside] == 0).all() and (full[outside] == 0).all()
    inside = masked != 0
    assert inside.any() and np.array_equal(masked, full)


def test_continue_refuses_outputs_made_with_other_settings(model, cohort, tmp_path, monkeypatch, capsys):
    use_oracle(monkeypatch, w=1.0)
    case = cohort / "BraTS2021_00000"
    assert segment_cli("-m", model, "-i", case, "-o", tmp_path) == 0
    assert segment_cli("-m", model, "-i", case, "-o", tmp_path, "--continue") == 0
    assert "skipped" in capsys.readouterr().out
    assert segment_cli("-m", model, "-i", case, "-o", tmp_path, "--continue", "--steps", 30) == 2  # stride 20: t = 0, 20
    assert "steps: 40 -> 30" in capsys.readouterr().err


def test_docs_api_example_runs(model, cohort, tmp_path, monkeypatch):
    """docs/api.md's example, with its model and case swapped for this test's tiny ones."""
    use_oracle(monkeypatch, w=1.0)
    text = (ROOT / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('"bundled"', repr(str(model))).replace('"BraTS2021_00000/"', repr(str(cohort / "BraTS2021_00000")))
    code = code.replace('"segmentations/"', repr(str(tmp_path / "out")))
    namespace: dict = {}
    exec(compile(code, "docs/api.md", "exec"), namespace)
    assert (tmp_path / "out" / "BraTS2021_00000.nii.gz").is_file()


def test_segment_records_keeps_order_and_goes_on_after_a_bad_case_inline_and_in_worker_processes(model, cohort, tmp_path, monkeypatch):
    """Both loops (loading and writing inline, or in 2 spawned loader and 2 writer processes, cases loaded ahead)
    yield every case in order, a broken case as an error outcome, and write the same files, voxel for voxel."""
    from anofpdm_monai.api import segment_records
    from anofpdm_monai.readers import records_for_inference

    use_oracle(monkeypatch, w=1.0)
    records = records_for_inference([cohort])
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a NIfTI file")
    bad = type(records[0])("BAD", {name: broken for name in records[0].channels})
    order = [records[0], bad, *records[1:]]
    inferer = VolumeInferer(model, device="cpu", precision="fp32")
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        outcomes = list(segment_records(inferer, order, out, keep_results=False, num_workers=workers))
        assert [o.case_id for o in outcomes] == [r.case_id for r in order]
        assert [o.error is not None for o in outcomes] == [False, True, False, False]
        assert "broken.nii.gz" in str(outcomes[1].error)
        written = sorted(p.name for p in out.glob("*.nii.gz"))
        assert written == sorted(f"{r.case_id}{s}.nii.gz" for r in records for s in ("", "_anomaly"))
    for name in written:
        first, second = (nib.load(str(tmp_path / f"out{w}" / name)) for w in (0, 2))
        assert np.array_equal(first.get_fdata(), second.get_fdata()) and np.array_equal(first.affine, second.affine), name
    with pytest.raises(InputError, match="num_workers=-1"):
        next(segment_records(inferer, order, tmp_path / "out_bad", num_workers=-1))


def test_two_torchrun_ranks_each_segment_their_part_and_the_last_merges_the_record(model, cohort, tmp_path):
    """Under torchrun (gloo-free: the parts need no process group) each rank segments its round-robin part,
    keeps run.part-K-of-2.json and segment.part-K-of-2.log, and the last to finish writes run.json."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "ranks"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "pipelines.cli",
           "segment", "-m", str(model), "-i", str(cohort), "-o", str(out), "--parts-from", "torchrun", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cases = sorted(p.name for p in cohort.iterdir() if p.is_dir())
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted([f"{c}.nii.gz" for c in cases] + [f"{c}_anomaly.nii.gz" for c in cases])
    merged = json.loads((out / "run.json").read_text())
    assert [p["file"] for p in merged["parts"]] == ["run.part-0-of-2.json", "run.part-1-of-2.json"]
    assert sorted(p["cases"] for p in merged["parts"]) == [1, 2]
    assert sorted(p.name for p in out.glob("segment*.log")) == ["segment.part-0-of-2.log", "segment.part-1-of-2.log"]
    assert not list(out.glob("*.lock")), "every rank released its lock"


def test_the_default_batch_size_is_8_on_a_cpu_and_fits_half_the_free_memory_on_a_gpu(model):
    from anofpdm_monai.model import DEFAULT_BATCH_SIZE, MAX_GPU_BATCH_SIZE, gpu_batch_size

    assert AnoFPDMModel.from_folder(model, "cpu").default_batch_size() == DEFAULT_BATCH_SIZE
    mib = 2**20
    assert gpu_batch_size(free_bytes=10_000 * mib, bytes_per_slice=50 * mib) == 100  # half of 10,000 MiB at 50 MiB a slice
    assert gpu_batch_size(free_bytes=100 * mib, bytes_per_slice=50 * mib) == DEFAULT_BATCH_SIZE  # never below the CPU's
    assert gpu_batch_size(free_bytes=80_000 * mib, bytes_per_slice=1 * mib) == MAX_GPU_BATCH_SIZE
