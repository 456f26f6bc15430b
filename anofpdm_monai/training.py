"""Training, single process or DDP: AnoFPDM's classifier-free-guided DDPM (ALGORITHM.md section 2) and
the components the comparison systems of the paper's Table 1 need (:data:`RECIPES`).

Data order, noise, timesteps and label drops are drawn from generators seeded by
``(seed, step, rank)``, so a run resumed from a checkpoint at step s continues exactly as the
uninterrupted run would have: same batches, same noise, same optimizer state.
"""

from __future__ import annotations

import json
import math
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

from anofpdm_monai.config import TRAINING_SETTINGS_FILE, DiffusionConfig, ModelConfig, network_preset
from anofpdm_monai.data import PreprocessedStore, SliceDataset
from anofpdm_monai.distributed import ProcessRank, process_rank
from anofpdm_monai.io import InputError, atomic_save_dataframe, atomic_torch_save, atomic_write_json, safe_torch_load
from anofpdm_monai.networks import (
    HEALTHY,
    NULL,
    build_classifier,
    build_network,
    build_scheduler,
    drop_labels,
    load_weights,
    resolve_device,
)
from anofpdm_monai.noise import SIMPLEX_FREQUENCY, SIMPLEX_OCTAVES, SIMPLEX_PERSISTENCE, draw_noise

LOG_COLUMNS = ["step", "loss", "lr", "wall_s"]
COMPONENT_FILE = "component.json"  # in a component's folder: which recipe made it (MODEL/baselines/NAME/)


@dataclass(frozen=True)
class Recipe:
    """What one kind of training run learns.

    Attributes:
        name: the name ``--recipe`` takes.
        network: ``"unet"`` (the epsilon-predicting UNet, :func:`build_network`) or ``"classifier"``
            (the noise-conditional classifier, :func:`build_classifier`).
        slices: ``"all"`` training slices or ``"healthy"`` ones only (image label healthy).
        labels: ``"cfg"`` (classifier-free training: labels dropped to null with ``p_uncond``), ``"null"``
            (an unconditional model: always the null label) or ``"target"`` (the labels are what a
            classifier learns).
        noise: ``"gaussian"`` or ``"simplex"`` (:mod:`anofpdm_monai.noise`).
        description: one line for ``--help`` and the docs.
    """

    name: str
    network: str
    slices: str
    labels: str
    noise: str
    description: str

    @property
    def is_component(self) -> bool:
        """Trains a component of another model (saved in ``MODEL/baselines/NAME/``), not an AnoFPDM model."""
        return self.name != "anofpdm"

    def component_record(self) -> dict:
        """``component.json``: the recipe and, for simplex noise, its published parameters."""
        record = {"recipe": self.name, "network": self.network, "slices": self.slices, "labels": self.labels, "noise": self.noise}
        if self.noise == "simplex":
            record["simplex"] = {"octaves": SIMPLEX_OCTAVES, "persistence": SIMPLEX_PERSISTENCE, "frequency": SIMPLEX_FREQUENCY}
        return record


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("anofpdm", "unet", "all", "cfg", "gaussian", "AnoFPDM's classifier-free-guided DDPM on every slice (default)"),
        Recipe("anoddpm-gaussian", "unet", "healthy", "null", "gaussian", "AnoDDPM's unconditional DDPM on healthy slices, Gaussian noise"),
        Recipe("anoddpm-simplex", "unet", "healthy", "null", "simplex", "AnoDDPM's unconditional DDPM on healthy slices, simplex noise"),
        Recipe("classifier", "classifier", "all", "target", "gaussian",
               "the noise-conditional healthy/unhealthy classifier of classifier guidance (Wolleb et al.)"),
    )
}  # fmt: skip


def get_recipe(name: str) -> Recipe:
    """The recipe ``name``; an InputError naming the argument otherwise."""
    if name not in RECIPES:
        raise InputError(f"recipe={name!r}: choose one of {', '.join(RECIPES)}", arguments="recipe")
    return RECIPES[name]


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
    recipe: str = "anofpdm"


def init_distributed(device: torch.device) -> ProcessRank:
    """This process's rank (:func:`anofpdm_monai.distributed.process_rank`); under torchrun the process group is
    joined first (NCCL on GPUs, gloo on CPU)."""
    rank = process_rank()
    if not rank.distributed:
        return rank
    if device.type == "cuda":
        # One GPU per process: without this every rank would run on cuda:0.
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank


def batch_indices(step: int, batch_size: int, num_items: int, seed: int, dist_info: ProcessRank) -> np.ndarray:
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
        saved_recipe = saved_recipe_name(model_dir)
        if saved_recipe != settings.recipe:
            raise InputError(
                f"{model_dir}: the checkpoint was trained with recipe {saved_recipe!r}, this run asks for {settings.recipe!r}; "
                "resume with the same recipe, or choose another output folder",
                arguments="recipe",
            )
        saved = ModelConfig.load(model_dir / "config.json")
        if saved.network != config.network:
            raise InputError(
                f"{model_dir / 'config.json'}: the checkpoint is preset {saved.network.preset!r} with "
                f"{saved.network.in_channels} channels at {saved.network.image_size}px, this run asks for preset "
                f"{config.network.preset!r} with {config.network.in_channels} channels at {config.network.image_size}px"
            )


def saved_recipe_name(model_dir: Path) -> str:
    """The recipe a model folder was trained with: its ``component.json``'s, else ``"anofpdm"``."""
    path = Path(model_dir) / COMPONENT_FILE
    if not path.is_file():
        return "anofpdm"
    from anofpdm_monai.io import read_json

    record = read_json(path, "not a valid component record; retrain the component into a new folder")
    name = record.get("recipe") if isinstance(record, dict) else None
    if name not in RECIPES:
        raise InputError(f"{path}: recipe {name!r} is unknown (known: {', '.join(RECIPES)}); retrain the component into a new folder")
    return name


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
    recipe = get_recipe(settings.recipe)
    if recipe.network == "classifier" and settings.init_from is not None:
        raise InputError("init_from: the classifier is not the diffusion UNet and cannot start from a model's weights; "
                         "train it from scratch", arguments="init_from")  # fmt: skip


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
        "autocast": "bf16" if device.type == "cuda" else "fp32", "start_step": start_step, "recipe": settings.recipe,
    }  # fmt: skip


def earlier_runs(model_dir: Path, step: int) -> list[dict]:
    """The runs ``training.json`` records that the checkpoint at ``step`` continues (later ones are dropped,
    the last one ends at ``step``); [] when the file is missing or unreadable."""
    try:
        runs = json.loads((model_dir / TRAINING_SETTINGS_FILE).read_text()).get("runs")
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
    recipe = get_recipe(settings.recipe)
    device = resolve_device(settings.device)  # cuda:LOCAL_RANK per rank under torchrun
    dist_info = init_distributed(device)
    store = PreprocessedStore(settings.store)
    dataset = SliceDataset(store, "train")
    pool = recipe_slices(dataset, recipe, settings.store)
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
        total_steps = max(1, math.ceil(epochs * len(pool) / settings.batch_size))
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
    build = build_classifier if recipe.network == "classifier" else build_network
    model = build(network_cfg).to(device)
    ema = build(network_cfg).to(device)
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

    class_weights = balanced_class_weights(dataset.labels[pool]).to(device) if recipe.labels == "target" else None
    elapsed0 = log_rows[-1]["wall_s"] if log_rows else 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (settings.progress and dist_info.is_main))
    model.train()
    while step < total_steps:
        idx = pool[batch_indices(step, settings.batch_size, len(pool), settings.seed, dist_info)]
        images = torch.stack([dataset[int(i)][0] for i in idx]).to(device)
        labels = torch.as_tensor(dataset.labels[idx], dtype=torch.long, device=device)
        step_seed = hash((settings.seed, step, dist_info.rank)) % (2**63)
        gen = torch.Generator(device="cpu").manual_seed(step_seed)
        torch.manual_seed(step_seed)  # what draws from the global generator (the classifier head's dropout) resumes exactly too
        loss = recipe_loss(recipe, wrapped, scheduler, images, labels, gen, max_t=max_t, p_uncond=settings.p_uncond,
                           class_weights=class_weights)  # fmt: skip
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
        check_finite_step(loss_value, model, step, settings.model_dir, optimizer.param_groups[0]["lr"])
        log_rows.append({"step": step, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"], "wall_s": elapsed0 + time.perf_counter() - t0})
        bar.set_postfix(loss=f"{loss_value:.4f}")
        bar.update(1)
        if dist_info.is_main and (step % settings.checkpoint_every == 0 or step == total_steps):
            save_checkpoint(settings.model_dir, config, model, ema, optimizer, step, log_rows, training_json(run, earlier, step),
                            recipe.component_record() if recipe.is_component else None)  # fmt: skip
    bar.close()
    if dist_info.world_size > 1:
        dist.barrier()
    return settings.model_dir


def recipe_slices(dataset: SliceDataset, recipe: Recipe, store: Path) -> np.ndarray:
    """(M,) indices into ``dataset`` of the slices ``recipe`` trains on; an InputError when there are none."""
    if recipe.slices == "all":
        return np.arange(len(dataset))
    pool = np.flatnonzero(dataset.labels == HEALTHY)
    if pool.size == 0:
        raise InputError(f"{store}: the training split holds no healthy slice, which recipe {recipe.name!r} trains on; "
                         "preprocess a cohort with healthy slices")  # fmt: skip
    return pool


def balanced_class_weights(labels: np.ndarray) -> torch.Tensor:
    """(2,) cross-entropy weights that give both classes (HEALTHY, UNHEALTHY) equal total weight."""
    counts = np.bincount(labels.astype(np.int64), minlength=2)[:2].astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (2.0 * np.maximum(counts, 1.0)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)


def recipe_loss(
    recipe: Recipe,
    network: torch.nn.Module,
    scheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    *,
    max_t: int,
    p_uncond: float,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """One batch's training loss under ``recipe``.

    The noise (Gaussian or simplex), the timesteps (uniform below ``max_t``) and the label drops are drawn
    from ``generator`` in that order. The UNet recipes regress the noise (MSE); the classifier learns
    the image-level label of the noised slice (cross-entropy with ``class_weights``).

    Args:
        images: (B, C, S, S) clean slices in [-1, 1], on the training device.
        labels: (B,) long image-level labels (HEALTHY / UNHEALTHY).
    """
    device = images.device
    noise = draw_noise(recipe.noise, images.shape, generator).to(device)
    timesteps = torch.randint(0, max_t, (images.shape[0],), generator=generator).to(device)
    if recipe.labels == "cfg":
        labels = drop_labels(labels.cpu(), p_uncond, generator).to(device)
    elif recipe.labels == "null":
        labels = torch.full_like(labels, NULL)
    noisy = scheduler.add_noise(original_samples=images, noise=noise, timesteps=timesteps)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if recipe.network == "classifier":
            logits = network(noisy, timesteps=timesteps)
        else:
            pred = network(noisy, timesteps=timesteps, class_labels=labels)
    if recipe.network == "classifier":
        return F.cross_entropy(logits.float(), labels, weight=class_weights)
    return F.mse_loss(pred.float(), noise)


def check_finite_step(loss: float, model: torch.nn.Module, step: int, model_dir: Path, lr: float) -> None:
    """Stop training when the loss or a weight is NaN or infinite: every later step and checkpoint would be too.

    The last checkpoint (written before this step, when it was finite) stays as it is.

    Raises:
        InputError: one line naming the step, what is not finite, the learning rate and what to do.
    """
    what = None if math.isfinite(loss) else f"the loss is {loss}"
    if what is None and not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        what = "the weights hold NaN or infinite values"
    if what is not None:
        kept = model_dir / "model.pt"
        saved = f"the last checkpoint ({kept}) is kept as it was" if kept.is_file() else "no checkpoint was saved"
        raise InputError(
            f"training diverged at step {step}: {what} (learning rate {lr:g}); {saved}; train again with a lower lr "
            "(a resumed run keeps its checkpoint's learning rate)", arguments="lr"
        )


def save_checkpoint(
    model_dir: Path,
    config: ModelConfig,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    log_rows: list[dict],
    training: dict | None = None,
    component: dict | None = None,
) -> None:
    """Write config.json, component.json (for a component, ``component``), model.pt (EMA weights),
    training.json (when ``training`` is given), log.csv and train_state.pt, each atomically.

    train_state.pt comes last: whenever it exists, the files it is resumed with hold its step or a later one
    (a kill between two of these writes loses no log rows; resume drops rows past the checkpoint's step).
    """
    config.save(model_dir / "config.json")
    if component is not None:
        atomic_write_json(model_dir / COMPONENT_FILE, component)
    atomic_torch_save({k: v.detach().cpu() for k, v in ema.state_dict().items()}, model_dir / "model.pt")
    if training is not None:
        atomic_write_json(model_dir / TRAINING_SETTINGS_FILE, training)
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
