"""Helpers of the fault suite: small hand-made cases, ways to spoil them, and CLI/subprocess plumbing.

A case is a head-shaped ellipsoid of "brain" with a bright, off-centre blob labelled 1/2/4 (BraTS
labels), four channels (flair, t1, t1ce, t2), 40 x 48 x 4 voxels. The tiny model resizes every slice to
64 x 64, so what an inference costs is set by the number of slices: four keep a case cheap.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (40, 48, 4)
CHANNELS = ("flair", "t1", "t1ce", "t2")
# LPS voxel order (as BraTS ships), 1 mm.
LPS = np.array([[-1.0, 0, 0, 19.5], [0, -1.0, 0, 23.5], [0, 0, 1.0, -1.5], [0, 0, 0, 1]])


def brain_and_lesion(shape=SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(4, X, Y, Z) float32 channels and (X, Y, Z) uint8 BraTS labels of a synthetic case."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    mid = [(s - 1) / 2 for s in shape]
    radii = [0.42 * shape[0], 0.42 * shape[1], 0.5 * shape[2]]
    brain = sum(((g - m) / r) ** 2 for g, m, r in zip(grid, mid, radii)) < 1
    centre = (0.35 * shape[0] + seed % 3, 0.6 * shape[1], mid[2])
    scale = (shape[0] / 8, shape[1] / 8, max(shape[2] / 6, 1))
    distance = np.sqrt(sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, scale)))
    seg = np.zeros(shape, dtype=np.uint8)
    seg[(distance < 1.5) & brain] = 2
    seg[(distance < 1.0) & brain] = 4
    seg[(distance < 0.5) & brain] = 1
    images = np.stack(
        [brain * (300 + 50 * k + 30 * rng.standard_normal(shape)) + (seg > 0) * 400 for k in range(len(CHANNELS))]
    )
    return np.clip(images, 0, None).astype(np.float32), seg


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray = LPS, *, qform: np.ndarray | None = None,
               qcode: int = 1, scode: int = 1) -> Path:
    """Write ``array`` with sform ``affine`` (code ``scode``) and qform ``qform`` (default: the same; code ``qcode``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=scode)
    image.set_qform(affine if qform is None else qform, code=qcode)
    nib.save(image, str(path))
    return path


def case_paths(root: Path, case: str) -> tuple[dict[str, Path], Path]:
    """BraTS layout: ``root/case/case_{flair,t1,t1ce,t2}.nii.gz`` and ``root/case/case_seg.nii.gz``."""
    folder = root / case
    return {c: folder / f"{case}_{c}.nii.gz" for c in CHANNELS}, folder / f"{case}_seg.nii.gz"


def write_case(root: Path, case: str, affine: np.ndarray = LPS, seed: int = 0, shape=SHAPE,
               seg: np.ndarray | None = None, **save_kw) -> tuple[dict[str, Path], Path]:
    """Write a good BraTS-layout case; returns (channel paths, seg path)."""
    images, lesion = brain_and_lesion(shape, seed=seed)
    channels, seg_path = case_paths(root, case)
    for array, path in zip(images, channels.values()):
        save_nifti(path, array.astype(np.int16), affine, **save_kw)
    save_nifti(seg_path, lesion if seg is None else seg, affine, **save_kw)
    return channels, seg_path


# --- ways to spoil a case: each takes (channel paths, seg path), spoils one file and returns it ---------------


def _rewrite(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    return save_nifti(path, array, nib.load(str(path)).affine if affine is None else affine)


def _data(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def spoil_truncated(channels, seg):
    path = channels["t1"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def spoil_not_nifti(channels, seg):
    """A PNG saved under a .nii.gz name."""
    path = channels["t1ce"]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(2000))
    return path


def spoil_gzipped_text(channels, seg):
    """A gzip file that holds a CSV export, not a NIfTI image."""
    path = channels["t1ce"]
    path.write_bytes(gzip.compress(b"patient,notes\n1,a table, not an image\n" * 20))
    return path


def spoil_zero_bytes(channels, seg):
    path = channels["t2"]
    path.write_bytes(b"")
    return path


def spoil_other_shape(channels, seg):
    path = channels["t2"]
    return _rewrite(path, _data(path)[:, :-2])


def spoil_affine(shift_mm: float) -> Callable:
    """Shift t1's origin by ``shift_mm`` along x (the other channels keep theirs)."""

    def spoil(channels, seg):
        path = channels["t1"]
        affine = nib.load(str(path)).affine.copy()
        affine[0, 3] += shift_mm
        return _rewrite(path, _data(path), affine)

    return spoil


def spoil_value(value: float) -> Callable:
    def spoil(channels, seg):
        path = channels["flair"]
        array = _data(path).astype(np.float32)
        array[20, 24, 2] = value
        return _rewrite(path, array)

    return spoil


def spoil_all_zero(channels, seg):
    path = channels["t1"]
    return _rewrite(path, np.zeros(_data(path).shape, np.int16))


def spoil_4d(channels, seg):
    path = channels["flair"]
    array = _data(path)
    return _rewrite(path, np.stack([array, array], axis=-1))


def spoil_2d(channels, seg):
    path = channels["flair"]
    return _rewrite(path, _data(path)[:, :, 2])


def spoil_missing(channels, seg):
    path = channels["t1ce"]
    path.unlink()
    return path


def spoil_labels(channels, seg):
    array = _data(seg).copy()
    array[array == 2] = 3  # BraTS21 has no label 3
    return _rewrite(seg, array)


def spoil_fractional_labels(channels, seg):
    """A probability map where the lesion mask belongs."""
    array = (_data(seg) > 0).astype(np.float32) * 0.7
    return _rewrite(seg, array)


def spoil_header(**fields) -> Callable:
    """Set raw header ``fields`` of flair (e.g. ``srow_x``, ``pixdim``, ``sform_code``), keeping its voxels."""

    def spoil(channels, seg):
        path = channels["flair"]
        image = nib.load(str(path))
        header = image.header.copy()
        for name, value in fields.items():
            if name == "pixdim_xyz":
                header["pixdim"][1:4] = value
            else:
                header[name] = value
        header["vox_offset"] = 352  # the header, 4 bytes of (no) extensions, then the voxels
        data = np.asarray(image.dataobj).astype(header.get_data_dtype()).tobytes(order="F")
        path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + data))
        return path

    return spoil


def spoil_zero_column(channels, seg):
    path = channels["flair"]
    affine = nib.load(str(path)).affine.copy()
    affine[:3, 0] = 0.0
    return spoil_header(srow_x=affine[0], srow_y=affine[1], srow_z=affine[2], sform_code=1, qform_code=0)(channels, seg)


def spoil_extension_bomb(channels, seg):
    """20 MiB of header extensions (zeros: the file stays small); nib.load would read them all into memory."""
    path = channels["flair"]
    image = nib.load(str(path))
    image.header.extensions.append(nib.nifti1.Nifti1Extension(0, b"\0" * (20 * 2**20)))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header), str(path))
    return path


# --- running the CLI ------------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``anofpdm ARGV`` in this process; returns (exit code, stdout, stderr)."""
    from pipelines.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def lines(text: str) -> list[str]:
    """Lines of captured output, with progress-bar carriage returns taken as line breaks."""
    return [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]


def cli_subprocess(argv: list[str], log: Path) -> subprocess.Popen:
    """``python -m pipelines.cli ARGV`` as a child process with this process's thread count.

    CPU results are bit-identical only for one thread count (reductions are split per thread), and the
    crash tests compare the child's outputs with runs made in this process. Its stderr goes to ``log`` (a
    pipe nobody reads could fill up and stall the child).
    """
    import torch

    threads = str(torch.get_num_threads())
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    with open(log, "wb") as stderr:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *argv], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False if the process ended first (then nothing is killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            if proc.poll() is not None:
                return False
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise TimeoutError(f"{proc.args}: the first output did not appear within {timeout:.0f} s")


def visible_files(folder: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` whose names do not start with '.' (atomic writes use hidden temporary names)."""
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))
