"""Processes under ``torchrun``: this process's rank, its GPU, its part of a cohort, and the barrier.

One helper for ``train``, ``evaluate`` and ``segment``: :func:`process_rank` reads and checks
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`rank_device` gives each rank its own GPU
(``cuda:LOCAL_RANK``); :func:`resolve_parts` and :func:`shard` split a cohort between processes
(``torchrun`` or ``--num-parts``/``--part-id``, nnU-Net style).
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


def _whole(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        value = int(text.strip())
    except ValueError:
        raise InputError(f"environment variable {name}={text!r} must be a whole number >= 0 (torchrun sets it); unset it or fix it") from None
    if value < 0:
        raise InputError(f"environment variable {name}={text!r} must be a whole number >= 0 (torchrun sets it); unset it or fix it")
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


def resolve_parts(num_parts: int = 1, part_id: int = 0, rank: ProcessRank | None = None) -> tuple[int, int]:
    """``(num_parts, part_id)``: from ``torchrun`` (one part per rank) when it started this process, else as given."""
    rank = process_rank() if rank is None else rank
    if rank.distributed:
        return rank.world_size, rank.rank
    if num_parts < 1:
        raise InputError(f"num_parts={num_parts} must be at least 1, with part_id in [0, num_parts) picking this process's part",
                         arguments=("num_parts", "part_id"))  # fmt: skip
    if not 0 <= part_id < num_parts:
        raise InputError(f"part_id={part_id} must lie in [0, num_parts={num_parts})", arguments=("part_id", "num_parts"))
    return num_parts, part_id


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
