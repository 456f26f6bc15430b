"""Processes under ``torchrun``: this process's rank, its GPU, its part of a cohort, and the barrier.

One helper for ``train``, ``evaluate`` and ``segment``: :func:`process_rank` reads and checks
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`rank_device` gives each rank its own GPU
(``cuda:LOCAL_RANK``); :func:`resolve_parts` and :func:`shard` split a cohort between processes:
the parts come from the arguments (``--num-parts``/``--part-id``, nnU-Net style), from ``torchrun`` (one part per
rank) or from a SLURM array job (:func:`slurm_part`: one part per array task); under ``torchrun`` a part given by
the arguments or by SLURM is split again among the ranks (a SLURM array of multi-GPU jobs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from anofpdm_monai.io import InputError

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SLURM_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP",
                   "SLURM_ARRAY_TASK_COUNT")  # fmt: skip
PARTS_FROM = ("args", "torchrun", "slurm")  # where a process's part of the cohort comes from


@dataclass(frozen=True)
class ProcessRank:
    """Where this process stands among those ``torchrun`` started (a lone process: rank 0 of 1).

    Attributes:
        rank: global rank, in [0, world_size).
        world_size: number of processes.
        local_rank: rank on this machine (picks the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _whole(environ: Mapping[str, str], name: str, default: int | None, setter: str = "torchrun") -> int:
    text = environ.get(name)
    if text is None or text.strip() == "":
        if default is None:
            raise InputError(f"environment variable {name} is not set ({setter} sets it); run this under {setter}, or take the parts from the arguments")
        return default
    try:
        value = int(text.strip())
    except ValueError:
        raise InputError(f"environment variable {name}={text!r} must be a whole number >= 0 ({setter} sets it); unset it or fix it") from None
    if value < 0:
        raise InputError(f"environment variable {name}={text!r} must be a whole number >= 0 ({setter} sets it); unset it or fix it")
    return value


def process_rank(environ: Mapping[str, str] | None = None) -> ProcessRank:
    """This process's :class:`ProcessRank` from ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (unset: 0, 1, RANK).

    Raises:
        InputError: a variable is not a whole number >= 0, ``WORLD_SIZE`` is 0, or ``RANK >= WORLD_SIZE``
            (the message names the variable).
    """
    environ = os.environ if environ is None else environ
    world = _whole(environ, "WORLD_SIZE", 1)
    if world < 1:
        raise InputError(f"environment variable WORLD_SIZE={environ.get('WORLD_SIZE')!r} must be at least 1; unset it or fix it")
    rank = _whole(environ, "RANK", 0)
    if rank >= world:
        raise InputError(f"environment variable RANK={rank} must be below WORLD_SIZE={world}; unset both or fix them")
    return ProcessRank(rank, world, _whole(environ, "LOCAL_RANK", rank))


def rank_device(device: torch.device, rank: ProcessRank | None = None) -> torch.device:
    """``device`` for this rank: under ``torchrun`` a CUDA device without an index becomes ``cuda:LOCAL_RANK``
    (without this every rank runs on cuda:0), and becomes the current CUDA device.

    Raises:
        InputError: ``LOCAL_RANK`` names a GPU this machine does not have.
    """
    rank = process_rank() if rank is None else rank
    if device.type != "cuda" or not rank.distributed or device.index is not None:
        return device
    count = torch.cuda.device_count()
    if rank.local_rank >= count:
        raise InputError(f"environment variable LOCAL_RANK={rank.local_rank} names a GPU this machine does not have ({count} visible); start at most {count} processes per machine")
    device = torch.device("cuda", rank.local_rank)
    torch.cuda.set_device(device)
    return device


def slurm_part(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(num_parts, part_id)`` of this SLURM array task: part ``(ID - MIN) / STEP`` of ``COUNT``.

    Read from ``SLURM_ARRAY_TASK_ID``, ``_MIN``, ``_MAX``, ``_STEP`` (unset: 1) and ``_COUNT``, which ``sbatch --array``
    sets. Only an evenly spaced array (``--array=0-99``, ``1-199:2``, with or without a ``%`` limit) numbers its
    tasks 0 .. COUNT - 1 this way; a list with gaps (``--array=0,3,7``) is refused, since its parts would not cover
    the cohort.

    Raises:
        InputError: a variable is unset or not a whole number, or the array is not evenly spaced (one line naming
            the variable).
    """
    environ = os.environ if environ is None else environ
    task, first, last = (_whole(environ, f"SLURM_ARRAY_TASK_{v}", None, "an sbatch array job") for v in ("ID", "MIN", "MAX"))
    count = _whole(environ, "SLURM_ARRAY_TASK_COUNT", None, "an sbatch array job")
    step = _whole(environ, "SLURM_ARRAY_TASK_STEP", 1, "an sbatch array job")
    if step < 1:
        raise InputError(f"environment variable SLURM_ARRAY_TASK_STEP={step} must be at least 1 (an sbatch array job sets it); unset it or fix it")
    if not first <= task <= last or (task - first) % step:
        raise InputError(f"environment variable SLURM_ARRAY_TASK_ID={task} is not a task of the array {first}-{last}:{step} "
                         "(SLURM_ARRAY_TASK_MIN, _MAX, _STEP); unset them or fix them")  # fmt: skip
    if (last - first) // step + 1 != count:
        raise InputError(
            f"environment variable SLURM_ARRAY_TASK_COUNT={count} does not fit the array {first}-{last}:{step}, whose tasks "
            f"would number {(last - first) // step + 1}: an array with gaps (e.g. the list 0,3,7) leaves parts of the cohort "
            "out; submit an evenly spaced array (0-N or START-END:STEP, a % limit is fine)"
        )  # fmt: skip
    return count, (task - first) // step


def resolve_parts(num_parts: int = 1, part_id: int = 0, rank: ProcessRank | None = None, parts_from: str = "args",
                  environ: Mapping[str, str] | None = None) -> tuple[int, int]:  # fmt: skip
    """``(num_parts, part_id)`` of this process: which of the cohort's round-robin parts (:func:`shard`) it runs.

    Args:
        num_parts, part_id: the part given as arguments (``parts_from="args"``; else they must stay 1 and 0).
        rank: this process among those ``torchrun`` started (default: read from the environment).
        parts_from: ``args``; ``torchrun`` (one part per rank; the process must have been started by torchrun);
            ``slurm`` (one part per array task, :func:`slurm_part`).
        environ: the environment (default ``os.environ``).

    Under ``torchrun`` with ``W`` ranks, part ``p`` of ``P`` (from the arguments or SLURM) is split again among the
    ranks: rank ``r`` runs part ``p + P * r`` of ``P * W``, the ``r``-th of the ``W`` round-robin parts of part ``p``,
    so the ranks of all tasks cover the cohort exactly once.

    Raises:
        InputError: a bad part or ``parts_from`` (naming the argument), or a bad environment variable (naming it).
    """
    environ = os.environ if environ is None else environ
    rank = process_rank(environ) if rank is None else rank
    if parts_from not in PARTS_FROM:
        raise InputError(f"parts_from={parts_from!r}: choose one of {', '.join(PARTS_FROM)}", arguments="parts_from")
    if parts_from != "args" and (num_parts, part_id) != (1, 0):
        raise InputError(f"num_parts={num_parts} and part_id={part_id} are given while the parts come from {parts_from} "
                         f"(parts_from={parts_from}); give one or the other", arguments=("num_parts", "part_id", "parts_from"))  # fmt: skip
    if parts_from == "torchrun" and environ.get("WORLD_SIZE", "").strip() == "":
        raise InputError("environment variable WORLD_SIZE is not set (torchrun sets it): parts_from=torchrun needs a process "
                         "started by torchrun; run under torchrun, or take the parts from the arguments", arguments="parts_from")  # fmt: skip
    if parts_from == "slurm":
        num_parts, part_id = slurm_part(environ)
    if num_parts < 1:
        raise InputError(f"num_parts={num_parts} must be at least 1, with part_id in [0, num_parts) picking this process's part",
                         arguments=("num_parts", "part_id"))  # fmt: skip
    if not 0 <= part_id < num_parts:
        raise InputError(f"part_id={part_id} must lie in [0, num_parts={num_parts})", arguments=("part_id", "num_parts"))
    return num_parts * rank.world_size, part_id + num_parts * rank.rank


def shard(items: Sequence[Any], num_parts: int, part_id: int) -> list[Any]:
    """Part ``part_id`` of ``num_parts`` round-robin parts of ``items`` (the parts are disjoint and cover all)."""
    return list(items[part_id::num_parts])


def barrier(rank: ProcessRank) -> None:
    """Wait until every rank got here (joins a gloo group when none is initialised; a no-op for one process).

    The timeout is 24 h: ranks meet only once all their cases are done, and parts can be very uneven.
    """
    if not rank.distributed:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
    dist.barrier()
