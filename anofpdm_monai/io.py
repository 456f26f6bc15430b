"""File input and output: validated NIfTI reading, atomic writing, weights-only checkpoints.

Every writer here writes to a temporary name in the destination folder and renames it,
so a killed process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch


class InputError(ValueError):
    """A problem with a user's file or argument, phrased as one line: what is wrong and how to fix it.

    A message about an argument names it as the Python parameter (``batch_size=0: must be at least 1``) and
    lists it in ``arguments``; a front end that spells arguments its own way (the CLI: ``--batch-size``)
    shows :meth:`renamed` instead of ``str(err)``.

    Args:
        message: the one line; each name in ``arguments`` appears in it as a whole word.
        arguments: the parameter name, or names, the message refers to.
    """

    def __init__(self, message: str, *, arguments: str | tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.arguments = (arguments,) if isinstance(arguments, str) else tuple(arguments)

    def renamed(self, names: Mapping[str, str]) -> str:
        """The message with each of :attr:`arguments` spelled as ``names`` gives it (``{"batch_size": "--batch-size"}``).

        Only whole words are replaced, never part of a path or of a longer name (``n_val`` in ``n_val_healthy``,
        ``split`` in ``/data/split``); an argument ``names`` lacks keeps its Python name.
        """
        message = str(self)
        for argument in self.arguments:
            if argument in names:
                word = re.compile(rf"(?<![\w./\\-]){re.escape(argument)}(?![\w/\\-])")
                message = word.sub(lambda _match, name=names[argument]: name, message)
        return message


class InputWarning(UserWarning):
    """Something odd about a user's file that does not stop the run (one line: the file and what is odd)."""


# The largest volume a NIfTI header may claim before any voxel is read: 2**29 voxels, 2 GiB as float32.
# A 135-byte .nii.gz can claim 2048 x 1024 x 1024 voxels; reading it would allocate 8 GiB.
DEFAULT_MAX_VOXELS = 2**29
MAX_VOXELS_ENV = "ANOFPDM_MAX_VOXELS"
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Voxel sizes anofpdm accepts, in mm once the header's spatial unit (xyzt_units) is applied: a 0.001 mm voxel turns
# the 5 mm crop margin into 5,000 voxels per side (gigabytes for a 5 KB file); 100 mm is no image of a brain.
VOXEL_MM_RANGE = (0.01, 100.0)
# Header extensions nibabel reads into memory before check_header runs: at most this many bytes, this many of them.
MAX_EXTENSION_BYTES = 16 * 2**20
MAX_EXTENSIONS = 256
# The files nib.load reads besides NIfTI: their outputs are written as NIfTI (.nii.gz) on the same grid.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".hdr.gz", ".img.gz", ".hdr", ".img")
UNIT_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}


def max_voxels() -> int:
    """The voxel limit: ``ANOFPDM_MAX_VOXELS`` if set (:func:`set_max_voxels` sets it), else :data:`DEFAULT_MAX_VOXELS`."""
    text = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_VOXELS
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise InputError(f"{MAX_VOXELS_ENV}={text!r}: give a positive whole number of voxels, e.g. {DEFAULT_MAX_VOXELS}")
    return limit


def set_max_voxels(limit: int | None) -> None:
    """Set the voxel limit ``max_voxels`` for this process and its children; None keeps the current one."""
    if limit is None:
        return
    if limit < 1:
        raise InputError(f"max_voxels={limit}: give a positive whole number of voxels, e.g. {DEFAULT_MAX_VOXELS}", arguments="max_voxels")
    os.environ[MAX_VOXELS_ENV] = str(int(limit))


def missing_file_reason(path: Path) -> str:
    """Why ``path`` cannot be opened: a symlink loop, a broken symlink, or not found."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop (the link, or a folder on its path, points back to itself); point it at the real file"
        if path.is_symlink():
            return f"broken symlink to {os.readlink(path)} (no such file); point it at the real file"
    except ValueError:  # e.g. an embedded NUL byte
        pass
    return "file not found; check the path or the case folder's file names"


# A case id names output files (CASE.npy, CASE.nii.gz, CASE.npz): only these characters, and not too long for
# a file name once a suffix such as "_anomaly.nii.gz" is added.
SAFE_CASE_ID = re.compile(r"[A-Za-z0-9._-]+")
MAX_CASE_ID_LENGTH = 200
RESERVED_CASE_SUFFIX = "_anomaly"  # CASE_anomaly.nii.gz is case CASE's map: no case id may end with it


def case_id_problem(case_id: object) -> str | None:
    """Why ``case_id`` cannot name a file, or None when it can."""
    if not isinstance(case_id, str):
        return f"is a {type(case_id).__name__}, not text"
    if case_id == "":
        return "is empty"
    if "/" in case_id or "\\" in case_id:
        return "contains a path separator"
    if case_id in (".", ".."):
        return "is a relative path component"
    if case_id.startswith("."):
        return "starts with '.' (hidden names are anofpdm's temporary files)"
    if case_id.startswith("-"):
        return "starts with '-' (it would read as a command-line flag, and as a formula in a spreadsheet)"
    if case_id.endswith(RESERVED_CASE_SUFFIX):
        return (f"ends with {RESERVED_CASE_SUFFIX!r} (reserved: CASE{RESERVED_CASE_SUFFIX}.nii.gz is the anomaly map of "
                "case CASE, so this case's mask would overwrite another case's map)")
    if not SAFE_CASE_ID.fullmatch(case_id):
        odd = sorted({c for c in case_id if not SAFE_CASE_ID.fullmatch(c)})
        return f"contains characters other than letters, digits, '.', '_' and '-' ({''.join(odd)!r})"
    if len(case_id) > MAX_CASE_ID_LENGTH:
        return f"is longer than {MAX_CASE_ID_LENGTH} characters"
    return None


def check_case_id(case_id: str, source: str | Path, fix: str = "rename it") -> str:
    """Return ``case_id`` if it is a safe file name (letters, digits, '.', '_', '-'; not hidden); else raise.

    Raises:
        InputError: ``SOURCE: case id 'ID' PROBLEM; case ids name output files, so use only letters, digits, ...; FIX``.
    """
    problem = case_id_problem(case_id)
    if problem is not None:
        raise InputError(
            f"{source}: case id {case_id!r} {problem}; case ids name output files, so they hold only letters, digits, "
            f"'.', '_' and '-', do not start with '.' or '-' and do not end with {RESERVED_CASE_SUFFIX!r}; {fix}"
        )
    return case_id


def part_file_name(name: str, part: tuple[int, int] | None = None) -> str:
    """The name of file ``name`` written by one part of a sharded run: ``run.json`` -> ``run.part-K-of-N.json``.

    Args:
        name: the file's name for a whole run (``run.json``, ``segment.log``).
        part: ``(part_id, num_parts)``; None or one part: ``name`` itself.
    """
    if part is None or part[1] <= 1:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}.part-{part[0]}-of-{part[1]}{dot}{suffix}"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities as None and numpy scalars/arrays as Python values (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return strict_json(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(value: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``value`` (NaN and infinities written as null, never as bare NaN)."""
    return json.dumps(strict_json(value), indent=indent, allow_nan=False) + "\n"


def read_json(path: str | Path, fix: str) -> Any:
    """Parse a JSON file a user gave; an InputError naming the file and ``fix`` when it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err}); {fix}") from err


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (weights in run records, caches)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_schema_version(data: dict, current: int, source: str | Path) -> int:
    """The ``schema_version`` of a JSON object written by this package (1 when absent: files from before it).

    Raises:
        InputError: the version is not a whole number >= 1, or newer than ``current`` (the message names both).
    """
    version = data.get("schema_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InputError(f"{source}: schema_version = {version!r} must be a whole number >= 1; recreate the file")
    if version > current:
        raise InputError(
            f"{source}: written with schema_version {version}, but this anofpdm_monai reads up to {current}; "
            "upgrade anofpdm_monai to a release that reads it"
        )
    return version


def atomic_write_json(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    """Write ``value`` as strict JSON, atomically."""
    return atomic_write_text(path, json_text(value, indent))


# A CSV cell starting with one of these is a formula to spreadsheet programs (CSV injection): it is written with a
# leading apostrophe, which they show as text. Numbers are never escaped (a negative number stays a number).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(df: Any) -> Any:
    """``df`` with every text cell that starts with :data:`FORMULA_STARTS` prefixed by ``'`` (numbers untouched)."""
    from pandas.api.types import is_numeric_dtype

    escaped = df.copy()
    for column in escaped.columns:
        if not is_numeric_dtype(escaped[column]):  # object or pandas' string dtype
            escaped[column] = escaped[column].map(
                lambda v: "'" + v if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v)  # fmt: skip
    return escaped


def atomic_save_dataframe(df: Any, path: str | Path) -> Path:
    """Write a pandas DataFrame as CSV atomically, text cells escaped against spreadsheet formulas (:func:`csv_safe`)."""
    safe = csv_safe(df)
    return atomic_write(path, lambda tmp: safe.to_csv(tmp, index=False))


def atomic_save_npy(array: np.ndarray, path: str | Path) -> Path:
    """Write an array as ``.npy`` atomically (memory-mappable afterwards)."""
    return atomic_write(path, lambda tmp: np.save(tmp, array))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``; refuse anything that carries pickled objects.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        InputError: the file holds objects other than tensors and plain containers, or is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError depending on the payload
        raise InputError(
            f"{path}: refused to load: it is not a weights-only checkpoint ({type(err).__name__}); "
            "anofpdm only loads plain state dicts of tensors; re-export the weights with torch.save(model.state_dict())"
        ) from err


def load_nifti(path: str | Path, *, allow_4d_singleton: bool = True) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a 3-D NIfTI volume and check it is usable.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        allow_4d_singleton: accept a 4-D file whose last axis has length 1 (squeezed).

    Returns:
        (array (X, Y, Z) float32, the nibabel image whose header and affine describe it).

    Raises:
        InputError: missing, empty, truncated or non-NIfTI file; not 3-D; NaN or infinite voxels.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {missing_file_reason(path)}")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes); re-export or re-download this volume")
    check_extensions(path)
    try:
        with nibabel_messages(path):
            image = nib.load(str(path))  # reads the header only
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as err:
        raise InputError(f"{path}: unreadable or truncated ({err}); re-export or re-download this volume") from err
    except Exception as err:  # nibabel's ImageFileError and friends
        if "slope" in str(err) or "intercept" in str(err):  # nibabel refuses a non-finite scl_inter as it loads
            raise InputError(f"{path}: the header's intensity scaling is not finite ({err}); set scl_slope to 1 and "
                             "scl_inter to 0 (or re-export the volume)") from err  # fmt: skip
        raise InputError(f"{path}: not a NIfTI image ({err}); give a .nii or .nii.gz volume") from err
    check_header(path, image)
    check_geometry(path, image)
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32's range: reported below
            data = np.asarray(image.dataobj, dtype=np.float32)
    except MemoryError as err:
        raise InputError(
            f"{path}: not enough memory to read shape {tuple(image.shape)} as float32; free memory, or split the volume"
        ) from err
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as err:
        raise InputError(f"{path}: unreadable or truncated ({err}); re-export or re-download this volume") from err
    except Exception as err:  # nibabel's ImageFileError and friends
        raise InputError(f"{path}: not a NIfTI image ({type(err).__name__}: {err}); give a .nii or .nii.gz volume") from err
    while data.ndim > 3 and allow_4d_singleton and data.shape[-1] == 1:  # (X, Y, Z, 1) or (X, Y, Z, 1, 1)
        data = data[..., 0]
    if data.ndim != 3:
        fix = "split 4-D series into one 3-D file per sequence" if data.ndim > 3 else "give the whole 3-D volume, not a single slice"
        raise InputError(f"{path}: expected a 3-D volume, found {data.ndim}-D with shape {data.shape}; {fix}")
    if not np.isfinite(data).all():
        _raise_non_finite(path, image, data)
    low, high = float(data.min()), float(data.max())
    if low == high and high != 0:  # all zero is refused where channels are loaded
        warnings.warn(
            f"{path}: every voxel holds the same value ({high:g}); this volume has no contrast, so its anomaly map "
            "means nothing; check the export",
            InputWarning,
            stacklevel=2,
        )
    return data, image


def check_header(path: Path, image: nib.Nifti1Image) -> None:
    """Refuse, from the header alone, a volume too large to read or of a voxel type anofpdm cannot use."""
    shape = tuple(int(s) for s in image.shape)
    if 0 in shape:
        raise InputError(f"{path}: the header claims shape {shape}, an axis of length 0, so the file holds no voxels; "
                         "re-export this volume")  # fmt: skip
    header = image.header
    if "scl_slope" in header and "scl_inter" in header:
        slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
        if not (math.isnan(slope) or slope == 0) and not (math.isfinite(slope) and math.isfinite(inter)):
            raise InputError(f"{path}: the header's intensity scaling is not finite (scl_slope {slope:g}, scl_inter "
                             f"{inter:g}); set scl_slope to 1 and scl_inter to 0 (or re-export the volume)")  # fmt: skip
    voxels = math.prod(shape)
    limit = max_voxels()
    if voxels > limit:
        raise InputError(
            f"{path}: the header claims shape {shape}, {voxels} voxels ({voxels * 4 / 2**30:.1f} GiB as float32), above "
            f"the limit of {limit} voxels ({limit * 4 / 2**30:.1f} GiB); if the volume is real, raise the limit with "
            f"max_voxels or {MAX_VOXELS_ENV}, else re-export the file",
            arguments="max_voxels",
        )
    dtype = image.get_data_dtype()
    if dtype.fields is not None or dtype.kind == "V":
        kind = "RGB" if dtype.fields is not None and set(dtype.fields) >= {"R", "G", "B"} else "structured"
        raise InputError(
            f"{path}: {kind} voxels ({dtype.descr}) are not supported; convert the image to one grey value per voxel "
            "(a scalar 3-D volume)"
        )
    if dtype.kind == "c":
        raise InputError(
            f"{path}: complex voxels ({dtype.name}) are not supported; give the magnitude image (the absolute value of "
            "the complex data) as a real-valued volume"
        )


def check_label_values(path: str | Path, label: np.ndarray) -> np.ndarray:
    """The sorted distinct values of a lesion mask; an InputError when one is negative or not a whole number
    (a probability map or an image given as the mask)."""
    unique = np.unique(label)
    odd = unique[(unique < 0) | (unique != np.round(unique))]
    if odd.size:
        raise InputError(
            f"{path}: unexpected label values {[float(f'{v:.4g}') for v in odd[:5]]} (a lesion mask holds non-negative "
            "integers); give the lesion mask (not a probability map or an image) or leave this case out"
        )
    return unique


def check_case_voxels(paths: list[str | Path]) -> None:
    """Refuse a case whose files together claim more than :func:`max_voxels` voxels (headers only, nothing read).

    The per-file limit of :func:`check_header` alone lets a case of many channels through at several times the
    limit. Files that are missing or unreadable are left to :func:`load_nifti`, which names what is wrong.
    """
    total, limit, counted = 0, max_voxels(), []
    for path in map(Path, paths):
        if not path.is_file() or path.stat().st_size == 0:
            continue
        check_extensions(path)
        try:
            image = nib.load(str(path))
        except Exception:  # noqa: BLE001 - load_nifti reports it with its own message
            continue
        check_header(path, image)  # one file above the limit: its own message, naming its shape
        total += math.prod(int(n) for n in image.shape)
        counted.append(path)
    if total > limit:
        raise InputError(
            f"{counted[0]}: the case's {len(counted)} files claim {total} voxels together ({total * 4 / 2**30:.1f} GiB as "
            f"float32), above the limit of {limit} voxels per case ({limit * 4 / 2**30:.1f} GiB); if the case is real, "
            f"raise the limit with max_voxels or {MAX_VOXELS_ENV}, else re-export its files", arguments="max_voxels",
        )


def check_field_voxels(reference: str | Path, box: tuple[tuple[int, int], tuple[int, int]], shape: tuple[int, ...],
                       margin_mm: float) -> None:
    """Refuse an axial field (the brain's box plus its margin) whose crop of a (C, X, Y, Z) volume of ``shape``
    would hold more than :func:`max_voxels` voxels (tiny voxels turn a margin in mm into thousands of voxels)."""
    (x0, x1), (y0, y1) = box
    voxels = (x1 - x0) * (y1 - y0) * int(shape[0]) * int(shape[-1])
    limit = max_voxels()
    if voxels > limit:
        raise InputError(
            f"{reference}: the brain's field with its {margin_mm:g} mm margin is {x1 - x0} x {y1 - y0} voxels per slice "
            f"({voxels} voxels over {shape[0]} channel(s) and {shape[-1]} slices), above the limit of {limit} voxels; "
            f"check the voxel size in the header (pixdim, xyzt_units), or raise the limit with max_voxels",
            arguments="max_voxels",
        )


NIBABEL_LOGGER = "nibabel.global"  # where nibabel reports header problems it fixes (with a handler of its own)


@contextlib.contextmanager
def nibabel_messages(path: Path) -> Iterator[None]:
    """Turn what nibabel logs while it reads ``path``'s header (e.g. ``pixdim[1,2,3] should be non-zero``) into one
    :class:`InputWarning` each that names the file, instead of a bare line printed for every load of the file."""
    caught: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record.getMessage())

    logger = logging.getLogger(NIBABEL_LOGGER)
    handlers, propagate = list(logger.handlers), logger.propagate
    logger.handlers, logger.propagate = [Catch(logging.DEBUG)], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = handlers, propagate
    for message in dict.fromkeys(caught):
        warnings.warn(f"{path}: {message} (nibabel, reading the header)", InputWarning, stacklevel=3)


def image_stem(name: str) -> str:
    """A file name without its image suffix (``scan.nii.gz``, ``scan.hdr``, ``scan.mgz`` -> ``scan``)."""
    lower = name.lower()
    suffix = next((s for s in IMAGE_SUFFIXES if lower.endswith(s)), None)
    return name[: -len(suffix)] if suffix else name.split(".nii")[0]


def spatial_unit_mm(image: Any) -> float:
    """How many mm one unit of the image's affine is: from NIfTI's ``xyzt_units`` (metres, mm, microns; unknown: mm)."""
    units = getattr(image.header, "get_xyzt_units", None)
    return UNIT_MM.get(units()[0], 1.0) if units is not None else 1.0


def affine_mm(image: Any) -> np.ndarray:
    """The image's (4, 4) voxel-to-world affine with world positions in mm (the header's spatial unit applied)."""
    affine = np.array(image.affine, dtype=np.float64)
    affine[:3] *= spatial_unit_mm(image)
    return affine


AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference (mm, any affine entry) between two headers that still counts as one voxel grid."""


def check_same_grid(path: str | Path, image: Any, reference: str, reference_image: Any, fix: str) -> None:
    """Refuse ``image`` (read from ``path``) unless it lies on ``reference_image``'s voxel grid: the same shape, and
    affines (in mm, :func:`affine_mm`) within :data:`AFFINE_TOLERANCE_MM`. The one grid check (channels of a case,
    a label or brain mask against its case, a prediction against its label).

    Args:
        path, image: the file to check and its image.
        reference: how the message names the reference (e.g. its file name).
        reference_image: the image whose grid ``image`` must share.
        fix: what the user should do, ending the message.

    Raises:
        InputError: one line naming ``path``, the reference, what differs and ``fix``.
    """
    shape, reference_shape = tuple(image.shape[:3]), tuple(reference_image.shape[:3])
    if shape != reference_shape:
        raise InputError(f"{path}: shape {shape} differs from {reference} {reference_shape}; {fix}")
    gap = float(np.max(np.abs(affine_mm(image) - affine_mm(reference_image))))
    if not gap <= AFFINE_TOLERANCE_MM:
        raise InputError(f"{path}: affine differs from {reference} by up to {gap:.3g} mm (tolerance {AFFINE_TOLERANCE_MM} mm); {fix}")


def voxel_volume_mm3(affine: Any) -> float:
    """Volume of one voxel of a grid in mm^3: ``|det(affine[:3, :3])|`` of its (4, 4) voxel-to-world affine (mm).

    The one place a voxel's volume is computed from an affine (lesion volumes, ml, sizes in mm^3)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def spacing_volume_mm3(voxel_mm: Any) -> float:
    """Volume of one voxel in mm^3 from its sizes along the array axes (mm): their product.

    The one place a voxel's volume is computed from sizes; it is the voxel's volume on an axis-aligned grid
    (the stacked S x S slices, ``voxel_mm``), where it equals :func:`voxel_volume_mm3` of the grid's affine."""
    return float(np.prod(np.asarray(voxel_mm, dtype=np.float64)))


def check_geometry(path: Path, image: Any) -> None:
    """Refuse a header whose affine cannot place the voxels: NaN or infinite entries, a collapsed axis, or voxel
    sizes outside :data:`VOXEL_MM_RANGE` (in mm, the header's unit applied)."""
    affine = affine_mm(image)
    fix = "fix the header (re-export the volume, or reset its sform/qform, e.g. with fslorient) and retry"
    if not np.isfinite(affine).all():
        raise InputError(f"{path}: the header's voxel-to-world affine (sform, or qform and pixdim) holds NaN or infinite values; {fix}")
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    volume = voxel_volume_mm3(affine)
    if (sizes == 0).any() or volume <= 1e-9 * float(np.prod(sizes)):
        raise InputError(
            f"{path}: the header's affine is degenerate (voxel axes of lengths {np.round(sizes, 6).tolist()} mm span no "
            f"volume: a zero or repeated column); {fix}"
        )
    low, high = VOXEL_MM_RANGE
    if (sizes < low).any() or (sizes > high).any():
        units = image.header.get_xyzt_units()[0] if hasattr(image.header, "get_xyzt_units") else "mm"
        raise InputError(
            f"{path}: voxel size {tuple(float(f'{v:.4g}') for v in sizes)} mm (header unit: {units}) lies outside "
            f"[{low}, {high}] mm; fix pixdim and xyzt_units in the header (a brain MRI voxel is about 0.1 to 10 mm)"
        )


def check_extensions(path: Path) -> None:
    """Refuse a NIfTI file whose header extensions exceed :data:`MAX_EXTENSION_BYTES` or :data:`MAX_EXTENSIONS`.

    ``nib.load`` reads every extension into memory, so a 1 MB ``.nii.gz`` can make it allocate gigabytes. This
    walks the extension headers (8 bytes each) the way nibabel does, skipping their contents, before it runs.
    Files that are not NIfTI are left to ``nib.load``.
    """
    name = path.name.lower()
    single = name.endswith((".nii", ".nii.gz"))
    if not (single or name.endswith((".hdr", ".hdr.gz"))):
        return
    try:
        with (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as f:
            first = f.read(4)
            if len(first) < 4:
                return
            for order in "<>":
                sizeof_hdr = int(np.frombuffer(first, dtype=f"{order}i4")[0])
                if sizeof_hdr in (348, 540):
                    break
            else:
                return
            rest = f.read(sizeof_hdr - 4)
            status = f.read(4)
            if len(rest) < sizeof_hdr - 4 or len(status) < 4 or status[:1] == b"\0":
                return
            block = first + rest
            vox_offset = (float(np.frombuffer(block[108:112], dtype=f"{order}f4")[0]) if sizeof_hdr == 348
                          else int(np.frombuffer(block[168:176], dtype=f"{order}i8")[0]))  # fmt: skip
            size = vox_offset - sizeof_hdr - 4 if single else -1
            total = count = 0
            while size >= 16 or size < 0:
                ext = f.read(8)
                if len(ext) < 8:
                    return  # the end (or a truncated file: nib.load says so)
                esize = int(np.frombuffer(ext[:4], dtype=f"{order}i4")[0])
                total, count = total + max(esize, 0), count + 1
                if total > MAX_EXTENSION_BYTES or count > MAX_EXTENSIONS:
                    raise InputError(
                        f"{path}: the header carries more than {MAX_EXTENSIONS} extensions or {MAX_EXTENSION_BYTES // 2**20} "
                        f"MiB of them (at least {count} extensions, {total} bytes); they would be read into memory: strip "
                        "them (e.g. nibabel: img.header.extensions.clear(), then save) or re-export the volume"
                    )
                if esize < 16:
                    return  # malformed: nib.load reports it
                f.seek(esize - 8, 1)
                size -= esize
    except InputError:
        raise
    except (OSError, EOFError, zlib.error, ValueError):
        return  # unreadable: nib.load reports it, with the file's name


def _raise_non_finite(path: Path, image: nib.Nifti1Image, data: np.ndarray) -> None:
    """Name what the non-finite float32 voxels are: values beyond float32's range, or NaN/infinite in the file."""
    bad = ~np.isfinite(data)
    native = np.asanyarray(image.dataobj)  # the file's own type (float64 keeps values that float32 cannot hold)
    beyond = bad & np.isfinite(native)
    if beyond.any():
        largest = float(np.abs(native[beyond]).max())
        raise InputError(
            f"{path}: {int(beyond.sum())} voxels beyond the float32 range (largest magnitude {largest:.3g} > "
            f"{FLOAT32_MAX:.3g}); rescale the volume (e.g. divide it by a constant) and retry"
        )
    raise InputError(f"{path}: {int(bad.sum())} NaN or infinite voxels; fix or mask them (e.g. set them to 0) and retry")


# Header fields that place the voxels in space; save_like copies them verbatim from the input.
GEOMETRY_FIELDS = ("pixdim", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z",
                   "qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "xyzt_units", "dim_info")  # fmt: skip


def image_like(array: np.ndarray, reference: nib.Nifti1Image, dtype: type | np.dtype) -> nib.Nifti1Image:
    """``array`` as an image on the reference image's grid: same shape, affine, qform/sform and codes, zooms.

    Args:
        array: (X, Y, Z) values on the reference's voxel grid.
        reference: the input image whose geometry the output must keep.
        dtype: on-disk data type, e.g. ``np.uint8`` for masks, ``np.float32`` for maps.
    """
    if tuple(array.shape) != tuple(reference.shape[:3]):
        raise ValueError(f"array shape {array.shape} differs from the reference grid {reference.shape[:3]}")
    source = nifti_header(reference)
    header = source.copy()
    header.set_data_dtype(dtype)
    header.set_data_shape(array.shape)
    header["scl_slope"] = 1.0
    header["scl_inter"] = 0.0
    header["cal_min"] = 0.0
    header["cal_max"] = 0.0
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), None, header)
    # The geometry fields are copied as they were, not recomputed: with qform code 0 the pixdim and quaternion
    # may disagree with the sform, and a sheared sform has no exact quaternion (set_qform would rewrite them).
    for name in GEOMETRY_FIELDS:
        image.header[name] = source[name]
    return image


def nifti_header(image: Any) -> nib.Nifti1Header:
    """``image``'s own header when it is NIfTI; else (FreeSurfer ``.mgz``, ANALYZE ``.hdr/.img``) a NIfTI-1 header on
    the same grid: the same shape and affine (as sform and qform, code 1) and voxel sizes, in mm."""
    if isinstance(image, (nib.Nifti1Pair, nib.Nifti2Pair)):  # Nifti1Image and Nifti2Image are pairs too
        return image.header
    header = nib.Nifti1Header()
    header.set_data_shape(image.shape[:3])
    header.set_sform(image.affine, code=1)
    header.set_qform(image.affine, code=1)
    header.set_xyzt_units("mm")
    return header


def save_like(array: np.ndarray, reference: nib.Nifti1Image, path: str | Path, dtype: type | np.dtype) -> Path:
    """Write :func:`image_like` of ``array`` to ``path`` (``.nii.gz``), atomically."""
    image = image_like(array, reference, dtype)
    return atomic_write(path, lambda tmp: nib.save(image, str(tmp)))
