"""Compute threads from the CPUs this process may use (affinity mask and cgroup CPU quota).

torch sizes its thread pool from the machine's cores. In a container limited to 2 CPUs of a
64-core host, or under an affinity mask, that is too many: each parallel region then waits for
threads that are not scheduled, and a run slows down far beyond its share of the CPU. The default
here lowers torch's thread count to the usable CPUs (never raises it: an explicit
``OMP_NUM_THREADS`` or ``torch.set_num_threads`` below that stays); ``configure_threads(N)`` sets it outright.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from anofpdm_monai.io import InputError

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path | None = None) -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``), or None when unlimited."""
    root = CGROUP_ROOT if root is None else Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota (rounded down, at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    return max(1, cpus)


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: ``threads`` if given, else at most :func:`available_cpus`.

    Returns:
        the thread count now in use.

    Raises:
        InputError: ``threads`` is below 1.
    """
    if threads is not None:
        if threads < 1:
            raise InputError(f"threads={threads}: give at least 1", arguments="threads")
        torch.set_num_threads(int(threads))
    else:
        torch.set_num_threads(min(torch.get_num_threads(), available_cpus()))
    return torch.get_num_threads()
