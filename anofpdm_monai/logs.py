"""The ``anofpdm`` logger: what a verb says on the console and in a log file in its output folder.

Console: information as the bare message on stdout; warnings and errors on stderr as one line,
``anofpdm VERB: warning: MESSAGE`` (no source line). Both go through ``tqdm.write`` so an active
progress bar is not broken. The log file (``OUT/VERB.log``, appended to) has every message with
its time and level. Python ``warnings`` raised while the verb runs become log warnings, each text
once per run.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import sys
import warnings
from collections.abc import Iterator
from typing import TextIO
from pathlib import Path

from tqdm import tqdm

from anofpdm_monai.io import NIBABEL_LOGGER, InputError, part_file_name

LOGGER_NAME = "anofpdm"
FILE_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_ACTIVE: list[str] = []  # the verbs whose verb_logging is open (log_to_file attaches only inside one)


def get_logger() -> logging.Logger:
    """The logger every verb writes to (``logging.getLogger("anofpdm")``)."""
    return logging.getLogger(LOGGER_NAME)


class ConsoleHandler(logging.Handler):
    """INFO and below to stdout as the message; WARNING and above to stderr as ``anofpdm VERB: LEVEL: MESSAGE``.

    A record logged with ``extra={"bare": True}`` is written without the prefix (e.g. preprocess's
    ``skipped CASE: reason`` lines). The streams are looked up at each message, so a redirected
    ``sys.stdout`` (tests, notebooks) is honoured.
    """

    def __init__(self, verb: str) -> None:
        super().__init__(logging.INFO)
        self.verb = verb

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                prefix = "" if getattr(record, "bare", False) else f"anofpdm {self.verb}: {record.levelname.lower()}: "
                tqdm.write(prefix + message, file=sys.stderr)
            else:
                tqdm.write(message, file=sys.stdout)
        except Exception:  # a logging handler must not raise
            self.handleError(record)


def log_to_file(folder: str | Path, verb: str, part: tuple[int, int] | None = None) -> Path:
    """Append this run's messages to ``FOLDER/VERB.log`` too (until the verb's :func:`verb_logging` ends).

    Outside :func:`verb_logging` (a verb's ``run`` called from Python) it attaches nothing. Part ``K`` of a
    sharded run (``part=(K, N)``) writes ``VERB.part-K-of-N.log``, so the parts' lines never interleave.

    Raises:
        InputError: the folder cannot be written.
    """
    path = Path(folder) / part_file_name(f"{verb}.log", part)
    logger = get_logger()
    if not _ACTIVE:  # outside a verb (a verb's run() called from Python): no handler that nobody would remove
        return path
    if any(getattr(h, "log_path", None) == path.resolve() for h in logger.handlers):
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = VerbLogHandler(open_log(path))
    except OSError as err:
        raise InputError(f"{path}: cannot write the log file ({err.strerror}); choose a writable output folder") from err
    handler.log_path = path.resolve()  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    return path


class VerbLogHandler(logging.StreamHandler):
    """A handler on a log file opened by :func:`open_log`; closing the handler closes the file."""

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            super().close()


def open_log(path: Path) -> TextIO:
    """Open ``path`` for appending without following a symbolic link planted there (``O_NOFOLLOW``): a link, or
    anything but a regular file, is refused (OSError), so the log never lands outside its folder."""
    if path.is_symlink():
        raise OSError(errno.ELOOP, f"it is a symbolic link (to {os.readlink(path)}), which anofpdm does not write through; "
                                   "remove the link", str(path))  # fmt: skip
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.fdopen(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def verb_logging(verb: str) -> Iterator[logging.Logger]:
    """Set up the ``anofpdm`` logger for one verb: console handler, Python warnings routed into it.

    A warning whose text was already shown during this run is not shown again (Python's own
    once-per-location rule forgets what it showed whenever a library enters ``warnings.catch_warnings``).
    On exit the handlers this call or :func:`log_to_file` added are closed and removed and
    ``warnings.showwarning`` is restored, so several verbs may run in one process.
    """
    logger = get_logger()
    before = (list(logger.handlers), logger.level, logger.propagate, warnings.showwarning)
    for handler in before[0]:
        logger.removeHandler(handler)
    logger.addHandler(ConsoleHandler(verb))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if text not in shown:
            shown.add(text)
            logger.warning(text)

    warnings.showwarning = show
    nibabel_logger = logging.getLogger(NIBABEL_LOGGER)  # its header messages: load_nifti warns once, naming the file
    nibabel_handlers, nibabel_logger.handlers = list(nibabel_logger.handlers), [logging.NullHandler()]
    _ACTIVE.append(verb)
    try:
        yield logger
    finally:
        _ACTIVE.pop()
        nibabel_logger.handlers = nibabel_handlers
        warnings.showwarning = before[3]
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        for handler in before[0]:
            logger.addHandler(handler)
        logger.setLevel(before[1])
        logger.propagate = before[2]
