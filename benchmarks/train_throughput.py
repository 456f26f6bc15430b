"""Training throughput: optimizer steps per second of the tiny preset (and, with CUDA, the paper preset
in bf16) on a synthetic in-memory batch, with the peak memory.

One step is what ``anofpdm_monai.training.train`` does per step, minus data loading: draw noise,
timesteps and label drops, noise the batch with the DDPM scheduler, predict under bf16 autocast on
CUDA, MSE, backward, AdamW, EMA update. ``--warmup`` steps run first and are not timed.

    python benchmarks/train_throughput.py                       # tiny (+ paper when CUDA is available)
    python benchmarks/train_throughput.py --presets paper --batch-size 64 --steps 50
    python benchmarks/train_throughput.py --image-sizes 64,96,128   # one preset's cost at other slice sizes

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU (reset per preset) and the process's
peak resident set size (``resource.getrusage``, cumulative over the presets run so far) on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

from anofpdm_monai.config import DiffusionConfig, network_preset  # noqa: E402
from anofpdm_monai.networks import build_network, build_scheduler, drop_labels, resolve_device  # noqa: E402
from anofpdm_monai.training import update_ema  # noqa: E402


def measure(preset: str, device: torch.device, batch_size: int, steps: int, warmup: int, channels: int,
            max_t: int, image_size: int | None = None, seed: int = 0) -> dict:  # fmt: skip
    """Time ``steps`` training steps of ``preset`` (at ``image_size`` px if given) after ``warmup`` untimed ones."""
    cfg = network_preset(preset, channels)
    if image_size is not None:
        cfg = dataclasses.replace(cfg, image_size=image_size)
    torch.manual_seed(seed)
    model = build_network(cfg).to(device).train()
    ema = build_network(cfg).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = build_scheduler(DiffusionConfig())
    gen = torch.Generator().manual_seed(seed)
    images = (torch.rand(batch_size, channels, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1).to(device)
    labels = torch.randint(0, 2, (batch_size,), generator=gen)
    use_bf16 = device.type == "cuda"

    def step(i: int) -> float:
        noise = torch.randn(images.shape, generator=gen).to(device)
        timesteps = torch.randint(0, max_t, (batch_size,), generator=gen).to(device)
        dropped = drop_labels(labels, 0.1, gen).to(device)
        noisy = scheduler.add_noise(original_samples=images, noise=noise, timesteps=timesteps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = model(noisy, timesteps=timesteps, class_labels=dropped)
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, 0.9999, i)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss = step(i)
    float(loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the optimizer and EMA updates of the last step too
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        memory_kind = "cuda max_memory_allocated"
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        memory_kind = "process max RSS"
    return {
        "preset": preset,
        "device": str(device),
        "dtype": "bf16 autocast" if use_bf16 else "fp32",
        "image_size": cfg.image_size,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": batch_size,
        "steps": steps,
        "steps_per_s": steps / seconds,
        "samples_per_s": steps * batch_size / seconds,
        "peak_mem_MiB": peak_mib,
        "memory": memory_kind,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=None, help="comma-separated (default: tiny, plus paper when CUDA is available)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per preset")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--channels", type=int, default=4, help="C (BraTS: 4, ATLAS: 1)")
    parser.add_argument("--max-train-timestep", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--image-sizes", default=None, help="comma-separated slice sizes to time each preset at "
                        "(default: the preset's own); the ratio between them is the cost of a model at another size")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    presets = args.presets.split(",") if args.presets else ["tiny"] + (["paper"] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    sizes = [int(s) for s in args.image_sizes.split(",")] if args.image_sizes else [None]
    for preset in presets:
        for size in sizes:
            rows.append(measure(preset, device, args.batch_size, args.steps, args.warmup, args.channels,
                                args.max_train_timestep, size))  # fmt: skip
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, ["preset", "device", "dtype", "image_size", "params_M", "batch", "steps_per_s", "samples_per_s", "peak_mem_MiB"])
    write_json(args.out, {"benchmark": "train_throughput", "args": vars(args), "results": rows})


if __name__ == "__main__":
    main()
