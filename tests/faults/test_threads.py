"""Guarantee 12: torch's thread count follows the CPUs this process may use; ``--threads`` sets it.

On a machine whose CPUs are shared (a cgroup quota, a restricted affinity mask, or simply other
loaded processes), more compute threads than usable CPUs make every parallel region wait for
descheduled threads: one ``segment`` took 19 minutes instead of 45 s at a load of 4x the cores.
The default therefore never uses more threads than ``available_cpus()`` (affinity and cgroup
quota); ``--threads N`` on segment, evaluate and calibrate sets the count outright.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anofpdm_monai import threads as T


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    "files, quota",
    [
        ({"cpu.max": "200000 100000\n"}, 2.0),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_quota_is_read(tmp_path, files, quota):
    assert T.cgroup_cpu_quota(_cgroup(tmp_path, files)) == quota


def test_available_cpus_takes_the_smaller_of_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(T, "CGROUP_ROOT", _cgroup(tmp_path / "a", {"cpu.max": "250000 100000\n"}))
    assert T.available_cpus() == 2, "a quota of 2.5 CPUs gives 2 threads"
    monkeypatch.setattr(T, "CGROUP_ROOT", _cgroup(tmp_path / "b", {"cpu.max": "max 100000\n"}))
    assert T.available_cpus() == 8
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert T.available_cpus() == 1
    monkeypatch.setattr(T, "CGROUP_ROOT", _cgroup(tmp_path / "c", {"cpu.max": "50000 100000\n"}))
    assert T.available_cpus() == 1, "never fewer than one"


def test_default_never_raises_the_thread_count(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(T, "available_cpus", lambda: 2)
        torch.set_num_threads(1)
        assert T.configure_threads(None) == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(4)
        assert T.configure_threads(None) == 2 and torch.get_num_threads() == 2
        assert T.configure_threads(3) == 3 and torch.get_num_threads() == 3, "--threads is taken as given"
        with pytest.raises(ValueError, match="^threads=0: give at least 1"):
            T.configure_threads(0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("verb", ["segment", "evaluate", "calibrate"])
def test_threads_flag_is_applied_for_the_run_and_restored(verb, monkeypatch):
    import importlib

    from pipelines.cli import main

    module = importlib.import_module(f"pipelines.{verb}")
    seen = []
    monkeypatch.setattr(module, "run", lambda args: seen.append(torch.get_num_threads()) or 0)
    argv = {"segment": ["-m", "m", "-i", "x", "-o", "y"], "evaluate": ["-m", "m", "-i", "x", "-o", "y"],
            "calibrate": ["-m", "m", "-d", "x"]}[verb]  # fmt: skip
    before = torch.get_num_threads()
    assert main([verb, *argv, "--threads", "3"]) == 0
    assert seen == [3] and torch.get_num_threads() == before
