"""Output folders: outputs never land on an input, each finished case records its settings, one run writes a folder.

* :func:`check_outputs_spare_inputs` refuses, before anything is written, an output path that is an
  input file of the run: the same path, a symbolic link to it or a hard link to it.
* :func:`case_record` wraps the writing of one case: it removes the case's old settings record first and
  writes the new one (``CASE.json`` beside the outputs) once the case's files are whole, so a finished case
  is one whose record exists; :func:`finished` compares a record with this run's settings and refuses a mix.
* :func:`lock_folder` takes ``FOLDER/anofpdm.lock`` (created with ``O_EXCL``, holding the process id) for the
  rest of the verb; :func:`release_locks` removes it (``pipelines.cli`` calls it when the verb ends, even on
  Ctrl-C). A lock left by a process that is no longer running on this host is taken over with a warning.
* The parts of a sharded run (``num_parts`` > 1: ``torchrun`` ranks, SLURM array tasks, or processes started by
  hand) each keep a run record of their own, ``run.part-K-of-N.json`` (:func:`start_part`: state ``running``,
  refused when another part in the folder has other settings; :func:`finish_part`: state ``finished``); the last
  part to finish merges the run (the cohort tables of ``evaluate``) and writes ``run.json`` naming every part,
  under :func:`merge_lock` (``FOLDER/anofpdm.merge.lock``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from anofpdm_monai.io import RESERVED_CASE_SUFFIX as RESERVED_SUFFIX
from anofpdm_monai.io import InputError, InputWarning, atomic_write_json, part_file_name
from anofpdm_monai.provenance import RUN_RECORD

LOCK_NAME = "anofpdm.lock"
MERGE_LOCK_NAME = "anofpdm.merge.lock"
PART_RECORD = re.compile(r"run\.part-(\d+)-of-(\d+)\.json")
# a merge lock of another host is taken over once this old (its process cannot be asked whether it still runs)
MERGE_LOCK_STALE_S = 6 * 3600

# the settings that change what segment writes for a case (a finished case is reused only when they match)
SEGMENT_SETTINGS = ("method", "encoding", "steps", "stride", "w", "thr_01", "D", "calibration_sha256", "seed",
                    "precision", "keep_3d_components", "save_anomaly", "brain_mask")  # fmt: skip


def segment_outputs(out_dir: str | Path, case_id: str) -> dict[str, Path]:
    """The files ``segment`` may write for one case: mask, map, PNG overlay and settings record."""
    out = Path(out_dir)
    return {"mask": out / f"{case_id}.nii.gz", "anomaly": out / f"{case_id}{RESERVED_SUFFIX}.nii.gz",
            "png": out / f"{case_id}.png", "record": out / f"{case_id}.json"}  # fmt: skip


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def check_outputs_spare_inputs(inputs: Iterable[str | Path], outputs: Iterable[str | Path], fix: str,
                               arguments: str | Sequence[str] = ()) -> None:
    """Refuse when an output path is one of the input files: the same path, a symbolic link to it or a hard link.

    Args:
        inputs: every file the run reads.
        outputs: every file the run may write (existing or not).
        fix: the end of the message (e.g. ``choose an output_dir apart from the input files``).
        arguments: the arguments ``fix`` names (:class:`InputError`, the CLI spells them as its flags).

    Raises:
        InputError: ``OUT: would overwrite the input IN (HOW); FIX``, before anything is written.
    """
    by_path: dict[Path, Path] = {}
    by_inode: dict[tuple[int, int], Path] = {}
    for path in map(Path, inputs):
        by_path[Path(os.path.abspath(path))] = path
        by_path[path.resolve()] = path
        identity = _identity(path)
        if identity is not None:
            by_inode[identity] = path
    for out in map(Path, outputs):
        source, how = by_path.get(Path(os.path.abspath(out))), "the same file"
        if source is None and out.resolve() in by_path:
            source, how = by_path[out.resolve()], "a symbolic link to it"
        if source is None and _identity(out) in by_inode:
            source, how = by_inode[_identity(out)], "a symbolic link to it" if out.is_symlink() else "a hard link to it"
        if source is not None:
            raise InputError(f"{out}: this output would overwrite the input {source} ({how}); {fix}", arguments=arguments)


def check_segment_outputs(records: Sequence[Any], out_dir: str | Path, extra: Sequence[str] = (), argument: str = "output") -> None:
    """:func:`check_outputs_spare_inputs` for ``segment``: every case's outputs and ``extra`` names in ``out_dir``.

    Args:
        records: the cases (:class:`anofpdm_monai.readers.CaseRecord`: their channels, label and brain mask are inputs).
        out_dir: the output folder.
        extra: other files written into it (``run.json``, ``segment.log``).
        argument: the caller's name for ``out_dir``, which the message names.
    """
    from anofpdm_monai.readers import record_files

    inputs = [p for r in records for p in record_files(r)]
    outputs = [p for r in records for p in segment_outputs(out_dir, r.case_id).values()]
    check_outputs_spare_inputs(inputs, [*outputs, *(Path(out_dir) / name for name in extra)],
                               f"choose an {argument} folder apart from the input files", argument)  # fmt: skip


def check_store_outputs(records: Sequence[Any], store: str | Path, source: str | Path) -> None:
    """:func:`check_outputs_spare_inputs` for ``preprocess``: the store's files against the cases' files and ``source``."""
    from anofpdm_monai.data import MANIFEST_FILE, SETTINGS_FILE, SKIPPED_FILE
    from anofpdm_monai.readers import record_files

    store = Path(store)
    inputs = [source, *(p for r in records for p in record_files(r))]
    names = [SETTINGS_FILE, MANIFEST_FILE, SKIPPED_FILE, RUN_RECORD, "preprocess.log"]
    outputs = [store / n for n in names] + [store / d / f"{r.case_id}{ext}" for r in records
                                           for d, ext in (("images", ".npy"), ("masks", ".npy"), ("cases", ".json"))]  # fmt: skip
    check_outputs_spare_inputs(inputs, outputs, "choose a store folder apart from the input files", "store")


# --- per-case settings records -------------------------------------------------------------------------------


def settings_record(settings: Mapping[str, Any], model_sha256: str | None) -> dict[str, Any]:
    """A case's settings record: ``{"settings": ..., "model": {"sha256": ...}}`` (the shape of a run record)."""
    from anofpdm_monai.provenance import package_version, plain

    return {"settings": plain(dict(settings)), "model": {"sha256": model_sha256}, "anofpdm_monai": package_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip


def finished(record_path: str | Path, record: Mapping[str, Any], keys: Sequence[str], *outputs: str | Path) -> bool:
    """Whether a case was finished with this run's settings: its ``outputs`` and its settings record exist and match.

    Args:
        record_path: the case's settings record (e.g. ``OUT/CASE.json``).
        record: this run's record (:func:`settings_record`, or a run record).
        keys: the settings that change the case's files; ``model.sha256`` is always compared.
        outputs: the case's files, all of which must exist.

    Raises:
        InputError: the case was finished with another model or other settings: one line naming the record,
            the first setting that differs (old -> new) and the fix.
    """
    from anofpdm_monai.provenance import shown_value, differences, read_run_record

    record_path = Path(record_path)
    if not all(Path(p).is_file() for p in outputs) or not record_path.is_file():
        return False
    before = read_run_record(record_path)
    changed = differences(before or {}, record, ["model.sha256", *keys])
    if changed:
        key, old, new = changed[0]
        raise InputError(
            f"{record_path}: this case was made with {key} {shown_value(old)}, this run has {shown_value(new)}; a folder must not "
            "mix outputs of other settings: choose a new output folder, or run without resume to redo every case",
            arguments="resume",
        )
    return True


@contextlib.contextmanager
def case_record(record_path: str | Path, record: Mapping[str, Any] | None) -> Iterator[None]:
    """Write one case inside this block: its old settings record goes first, the new one is written after the block.

    A run killed inside the block leaves no record, so the case counts as unfinished and is redone.
    ``record`` None writes none (and removes none).
    """
    if record is None:
        yield
        return
    path = Path(record_path)
    path.unlink(missing_ok=True)
    yield
    atomic_write_json(path, record)


# --- one run per folder --------------------------------------------------------------------------------------

_HELD: list[Path] = []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _lock_text(verb: str) -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "verb": verb,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n"  # fmt: skip


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def lock_folder(folder: str | Path, verb: str, part: tuple[int, int] | None = None) -> Path:
    """Take ``FOLDER/anofpdm.lock`` for this process until :func:`release_locks` (or the process's exit).

    Args:
        folder: the output folder (it must exist).
        verb: written into the lock, for the message another run gets.
        part: ``(part_id, num_parts)`` when this process writes one part of a sharded run: the parts of one run
            take ``anofpdm.part-K-of-N.lock`` each and may write the folder together; a whole run excludes them.

    Raises:
        InputError: another live process holds a lock on the folder (one line: its verb, process id, start).
    """
    folder = Path(folder)
    name = part_file_name(LOCK_NAME, part)
    path = folder / name
    if path in _HELD:
        return path
    for _attempt in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            _take_over_if_stale(path)
            continue
        except OSError as err:
            raise InputError(f"{path}: cannot create the folder's lock ({err.strerror}); choose a writable output folder") from err
        with os.fdopen(fd, "w") as f:
            f.write(_lock_text(verb))
        break
    else:
        _refuse(path, _read_lock(path), folder)
    _HELD.append(path)
    others = [p for p in folder.glob("anofpdm*.lock") if p != path and (name == LOCK_NAME or p.name == LOCK_NAME)]
    for other in others:
        holder = _read_lock(other)
        if _held_elsewhere(holder):
            release_locks([path])
            _refuse(other, holder, folder)
    return path


def _held_elsewhere(holder: Mapping[str, Any]) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or holder.get("host") != socket.gethostname():
        return bool(holder)  # another host's (or an unreadable) lock counts as held
    return pid != os.getpid() and _alive(pid)


def _take_over_if_stale(path: Path) -> None:
    """Remove ``path`` when the process that wrote it has ended (same host) or it is this process's; else refuse."""
    holder = _read_lock(path)
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and (pid == os.getpid() or not _alive(pid)):
        if pid != os.getpid():
            warnings.warn(
                f"{path}: left by anofpdm {holder.get('verb', '?')} (process {pid}, started {holder.get('started', '?')}), "
                "which is no longer running (killed?); taking the folder over", InputWarning, stacklevel=3,
            )  # fmt: skip
        path.unlink(missing_ok=True)
        return
    _refuse(path, holder, path.parent)


def _refuse(path: Path, holder: Mapping[str, Any], folder: Path) -> None:
    if not holder:
        raise InputError(f"{path}: the folder is locked by another run (the lock is unreadable); if no anofpdm run is "
                         f"writing into {folder}, delete {path}")  # fmt: skip
    where = "" if holder.get("host") == socket.gethostname() else f" on host {holder.get('host')}"
    raise InputError(
        f"{path}: anofpdm {holder.get('verb', '?')} (process {holder.get('pid')}{where}, started {holder.get('started', '?')}) "
        f"is writing into {folder}; wait for it to finish or choose another output folder (if no such run is alive, "
        f"delete {path})"
    )


def release_locks(paths: Iterable[Path] | None = None) -> None:
    """Remove the locks this process holds (``paths``: only those), if they still name this process."""
    for path in list(_HELD if paths is None else paths):
        if path in _HELD:
            _HELD.remove(path)
        if _read_lock(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)


atexit.register(release_locks)  # a verb called from Python (not through pipelines.cli) still leaves no lock behind


# --- the parts of a sharded run ------------------------------------------------------------------------------


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def part_records(folder: str | Path, num_parts: int) -> dict[int, Path]:
    """The run records ``run.part-K-of-NUM_PARTS.json`` in ``folder``, by part id ``K``."""
    found = {}
    for path in Path(folder).glob(f"run.part-*-of-{num_parts}.json"):
        match = PART_RECORD.fullmatch(path.name)
        if match and int(match[2]) == num_parts and int(match[1]) < num_parts:
            found[int(match[1])] = path
    return dict(sorted(found.items()))


def continuation_record(folder: str | Path, part: tuple[int, int] | None = None) -> str:
    """The name of the run record ``resume`` checks this run against: for a part its own record, else the merged
    ``run.json``, else another part's record of the same split; for a whole run ``run.json``."""
    folder = Path(folder)
    if part is None or part[1] <= 1:
        return RUN_RECORD
    own = part_file_name(RUN_RECORD, part)
    if (folder / own).is_file() or (folder / RUN_RECORD).is_file():
        return own if (folder / own).is_file() else RUN_RECORD
    others = part_records(folder, part[1])
    return next(iter(others.values())).name if others else own


def start_part(folder: str | Path, record: Mapping[str, Any], part: tuple[int, int] | None, keys: Sequence[str]) -> Path:
    """Write this process's run record: ``run.json`` for a whole run, ``run.part-K-of-N.json`` for part ``K`` of ``N``.

    A part's record is the run record with ``part``: ``{"id", "count", "state": "running", "host", "pid",
    "started"}``. It is written under :func:`merge_lock` once every other part's record in the folder was found
    to have the same model and ``keys`` settings.

    Args:
        folder: the output folder (it exists).
        record: this run's record (:func:`anofpdm_monai.provenance.run_record`).
        part: ``(part_id, num_parts)``; None or one part: a whole run.
        keys: the settings the parts must share (those that change the outputs).

    Raises:
        InputError: another part's record has another model or other settings: one line naming both files and
            the first setting that differs.
    """
    from anofpdm_monai.provenance import differences, read_run_record, shown_value, write_run_record

    folder = Path(folder)
    if part is None or part[1] <= 1:
        return write_run_record(folder, record)
    own = folder / part_file_name(RUN_RECORD, part)
    with merge_lock(folder):
        for path in part_records(folder, part[1]).values():
            other = read_run_record(path) if path != own else None
            changed = differences(other, record, ["model.sha256", *keys]) if other is not None else []
            if changed:
                key, old, new = changed[0]
                raise InputError(
                    f"{own}: another part of this run, {path}, was made with {key} {shown_value(old)}, this part has "
                    f"{shown_value(new)}; the parts of one run must share the model and settings: give every part the "
                    f"same ones, or choose a new output folder (delete {path.name} if it is left from an earlier run)"
                )  # fmt: skip
        info = {"id": part[0], "count": part[1], "state": "running", "host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        return write_run_record(folder, {**record, "part": info}, own.name)


def finish_part(folder: str | Path, record: Mapping[str, Any], part: tuple[int, int] | None,
                merge: Callable[[], Any] | None = None, counts: Mapping[str, int] | None = None) -> bool:  # fmt: skip
    """Mark this part finished; the last part to finish merges the run.

    Under :func:`merge_lock`: this part's record gets state ``finished`` (and ``counts``, e.g. cases and failures);
    when every part's record of the split is finished, ``merge()`` runs (e.g. ``evaluate``'s cohort tables) and
    ``run.json`` is written: this part's record with ``settings.part_id`` dropped and ``parts`` listing each part's
    record file, device, host, times and counts. A whole run only calls ``merge()`` (its ``run.json`` is written).

    Args:
        folder: the output folder.
        record: this run's record (as given to :func:`start_part`).
        part: ``(part_id, num_parts)``; None or one part: a whole run.
        merge: what the last part does before ``run.json`` is written.
        counts: numbers to keep in the part's record (``{"cases": 12, "failed": 0}``).

    Returns:
        Whether this process merged the run (every part has finished).
    """
    from anofpdm_monai.provenance import read_run_record, write_run_record

    folder = Path(folder)
    if part is None or part[1] <= 1:
        if merge is not None:
            merge()
        return True
    own = folder / part_file_name(RUN_RECORD, part)
    with merge_lock(folder):
        started = (read_run_record(own) or {}).get("part")
        info = {**(started if isinstance(started, dict) else {}), "id": part[0], "count": part[1], "state": "finished",
                "finished": _now(), **(counts or {})}  # fmt: skip
        write_run_record(folder, {**record, "part": info}, own.name)
        records = {path: read_run_record(path) or {} for path in part_records(folder, part[1]).values()}
        parts = {path: r.get("part") for path, r in records.items()}
        if len(records) < part[1] or any(not isinstance(p, dict) or p.get("state") != "finished" for p in parts.values()):
            return False
        if merge is not None:
            merge()
        settings = {k: v for k, v in dict(record.get("settings", {})).items() if k != "part_id"}
        listed = [{"file": path.name, "device": records[path].get("settings", {}).get("device"), **p} for path, p in parts.items()]
        merged = {k: v for k, v in record.items() if k != "part"}
        write_run_record(folder, {**merged, "settings": settings, "parts": listed})
        return True


@contextlib.contextmanager
def merge_lock(folder: str | Path, poll_s: float = 0.2) -> Iterator[Path]:
    """Hold ``FOLDER/anofpdm.merge.lock`` (created with ``O_EXCL``) inside the block: the parts of a run update their
    records and merge one at a time. Another holder is waited for; a lock left by a process that has ended (this
    host) or older than :data:`MERGE_LOCK_STALE_S` (another host) is taken over.

    Raises:
        InputError: the folder cannot be written.
    """
    path = Path(folder) / MERGE_LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            if not _remove_if_stale_merge_lock(path):
                time.sleep(poll_s)
            continue
        except OSError as err:
            raise InputError(f"{path}: cannot create the merge lock ({err.strerror}); choose a writable output folder") from err
        with os.fdopen(fd, "w") as f:
            f.write(_lock_text("merge"))
        break
    try:
        yield path
    finally:
        if _read_lock(path).get("pid") == os.getpid() and _read_lock(path).get("host") == socket.gethostname():
            path.unlink(missing_ok=True)


def _remove_if_stale_merge_lock(path: Path) -> bool:
    """Remove the merge lock at ``path`` if its holder has ended; whether it did. The lock is first renamed to a
    name of this process's, and put back if it turns out to be a fresh one taken meanwhile by another part."""
    holder = _read_lock(path)
    pid, here = holder.get("pid"), holder.get("host") == socket.gethostname()
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return True  # gone meanwhile: try again at once
    if here and isinstance(pid, int):
        stale = not _alive(pid)
    else:  # another host's, or unreadable (being written: give it a moment)
        stale = age > (MERGE_LOCK_STALE_S if holder else 60)
    if not stale:
        return False
    aside = path.with_name(f"{path.name}.stale-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(path, aside)
    except OSError:
        return True  # another part took it over first
    if _read_lock(aside) != holder:  # a fresh lock replaced the stale one between the reads: give it back
        try:
            os.link(aside, path)
        except OSError:
            pass
    aside.unlink(missing_ok=True)
    return True
