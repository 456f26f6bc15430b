"""Guarantee 9: what a NIfTI header claims is checked before its data is read; odd voxel types get their own message.

* A header may claim any shape: a 135-byte ``.nii.gz`` can claim 2048 x 1024 x 1024 voxels. The
  claimed size is checked against a limit (default 2**29 voxels, 2 GiB as float32; ``--max-voxels``
  or ``ANOFPDM_MAX_VOXELS`` raise it) before any voxel is read.
* float64 values beyond float32's range, RGB voxels, complex voxels and symlink loops each get a
  message that says what they are (not "NaN or infinite", "not a NIfTI image" or "file not found").
* A constant volume is read, with a warning.
"""

from __future__ import annotations

import gzip
import os
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anofpdm_monai.io import DEFAULT_MAX_VOXELS, MAX_VOXELS_ENV, InputError, InputWarning, load_nifti

from . import volumes as V


def header_only(path: Path, shape: tuple[int, ...], dtype=np.float32) -> Path:
    """A gzipped NIfTI header that claims ``shape`` followed by a few bytes of data: a tiny file."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), 1)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 64))
    return path


@pytest.mark.parametrize("shape", [(2048, 1024, 1024), (32767, 32767, 32767), (1024, 1024, 1024, 1)])
def test_header_claiming_a_huge_volume_is_refused_before_reading(tmp_path, shape):
    path = header_only(tmp_path / "bomb.nii.gz", shape)
    assert path.stat().st_size < 1000
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as err:
            load_nifti(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert str(path) in message and f"shape {shape}" in message, message
    assert f"limit of {DEFAULT_MAX_VOXELS} voxels" in message and "max_voxels or" in message, message  # the argument
    assert "--max-voxels" not in message and "--max-voxels or" in err.value.renamed({"max_voxels": "--max-voxels"})
    assert peak < 50e6, f"{peak / 1e6:.0f} MB allocated before the refusal"


def test_the_limit_is_raised_or_lowered_by_flag_and_environment(tmp_path, monkeypatch):
    channels, _ = V.write_case(tmp_path / "raw", "P1")
    monkeypatch.setenv(MAX_VOXELS_ENV, "1000")
    with pytest.raises(InputError, match=r"limit of 1000 voxels"):
        load_nifti(channels["flair"])
    monkeypatch.setenv(MAX_VOXELS_ENV, "lots")
    with pytest.raises(InputError, match=MAX_VOXELS_ENV):
        load_nifti(channels["flair"])
    monkeypatch.delenv(MAX_VOXELS_ENV)
    assert load_nifti(channels["flair"])[0].shape == V.SHAPE
    out = tmp_path / "store"
    code, _, err = V.run_cli(["preprocess", "-i", str(tmp_path / "raw"), "-o", str(out), "--dataset", "brats",
                              "--size", "64", "--max-voxels", "1000"])  # fmt: skip
    assert code != 0 and "limit of 1000 voxels" in err and "--max-voxels or" in err, err  # the CLI names its flag
    assert os.environ.get(MAX_VOXELS_ENV) is None, "the flag must not leak into later runs of this process"


@pytest.mark.parametrize("verb", ["preprocess", "segment", "evaluate"])
def test_every_reading_verb_has_the_flag(verb):
    from pipelines.cli import build_parser

    argv = {"preprocess": ["-i", "x", "-o", "y", "--dataset", "brats"], "segment": ["-m", "m", "-i", "x", "-o", "y"],
            "evaluate": ["-m", "m", "-i", "x", "-o", "y"]}[verb]  # fmt: skip
    args = build_parser().parse_args([verb, *argv, "--max-voxels", "123"])
    assert args.max_voxels == 123


def test_segment_reports_a_bomb_as_one_line(tiny_model, tmp_path):
    channels, _ = V.write_case(tmp_path / "raw", "P1")
    header_only(channels["t1"], (2048, 1024, 1024))
    code, _, err = V.run_cli(["segment", "-m", str(tiny_model), "-i", str(tmp_path / "raw" / "P1"), "-o",
                              str(tmp_path / "out"), "--device", "cpu"])  # fmt: skip
    assert code == 1
    found = [line for line in V.lines(err) if "error" in line]
    assert len(found) == 1 and "P1_t1.nii.gz" in found[0] and "(2048, 1024, 1024)" in found[0], err


# --- messages that say what the voxels are -------------------------------------------------------------------


def test_float64_beyond_float32_range(tmp_path):
    data = np.ones(V.SHAPE)
    data[1, 2, 3] = 1e300
    path = V.save_nifti(tmp_path / "big.nii.gz", data)
    with pytest.raises(InputError) as err:
        load_nifti(path)
    message = str(err.value)
    assert "1 voxels beyond the float32 range" in message and "1e+300" in message and "NaN" not in message, message
    assert "rescale" in message


def test_rgb_volume(tmp_path):
    rgb = np.zeros(V.SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    with pytest.raises(InputError, match=r"rgb\.nii\.gz: RGB voxels .* not supported.*grey"):
        load_nifti(path)


def test_complex_volume_is_refused(tmp_path):
    data = (np.ones(V.SHAPE) + 1j * np.ones(V.SHAPE)).astype(np.complex64)
    path = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(InputError, match=r"complex\.nii\.gz: complex voxels \(complex64\).*magnitude"):
        load_nifti(path)


def test_symlink_loop_and_broken_symlink(tmp_path):
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop)
    with pytest.raises(InputError, match=r"loop\.nii\.gz: symlink loop"):
        load_nifti(loop)
    broken = tmp_path / "broken.nii.gz"
    broken.symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(InputError, match=r"broken\.nii\.gz: broken symlink to .*gone\.nii\.gz"):
        load_nifti(broken)
    from anofpdm_monai.readers import records_for_inference

    with pytest.raises(InputError, match=r"symlink loop"):
        records_for_inference([loop])


def test_constant_volume_warns(tmp_path):
    path = V.save_nifti(tmp_path / "flat.nii.gz", np.full(V.SHAPE, 7, np.int16))
    with pytest.warns(InputWarning, match=r"flat\.nii\.gz: every voxel holds the same value \(7\)"):
        data, _ = load_nifti(path)
    assert data.shape == V.SHAPE


def test_cli_warning_is_one_line(tmp_path, capsys):
    import warnings

    from anofpdm_monai.logs import verb_logging

    with warnings.catch_warnings(), verb_logging("segment"):
        warnings.warn(InputWarning("x.nii.gz: careful"), stacklevel=1)
    assert capsys.readouterr().err == "anofpdm segment: warning: x.nii.gz: careful\n"
