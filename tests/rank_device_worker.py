"""Worker of ``test_distributed.py``'s two-rank device test; run it under ``torchrun --nproc-per-node 2``.

CUDA is mocked (two GPUs visible, ``torch.cuda.set_device`` recorded). Each rank resolves its device the way
``segment``, ``evaluate`` and ``train`` do (:func:`anofpdm_monai.networks.resolve_device` of ``auto``) and its part
of a cohort (:func:`anofpdm_monai.distributed.resolve_parts` with ``parts_from="torchrun"``), gathers every rank's
answer over a gloo group, and rank 0 writes them to ``REPORT``.
"""

from __future__ import annotations

import json
import sys
from unittest import mock

import torch
import torch.distributed as dist

from anofpdm_monai.distributed import resolve_parts, shard
from anofpdm_monai.networks import resolve_device

CASES = [f"case{i:02d}" for i in range(7)]


def main(report: str) -> None:
    chosen: list[str] = []
    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(torch.cuda, "device_count", return_value=2), \
            mock.patch.object(torch.cuda, "set_device", side_effect=lambda d: chosen.append(str(d))):  # fmt: skip
        device = resolve_device("auto")
    num_parts, part_id = resolve_parts(parts_from="torchrun")
    mine = {"device": str(device), "set_device": chosen, "part": [part_id, num_parts], "cases": shard(CASES, num_parts, part_id)}
    dist.init_process_group("gloo")
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        with open(report, "w") as f:
            json.dump({"ranks": gathered, "cohort": CASES}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
