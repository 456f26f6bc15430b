"""The one-call-per-step forward process against the reference implementation's call pattern.

For the same model and slices, compares ``run_forward_process`` (one batched cond + null call per
visited step, streamed statistics) with a straightforward loop in the reference's pattern: a
separate unconditional call for the DDIM inversion, then separate conditional and unconditional
calls for the guided and unguided predictions, every step's predictions kept in lists and the
statistics computed at the end. Reports network calls, seconds per slice and peak memory, and
checks that both give the same maps.

    python benchmarks/forward_process.py --slices 8 --strides 1,2,5,10
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

from anofpdm_monai.config import DiffusionConfig, network_preset  # noqa: E402
from anofpdm_monai.forward_process import predicted_x0, run_forward_process, visited_timesteps  # noqa: E402
from anofpdm_monai.networks import HEALTHY, NULL, NoisePredictor, build_network, build_scheduler  # noqa: E402


class CountingPredictor:
    """Wraps a predictor and counts its calls."""

    def __init__(self, predictor) -> None:
        self.predictor, self.calls = predictor, 0

    def __call__(self, x, t, labels):
        self.calls += 1
        return self.predictor(x, t, labels)


def reference_pattern(predict, x0, abar, w, steps, stride, map_channels, generator):
    """Reference-style DDIM forward process: 3 calls per step, every step's predictions kept."""
    b = x0.shape[0]
    def call(x, t, label):
        return predict(x, torch.full((b,), t, dtype=torch.long), torch.full((b,), label, dtype=torch.long))
    hgps, ugps = [], []
    x_t, prev = None, None
    for t in visited_timesteps(steps, stride):
        a = float(abar[t])
        if prev is None:
            x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=generator)
        else:
            x_prev, t_prev = prev
            ap = float(abar[t_prev])
            xu_prev = predicted_x0(x_prev, call(x_prev, t_prev, NULL), ap)  # the extra inversion call
            eps = (x_prev / math.sqrt(ap) - xu_prev) / math.sqrt(1.0 / ap - 1.0)
            x_t = math.sqrt(a) * xu_prev + math.sqrt(1 - a) * eps
        eps_c, eps_u = call(x_t, t, HEALTHY), call(x_t, t, NULL)
        hgps.append(predicted_x0(x_t, (1 + w) * eps_c - w * eps_u, a))
        ugps.append(predicted_x0(x_t, eps_u, a))
        prev = (x_t, t)
    hgp, ugp = torch.stack(hgps, 1)[:, :, map_channels], torch.stack(ugps, 1)[:, :, map_channels]  # (B, K, M, S, S)
    d = ((hgp - ugp) ** 2).mean(dim=(-1, -2))  # (B, K, M)
    end = d.argmax(dim=1)  # (B, M)
    sam = (hgp - x0[:, None, map_channels]) ** 2
    k = torch.arange(sam.shape[1])[None, :, None]
    upto = (k <= end[:, None, :]).float()[..., None, None]
    return (sam * upto).sum(1) / upto.sum(1)  # (B, M, S, S)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model if present, else random tiny)")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--strides", default="1,2,5,10")
    parser.add_argument("--w", type=float, default=2.0)
    parser.add_argument("--out", default="benchmarks/results/forward_process.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    network = None
    if args.model or _bundled():
        from anofpdm_monai.networks import load_model_folder

        network, config = load_model_folder(args.model or _bundled())
        cfg = config.network
    else:
        cfg = network_preset("tiny", 4)
        network = build_network(cfg).eval()
    abar = build_scheduler(DiffusionConfig()).alphas_cumprod
    x0 = torch.rand(args.slices, cfg.in_channels, cfg.image_size, cfg.image_size) * 2 - 1
    map_channels = [0, cfg.in_channels - 1]
    NoisePredictor(network)(x0[:1], torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))  # warm-up
    rows = []
    for stride in [int(s) for s in args.strides.split(",")]:
        for pattern in ("one batched call (anofpdm_monai)", "reference pattern"):
            predict = CountingPredictor(NoisePredictor(network))
            gen = torch.Generator().manual_seed(0)
            start = time.perf_counter()
            if pattern.startswith("one"):
                result = run_forward_process(predict, x0, abar, guidance_scales=[args.w], steps=args.steps, stride=stride,
                                             map_channels=map_channels, generator=gen)  # fmt: skip
                maps = result.aggregated_map[0]
            else:
                maps = reference_pattern(predict, x0, abar, args.w, args.steps, stride, map_channels, gen)
            seconds = time.perf_counter() - start
            if pattern.startswith("one"):
                engine_maps = maps
            rows.append({
                "stride": stride, "pattern": pattern, "calls_per_slice": predict.calls,
                "s_per_slice": seconds / args.slices, "peak_rss_mb": peak_rss_mb(),
                "max_abs_map_diff": float((maps - engine_maps).abs().max()),
            })  # fmt: skip
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, ["stride", "pattern", "calls_per_slice", "s_per_slice", "max_abs_map_diff", "peak_rss_mb"])
    print("calls_per_slice counts batched calls; the reference pattern's calls each carry one label, ours carry two.")
    write_json(args.out, {"benchmark": "forward_process", "args": vars(args), "rows": rows})


def _bundled():
    try:
        from anofpdm_monai.bundled import bundled_model_dir

        return bundled_model_dir()
    except FileNotFoundError:
        return None


if __name__ == "__main__":
    main()
