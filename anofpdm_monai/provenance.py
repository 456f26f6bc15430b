"""Run records: how an output folder was made (``run.json``), and the check that ``--continue`` does not mix runs.

A run record is a strict-JSON object::

    {"verb": "evaluate", "argv": ["anofpdm", "evaluate", ...], "command": "anofpdm evaluate ...",
     "settings": {every resolved setting of the verb},
     "model": {"path": ".../model", "sha256": "..."} or null,
     "versions": {"anofpdm_monai": ..., "torch": ..., "monai": ..., "nibabel": ..., "numpy": ..., "python": ...},
     "platform": "Linux-...", "date": "2026-01-01T12:00:00Z"}

Each verb writes it into its output folder at the start of the run (so a killed run has one too);
``check_continuation`` compares a new run's record with the one already there before any finished
output is reused.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from anofpdm_monai.io import InputError, atomic_write_json, file_sha256, strict_json

RUN_RECORD = "run.json"
PACKAGES = ("anofpdm_monai", "torch", "monai", "nibabel", "numpy")
_MISSING = object()


def package_version() -> str:
    """This package's version (``anofpdm_monai.__version__``, the one setup.cfg reads).

    Read from the package already imported (Python imports a package before its modules), not imported here:
    ``anofpdm_monai`` imports the API, which records settings through this module (no import cycle).
    """
    return sys.modules[__package__].__version__


def versions() -> dict[str, str | None]:
    """Versions of the package, torch, MONAI, nibabel, numpy and Python (None for a package not installed)."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        if name == "anofpdm_monai":
            found[name] = package_version()
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    return found


def json_sha256(value: Any) -> str:
    """Hex sha256 of ``value`` as canonical strict JSON (sorted keys): identifies e.g. a calibration's content."""
    return hashlib.sha256(json.dumps(strict_json(value), sort_keys=True, allow_nan=False).encode()).hexdigest()


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: paths and other objects as text, NaN as null, tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return strict_json(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return strict_json(value.item())
    return str(value)


def run_record(verb: str, argv: Sequence[str] | None, settings: Mapping[str, Any], model_dir: str | Path | None = None) -> dict[str, Any]:
    """The record of one run of ``anofpdm VERB``.

    Args:
        verb: the sub-command, e.g. ``evaluate``.
        argv: the command line as typed (``["anofpdm", "evaluate", ...]``), or None when the verb was
            called from Python without one.
        settings: every setting of the run, as resolved (e.g. the precision ``auto`` turned into, the
            calibrated N when ``--steps`` was not given); paths are written as text.
        model_dir: the model folder the run uses (its ``model.pt`` is hashed), or None.

    Returns:
        a strict-JSON-ready dict (see the module docstring).
    """
    model = None
    if model_dir is not None:
        weights = Path(model_dir) / "model.pt"
        model = {"path": str(Path(model_dir).resolve()), "sha256": file_sha256(weights) if weights.is_file() else None}
    return {
        "verb": verb,
        "argv": None if argv is None else [str(a) for a in argv],
        "command": None if argv is None else shlex.join(str(a) for a in argv),
        "settings": plain(settings),
        "model": model,
        "versions": versions(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


def write_run_record(out_dir: str | Path, record: Mapping[str, Any], name: str = RUN_RECORD) -> Path:
    """Write ``record`` as ``OUT_DIR/NAME`` (default ``run.json``): strict JSON, atomically."""
    path = Path(out_dir) / name
    try:
        return atomic_write_json(path, record)
    except OSError as err:
        raise InputError(f"{path}: cannot write the run record ({err.strerror}); choose a writable output folder") from err


def read_run_record(path: str | Path) -> dict[str, Any] | None:
    """The record at ``path``, or None when there is none or it is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, OSError):
        return None
    return record if isinstance(record, dict) else None


def _lookup(record: Mapping[str, Any], key: str) -> Any:
    """``record["settings"][key]``, or for a dotted key such as ``model.sha256`` the nested value; _MISSING if absent."""
    node: Any = record if "." in key else record.get("settings", {})
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def shown_value(value: Any) -> str:
    if value is _MISSING:
        return "(not recorded)"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def differences(before: Mapping[str, Any], now: Mapping[str, Any], keys: Iterable[str]) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for each of ``keys`` whose value differs between two records.

    A plain key names a setting (``record["settings"][key]``); a dotted key a nested field
    (``model.sha256``). Values are compared as JSON, so a tuple equals the list it is written as; where
    both values are objects, the differing fields inside are named (``calibrations.ddim.steps``).
    """
    changed: list[tuple[str, Any, Any]] = []
    for key in keys:
        _compare(key, _lookup(before, key), _lookup(plain(now), key), changed)
    return changed


def _compare(key: str, old: Any, new: Any, changed: list[tuple[str, Any, Any]]) -> None:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for name in sorted(set(old) | set(new)):
            _compare(f"{key}.{name}", old.get(name, _MISSING), new.get(name, _MISSING), changed)
    elif old is _MISSING or new is _MISSING:
        if old is not new:
            changed.append((key, old, new))
    elif json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
        changed.append((key, old, new))


def check_continuation(out_dir: str | Path, record: Mapping[str, Any], keys: Iterable[str], name: str = RUN_RECORD) -> None:
    """Refuse to continue into ``out_dir`` when its outputs were made with another model or other settings.

    Call it only when the run would reuse finished outputs (``--continue`` and some exist). The model's
    ``model.sha256`` is always compared (when either record names a model), then ``keys`` in order.

    Args:
        out_dir: the output folder holding the earlier run's outputs and its ``NAME``.
        record: this run's record (:func:`run_record`).
        keys: the settings that change the outputs (plain names of ``settings``, or dotted paths).
        name: the record's file name.

    Raises:
        InputError: one line naming the record file, the first setting that differs (old -> new) and the fix.
    """
    path = Path(out_dir) / name
    before = read_run_record(path)
    fix = "choose a new output folder, or run without resume to redo every case"
    if before is None:
        raise InputError(
            f"{path}: missing or unreadable, so the outputs in {Path(out_dir)} cannot be checked against this run's model "
            f"and settings (they were made by another version or tool); {fix}", arguments="resume"
        )
    keys = list(keys)
    if before.get("model") is not None or record.get("model") is not None:
        keys = ["model.sha256", *keys]
    changed = differences(before, record, keys)
    if not changed:
        return
    detail = "; ".join(f"{key}: {shown_value(old)} -> {shown_value(new)}" for key, old, new in changed)
    what = "another model" if changed[0][0] == "model.sha256" else "other settings"
    raise InputError(f"{path}: the existing outputs were made with {what} ({detail}); {fix}", arguments="resume")


def command_line(argv: Sequence[str] | None = None) -> list[str]:
    """``["anofpdm", *ARGS]`` for the arguments given (default: this process's ``sys.argv[1:]``)."""
    return ["anofpdm", *(sys.argv[1:] if argv is None else [str(a) for a in argv])]


def inference_settings(slice_inferer: Any) -> dict[str, Any]:
    """What one slice inferer resolved, for a run record: encoding, N, k, w, thr_01, D, network precision,
    and the sha256 of its calibration's content (a recalibrated model differs even where w and N do not).

    Args:
        slice_inferer: an :class:`anofpdm_monai.inferers.ForwardProcessInferer` (its ``encoding``, ``steps``,
            ``stride``, ``calibration`` and ``predict_eps``).
    """
    from anofpdm_monai.calibration import predictor_precision

    calibration = slice_inferer.calibration
    return {
        "encoding": slice_inferer.encoding, "steps": slice_inferer.steps, "stride": slice_inferer.stride,
        "w": calibration.w, "thr_01": calibration.thr_01, "D": list(calibration.D),
        "precision": predictor_precision(slice_inferer.predict_eps),
        "calibration_sha256": json_sha256(calibration.to_dict()),
    }  # fmt: skip
