"""Worker of ``test_training.py``'s two-process test; run it under ``torchrun --nproc-per-node 2``.

Each rank trains through :func:`anofpdm_monai.training.train` (gloo on CPU), then writes
``REPORT_DIR/rank<R>.json`` with a hash of its final model and EMA weights and the steps at
which it wrote a checkpoint. A second ``train`` call on the finished folder without
``--resume`` must fail on every rank (rank 0 finds the model; the others must hear of it
instead of waiting forever).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from anofpdm_monai import training
from anofpdm_monai.config import PRESETS
from anofpdm_monai.io import InputError


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names and exact bytes of a state dict (test_training.py imports it)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("model_dir")
    parser.add_argument("report_dir")
    parser.add_argument("--preset-json", required=True, help="a test-only preset, registered as 'micro'")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    PRESETS["micro"] = json.loads(args.preset_json)

    built: list[torch.nn.Module] = []
    saves: list[int] = []
    build_network, save_checkpoint = training.build_network, training.save_checkpoint

    def recording_build(cfg):
        network = build_network(cfg)
        built.append(network)
        return network

    def recording_save(model_dir, config, model, ema, optimizer, step, *rest):
        saves.append(int(step))
        save_checkpoint(model_dir, config, model, ema, optimizer, step, *rest)

    training.build_network = recording_build
    training.save_checkpoint = recording_save

    settings = training.TrainSettings(
        store=Path(args.store), model_dir=Path(args.model_dir), preset="micro", steps=args.steps, batch_size=4,
        lr=1e-3, ema=0.9, checkpoint_every=2, device="cpu", seed=3, progress=False,
    )  # fmt: skip
    training.train(settings)
    rank = dist.get_rank()
    model, ema = built
    report = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "model": state_hash(model.state_dict()),
        "ema": state_hash(ema.state_dict()),
        "saves": saves,
    }
    try:
        training.train(settings)  # the folder now holds a model and --resume is not given
        report["second_run"] = "no error"
    except InputError as err:
        report["second_run"] = str(err)
        report["second_run_arguments"] = list(err.arguments)  # rank 1 hears them from rank 0, for the CLI's flags
    report_dir = Path(args.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()  # no rank tears the group down while the other still talks to it (gloo aborts then)
    dist.destroy_process_group()
    # gloo's worker threads can abort in C++ destructors at interpreter shutdown (std::terminate, seen
    # intermittently on CPU); everything this test checks is on disk by now, so skip those destructors.
    os._exit(0)


if __name__ == "__main__":
    main()
