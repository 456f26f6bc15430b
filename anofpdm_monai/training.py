"""Classifier-free-guided DDPM training (ALGORITHM.md section 2), single process or DDP.

Data order, noise, timesteps and label drops are drawn from generators seeded by
``(seed, step, rank)``, so a run resumed from a checkpoint at step s continues exactly as the
uninterrupted run would have: same batches, same noise, same optimizer state.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from anofpdm_monai.config import DiffusionConfig, ModelConfig, network_preset
from anofpdm_monai.data import PreprocessedStore, SliceDataset
from anofpdm_monai.io import InputError, atomic_save_dataframe, atomic_torch_save, atomic_write_json, safe_torch_load
from anofpdm_monai.networks import build_network, build_scheduler, drop_labels, load_weights, resolve_device

LOG_COLUMNS = ["step", "loss", "lr", "wall_s"]
TRAINING_FILE = "training.json"  # the training settings and steps done, beside config.json


@dataclass
class TrainSettings:
    """Settings of one ``anofpdm train`` run (see ``pipelines/train.py`` for the flags)."""

    store: Path
    model_dir: Path
    preset: str = "tiny"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    lr: float = 1e-4
    ema: float = 0.9999
    p_uncond: float = 0.1
    max_train_timestep: int | None = None
    checkpoint_every: int = 500
    resume: bool = False
    init_from: Path | None = None
    device: str = "auto"
    seed: int = 0
    progress: bool = True


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if device.type == "cuda":
        # One GPU per process: without this every rank would run on cuda:0.
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())


def batch_indices(step: int, batch_size: int, num_items: int, seed: int, dist_info: DistInfo) -> np.ndarray:
    """This rank's share of the global batch at ``step``: positions ``[step*B, (step+1)*B)`` of a
    stream of seeded per-epoch permutations, split across ranks (a deterministic distributed sampler)."""
    start = step * batch_size
    positions = np.arange(start, start + batch_size)[dist_info.rank :: dist_info.world_size]
    epochs = positions // num_items
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_items)
        sel = epochs == epoch
        out[sel] = perm[positions[sel] % num_items]
    return out


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA of weights with the usual warm-up: effective decay min(decay, (1 + step) / (10 + step))."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - d)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def prepare_model_dir(settings: TrainSettings, config: ModelConfig) -> None:
    """Check the output folder: writable, and not holding a model unless resuming."""
    model_dir = settings.model_dir
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        probe = model_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise InputError(f"{model_dir}: output folder is not writable ({err.strerror}); choose another output folder") from err
    state = model_dir / "train_state.pt"
    if settings.resume and not state.is_file():
        raise InputError(f"{state}: resume needs a checkpoint, none found; drop resume to start a new run", arguments="resume")
    if not settings.resume and (model_dir / "model.pt").exists():
        raise InputError(f"{model_dir}: already holds a model; continue it with resume, or choose another output folder", arguments="resume")
    if settings.resume:
        saved = ModelConfig.load(model_dir / "config.json")
        if saved.network != config.network:
            raise InputError(
                f"{model_dir / 'config.json'}: the checkpoint is preset {saved.network.preset!r} with "
                f"{saved.network.in_channels} channels at {saved.network.image_size}px, this run asks for preset "
                f"{config.network.preset!r} with {config.network.in_channels} channels at {config.network.image_size}px"
            )


def warm_start(source: Path, network_cfg, networks: tuple[torch.nn.Module, ...]) -> None:
    """Start from the (EMA) weights of another model folder with the same network: fine-tuning.

    Only the weights come over; the optimizer, the step count and the data are this run's own.
    """
    source = Path(source)
    saved = ModelConfig.load(source / "config.json")
    if saved.network != network_cfg:
        raise InputError(
            f"{source / 'config.json'}: init_from needs the same network (preset {network_cfg.preset!r}, "
            f"{network_cfg.in_channels} channels at {network_cfg.image_size}px); this one is preset {saved.network.preset!r} "
            f"with {saved.network.in_channels} channels at {saved.network.image_size}px",
            arguments="init_from",
        )
    state = safe_torch_load(source / "model.pt")
    for network in networks:
        load_weights(network, state, source / "model.pt", network_cfg)


def check_settings(settings: TrainSettings) -> None:
    """Reject numeric settings that would crash or silently do nothing, naming the setting."""
    if settings.steps is not None and settings.steps < 1:
        raise InputError(f"steps={settings.steps} must be at least 1", arguments="steps")
    if settings.epochs is not None and not settings.epochs > 0:
        raise InputError(f"epochs={settings.epochs} must be positive", arguments="epochs")
    if settings.batch_size < 1:
        raise InputError(f"batch_size={settings.batch_size} must be at least 1", arguments="batch_size")
    if settings.checkpoint_every < 1:
        raise InputError(f"checkpoint_every={settings.checkpoint_every} must be at least 1", arguments="checkpoint_every")
    if not settings.lr > 0:
        raise InputError(f"lr={settings.lr} must be positive", arguments="lr")
    if not 0.0 <= settings.ema <= 1.0:
        raise InputError(f"ema={settings.ema} must lie in [0, 1]", arguments="ema")
    if not 0.0 <= settings.p_uncond <= 1.0:
        raise InputError(f"p_uncond={settings.p_uncond} must lie in [0, 1]", arguments="p_uncond")


def run_settings(settings: TrainSettings, *, lr: float, max_t: int, total_steps: int, start_step: int,
                 device: torch.device, world_size: int) -> dict:
    """What one training run (a start or a resume) ran with, as ``training.json`` records it.

    ``lr`` is the optimizer's (on resume: the checkpoint's, not the flag's); ``max_t`` the resolved
    ``max_train_timestep``; ``autocast`` the precision of the forward pass (bf16 on CUDA, else fp32).
    """
    return {
        "preset": settings.preset, "store": str(Path(settings.store).resolve()),
        "init_from": None if settings.init_from is None else str(Path(settings.init_from).resolve()),
        "lr": lr, "batch_size": settings.batch_size, "seed": settings.seed, "ema": settings.ema,
        "p_uncond": settings.p_uncond, "max_train_timestep": max_t, "total_steps": total_steps,
        "checkpoint_every": settings.checkpoint_every, "world_size": world_size, "device": str(device),
        "autocast": "bf16" if device.type == "cuda" else "fp32", "start_step": start_step,
    }  # fmt: skip


def earlier_runs(model_dir: Path, step: int) -> list[dict]:
    """The runs ``training.json`` records that the checkpoint at ``step`` continues (later ones are dropped,
    the last one ends at ``step``); [] when the file is missing or unreadable."""
    try:
        runs = json.loads((model_dir / TRAINING_FILE).read_text()).get("runs")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(runs, list):
        return []
    kept = [dict(r) for r in runs if isinstance(r, dict) and isinstance(r.get("start_step"), int) and r["start_step"] < step]
    if kept:
        kept[-1]["steps_done"] = step
    return kept


def training_json(run: dict, earlier: list[dict], step: int) -> dict:
    """``training.json``: this run's settings and the steps done at the top, every run (start, resumes) in ``runs``."""
    return {"steps_done": step, **run, "runs": [*earlier, {**run, "steps_done": step}]}


def train(settings: TrainSettings, on_start: Callable[[Path], None] | None = None) -> Path:
    """Train (or resume) a model folder; returns its path. See the module docstring.

    Args:
        settings: the run's settings.
        on_start: called with the model folder once it is checked, before the first step, on the main
            process only (the CLI writes its run record and opens its log file there).
    """
    check_settings(settings)
    device = resolve_device(settings.device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = init_distributed(device)
    store = PreprocessedStore(settings.store)
    dataset = SliceDataset(store, "train")
    network_cfg = network_preset(settings.preset, store.num_channels)
    if store.config.image_size != network_cfg.image_size:
        raise InputError(
            f"{settings.store}: slices are {store.config.image_size}px but preset {settings.preset!r} takes "
            f"{network_cfg.image_size}px; rerun anofpdm preprocess with --size {network_cfg.image_size}"
        )
    config = ModelConfig(network=network_cfg, diffusion=DiffusionConfig(), preprocess=store.config)
    num_t = config.diffusion.num_train_timesteps
    max_t = settings.max_train_timestep if settings.max_train_timestep is not None else num_t
    if not 1 <= max_t <= num_t:
        raise InputError(f"max_train_timestep={max_t} must lie in [1, {num_t}]", arguments="max_train_timestep")
    if settings.batch_size % dist_info.world_size:
        raise InputError(f"batch_size={settings.batch_size} must be divisible by the {dist_info.world_size} processes", arguments="batch_size")
    total_steps = settings.steps
    if total_steps is None:
        epochs = settings.epochs if settings.epochs is not None else 1.0
        total_steps = max(1, math.ceil(epochs * len(dataset) / settings.batch_size))
    error: InputError | None = None
    if dist_info.is_main:
        try:
            prepare_model_dir(settings, config)
        except (InputError, FileNotFoundError, ValueError) as err:
            error = err if isinstance(err, InputError) else InputError(str(err))
    if dist_info.world_size > 1:
        # Every rank learns rank 0's verdict; otherwise the others would wait forever at the next collective.
        message = [(str(error), error.arguments) if error is not None else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and error is None:
            error = InputError(message[0][0], arguments=message[0][1])
    if error is not None:
        raise error
    if dist_info.is_main and on_start is not None:
        on_start(settings.model_dir)

    torch.manual_seed(settings.seed)
    model = build_network(network_cfg).to(device)
    ema = build_network(network_cfg).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    scheduler = build_scheduler(config.diffusion)
    step, log_rows = 0, []
    if settings.init_from is not None and not settings.resume:
        warm_start(settings.init_from, network_cfg, (model, ema))
    if settings.resume:
        state = safe_torch_load(settings.model_dir / "train_state.pt", map_location=device)
        load_weights(model, state["model"], settings.model_dir / "train_state.pt", network_cfg)
        load_weights(ema, state["ema"], settings.model_dir / "train_state.pt", network_cfg)
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        log_path = settings.model_dir / "log.csv"
        if log_path.is_file():
            log_rows = pd.read_csv(log_path).query("step <= @step").to_dict("records")
    run = run_settings(settings, lr=optimizer.param_groups[0]["lr"], max_t=max_t, total_steps=total_steps,
                       start_step=step, device=device, world_size=dist_info.world_size)  # fmt: skip
    earlier = earlier_runs(settings.model_dir, step) if settings.resume else []
    wrapped = model
    if dist_info.world_size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    local_batch = settings.batch_size // dist_info.world_size
    elapsed0 = log_rows[-1]["wall_s"] if log_rows else 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (settings.progress and dist_info.is_main))
    model.train()
    while step < total_steps:
        idx = batch_indices(step, settings.batch_size, len(dataset), settings.seed, dist_info)
        images = torch.stack([dataset[int(i)][0] for i in idx]).to(device)
        labels = torch.as_tensor(dataset.labels[idx], dtype=torch.long, device=device)
        gen = torch.Generator(device="cpu").manual_seed(hash((settings.seed, step, dist_info.rank)) % (2**63))
        noise = torch.randn(images.shape, generator=gen).to(device)
        timesteps = torch.randint(0, max_t, (local_batch,), generator=gen).to(device)
        labels = drop_labels(labels.cpu(), settings.p_uncond, gen).to(device)
        noisy = scheduler.add_noise(original_samples=images, noise=noise, timesteps=timesteps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = wrapped(noisy, timesteps=timesteps, class_labels=labels)
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, settings.ema, step)
        step += 1
        loss_value = float(loss.detach())
        if dist_info.world_size > 1:
            loss_t = torch.tensor([loss_value], device=device)
            dist.all_reduce(loss_t)
            loss_value = float(loss_t) / dist_info.world_size
        log_rows.append({"step": step, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"], "wall_s": elapsed0 + time.perf_counter() - t0})
        bar.set_postfix(loss=f"{loss_value:.4f}")
        bar.update(1)
        if dist_info.is_main and (step % settings.checkpoint_every == 0 or step == total_steps):
            save_checkpoint(settings.model_dir, config, model, ema, optimizer, step, log_rows, training_json(run, earlier, step))
    bar.close()
    if dist_info.world_size > 1:
        dist.barrier()
    return settings.model_dir


def save_checkpoint(
    model_dir: Path,
    config: ModelConfig,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    log_rows: list[dict],
    training: dict | None = None,
) -> None:
    """Write config.json, model.pt (EMA weights), training.json (when ``training`` is given), log.csv and
    train_state.pt, each atomically.

    train_state.pt comes last: whenever it exists, the files it is resumed with hold its step or a later one
    (a kill between two of these writes loses no log rows; resume drops rows past the checkpoint's step).
    """
    config.save(model_dir / "config.json")
    atomic_torch_save({k: v.detach().cpu() for k, v in ema.state_dict().items()}, model_dir / "model.pt")
    if training is not None:
        atomic_write_json(model_dir / TRAINING_FILE, training)
    atomic_save_dataframe(pd.DataFrame(log_rows, columns=LOG_COLUMNS), model_dir / "log.csv")
    atomic_torch_save(
        {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "step": step,
        },
        model_dir / "train_state.pt",
    )
