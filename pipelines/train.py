"""``anofpdm train``: classifier-free-guided diffusion training on a preprocessed store, or (``--recipe``)
a component of the comparison systems (AnoDDPM's unconditional DDPMs, the guidance classifier).

Runs as one process, or under ``torchrun --nproc-per-node N`` with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from anofpdm_monai.bundled import resolve_model_dir
from anofpdm_monai.config import PRESETS
from anofpdm_monai.logs import get_logger, log_to_file
from anofpdm_monai.provenance import write_run_record
from anofpdm_monai.training import RECIPES, TrainSettings, train
from pipelines.options import record_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--data", required=True, help="preprocessed store (anofpdm preprocess)")
    parser.add_argument("-o", "--output", required=True, help="model folder to write")
    parser.add_argument(
        "--recipe", choices=list(RECIPES), default="anofpdm",
        help="what to train: " + "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values())
        + ". A component goes into the main model's folder as -o MODEL/baselines/RECIPE (docs/baselines.md)",
    )  # fmt: skip
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny", help="network size (docs/training.md)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps in total (resume counts on)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the training slices (default 1)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split across processes")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (a resumed run keeps its checkpoint's)")
    parser.add_argument("--ema", type=float, default=0.9999, help="EMA decay of the weights used for inference")
    parser.add_argument("--p-uncond", type=float, default=0.1, help="probability of replacing the label by null")
    parser.add_argument(
        "--max-train-timestep",
        type=int,
        default=None,
        help="draw training timesteps below this (default: all T; AnoFPDM only visits t < N, so N is a valid speed-up)",
    )
    parser.add_argument("--checkpoint-every", type=int, default=500, help="write the model folder every this many steps")
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in -o (train_state.pt)")
    parser.add_argument(
        "--init-from", default=None,
        help="model folder (same preset and channels) whose weights start this run: fine-tuning (ignored with --resume)",
    )  # fmt: skip
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train; auto: cuda when available")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, data order, noise and label drops")


def run(args: argparse.Namespace) -> int:
    settings = TrainSettings(
        store=Path(args.data),
        model_dir=Path(args.output),
        preset=args.preset,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        ema=args.ema,
        p_uncond=args.p_uncond,
        max_train_timestep=args.max_train_timestep,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        init_from=None if args.init_from is None else resolve_model_dir(args.init_from),
        device=args.device,
        seed=args.seed,
        recipe=args.recipe,
    )

    def on_start(model_dir: Path) -> None:  # the folder is checked: record the run there and log into it
        log_to_file(model_dir, "train")
        write_run_record(model_dir, record_of("train", args, {"data": Path(args.data).resolve()}, settings.init_from))

    model_dir = train(settings, on_start)
    import torch.distributed as dist

    if dist.is_initialized():  # under torchrun: leave the group cleanly before the interpreter exits
        dist.barrier()
        dist.destroy_process_group()
    get_logger().info(f"model folder: {model_dir} (settings and steps done: training.json; this command: run.json)")
    return 0
