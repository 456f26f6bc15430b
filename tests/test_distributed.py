"""The one rank / world size / device helper of train, evaluate and segment (anofpdm_monai.distributed)."""

from __future__ import annotations

import pytest
import torch

from anofpdm_monai import distributed
from anofpdm_monai.distributed import ProcessRank, process_rank, rank_device, resolve_parts, shard
from anofpdm_monai.io import InputError
from anofpdm_monai.networks import resolve_device


def test_a_lone_process_is_rank_0_of_1():
    assert process_rank({}) == ProcessRank(0, 1, 0) and not process_rank({}).distributed
    assert process_rank({"RANK": "2", "WORLD_SIZE": "4"}) == ProcessRank(2, 4, 2)  # LOCAL_RANK defaults to RANK
    assert process_rank({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == ProcessRank(3, 4, 1)


@pytest.mark.parametrize(
    "environ, variable",
    [({"RANK": "one"}, "RANK"), ({"WORLD_SIZE": "2.5"}, "WORLD_SIZE"), ({"LOCAL_RANK": "-1"}, "LOCAL_RANK"),
     ({"RANK": "-2", "WORLD_SIZE": "4"}, "RANK"), ({"WORLD_SIZE": "0"}, "WORLD_SIZE"), ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK")],
)  # fmt: skip
def test_bad_rank_variables_are_one_line_naming_the_variable(environ, variable):
    with pytest.raises(InputError, match=rf"^environment variable {variable}=") as err:
        process_rank(environ)
    assert "\n" not in str(err.value)


def test_resolve_device_reads_the_environment(monkeypatch):
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(InputError, match="environment variable RANK='x'"):
        resolve_device("cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_device("cpu") == torch.device("cpu")  # ranks on the CPU share it


def test_each_rank_gets_its_own_gpu(monkeypatch):
    """On CUDA a device without an index becomes cuda:LOCAL_RANK per rank (mocked GPUs: 4 visible)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(device))
    cuda = torch.device("cuda")
    assert rank_device(cuda, ProcessRank(5, 8, 1)) == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert rank_device(cuda, ProcessRank(0, 1, 0)) == cuda  # one process: as given
    assert rank_device(torch.device("cuda", 3), ProcessRank(1, 2, 1)) == torch.device("cuda", 3)  # an explicit index is kept
    with pytest.raises(InputError, match="LOCAL_RANK=4 names a GPU this machine does not have"):
        rank_device(cuda, ProcessRank(4, 8, 4))


def test_parts_come_from_torchrun_or_from_the_arguments():
    assert resolve_parts(1, 0, ProcessRank(2, 3, 2)) == (3, 2)
    assert resolve_parts(4, 1, ProcessRank()) == (4, 1)
    with pytest.raises(InputError, match=r"part_id=4 must lie in \[0, num_parts=4\)") as err:
        resolve_parts(4, 4, ProcessRank())
    assert err.value.arguments == ("part_id", "num_parts")
    parts = [shard(list(range(7)), 3, p) for p in range(3)]
    assert sorted(sum(parts, [])) == list(range(7)) and parts[0] == [0, 3, 6]
    assert distributed.barrier(ProcessRank()) is None  # one process: no group, no wait


SLURM = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "9", "SLURM_ARRAY_TASK_STEP": "2",
         "SLURM_ARRAY_TASK_COUNT": "5"}  # fmt: skip


def test_slurm_array_tasks_are_parts_numbered_from_0():
    from anofpdm_monai.distributed import slurm_part

    assert slurm_part(SLURM) == (5, 3), "tasks 1, 3, 5, 7, 9: task 7 is part 3 of 5"
    assert slurm_part({**SLURM, "SLURM_ARRAY_TASK_ID": "1"}) == (5, 0)
    no_step = {k: v for k, v in SLURM.items() if k != "SLURM_ARRAY_TASK_STEP"}
    assert slurm_part({**no_step, "SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "9"}) == (9, 3)
    assert resolve_parts(rank=ProcessRank(), parts_from="slurm", environ=SLURM) == (5, 3)


@pytest.mark.parametrize("change, variable", [
    ({"SLURM_ARRAY_TASK_ID": None}, "SLURM_ARRAY_TASK_ID"), ({"SLURM_ARRAY_TASK_COUNT": "x"}, "SLURM_ARRAY_TASK_COUNT"),
    ({"SLURM_ARRAY_TASK_ID": "4"}, "SLURM_ARRAY_TASK_ID"), ({"SLURM_ARRAY_TASK_COUNT": "3"}, "SLURM_ARRAY_TASK_COUNT"),
    ({"SLURM_ARRAY_TASK_STEP": "0"}, "SLURM_ARRAY_TASK_STEP"),
])  # fmt: skip
def test_a_bad_or_gapped_slurm_array_is_refused_naming_the_variable(change, variable):
    from anofpdm_monai.distributed import slurm_part

    environ = {k: v for k, v in {**SLURM, **change}.items() if v is not None}
    with pytest.raises(InputError, match=rf"environment variable {variable}\b") as err:
        slurm_part(environ)
    assert "\n" not in str(err.value)


def test_parts_from_torchrun_slurm_or_arguments_and_never_two_at_once():
    assert resolve_parts(1, 0, ProcessRank(1, 2, 1), parts_from="torchrun", environ={"WORLD_SIZE": "2"}) == (2, 1)
    with pytest.raises(InputError, match="WORLD_SIZE is not set"):
        resolve_parts(rank=ProcessRank(), parts_from="torchrun", environ={})
    with pytest.raises(InputError, match="give one or the other"):
        resolve_parts(4, 1, ProcessRank(), parts_from="slurm", environ=SLURM)
    with pytest.raises(InputError, match="parts_from='mpi'"):
        resolve_parts(parts_from="mpi", rank=ProcessRank(), environ={})
    # a SLURM array of torchrun jobs: part 3 of 5, split again among 2 ranks, covers its share exactly once
    ranks = [resolve_parts(rank=ProcessRank(r, 2, r), parts_from="slurm", environ=SLURM) for r in (0, 1)]
    assert ranks == [(10, 3), (10, 8)]
    cases = list(range(40))
    assert sorted(shard(cases, *ranks[0]) + shard(cases, *ranks[1])) == shard(cases, 5, 3)


def test_two_gloo_ranks_each_take_their_local_rank_gpu_and_a_disjoint_part(tmp_path):
    """Under torchrun (2 ranks, a gloo group, CUDA mocked with 2 GPUs) each rank resolves ``--device auto`` to
    cuda:LOCAL_RANK and sets it current, and the ranks' parts cover the cohort exactly once. (That each part keeps
    its own run record and log: test_api's two-rank segment test.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    report = tmp_path / "ranks.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{root}{os.pathsep}{root / 'tests'}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(root / "tests" / "rank_device_worker.py"), str(report)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(report.read_text())
    ranks = data["ranks"]
    assert [r["device"] for r in ranks] == ["cuda:0", "cuda:1"]
    assert [r["set_device"] for r in ranks] == [["cuda:0"], ["cuda:1"]]
    assert [r["part"] for r in ranks] == [[0, 2], [1, 2]]
    covered = [case for r in ranks for case in r["cases"]]
    assert sorted(covered) == sorted(data["cohort"]) and len(set(covered)) == len(covered)


@pytest.mark.parametrize("variable, value", [("RANK", "x"), ("WORLD_SIZE", "0"), ("RANK", "3")])
def test_a_bad_rank_variable_exits_2_naming_it(tmp_path, capsys, monkeypatch, variable, value):
    """The cohort verbs read RANK / WORLD_SIZE before anything else: a bad value is one line naming the variable."""
    from pipelines.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(variable, value)
    for verb in ("segment", "evaluate"):
        code = main([verb, "-m", "bundled", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--parts-from", "torchrun", "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and f"environment variable {variable}=" in err, (verb, err)
        assert not (tmp_path / "out").exists()
