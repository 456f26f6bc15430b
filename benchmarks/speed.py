"""Speed: one phantom volume against the network floor measured in the same run.

Prints, for the calibrated settings of a model (default: the bundled one):

* the network floor: FLOPs of the volume's network calls (torch's FLOP counter) / the machine's
  convolution throughput (a 64-channel 3 x 3 convolution on 16 x 64 x 64 in the precision and layout the
  network runs in), timed after every 4th network call of the volume (median), so both see the same load;
* seconds per volume (preprocessing, forward process, decisions and inverse, writing) and its ratio to
  that floor; the network's achieved fraction of the convolution throughput;
* the split: startup (a fresh process importing the CLI and loading the model), preprocessing, network,
  forward-process arithmetic around it, decisions (+ the inverse to the input grid) and writing.

The ratios are medians over ``--rounds`` volumes. ``--compare
PRECISION/LAYOUT`` also runs the volume in that execution (e.g. ``bf16/contiguous``, what ``auto`` ran
before it was measured on a CPU with AVX512-BF16) and counts the mask voxels that differ.

    nice -n 5 python benchmarks/speed.py --rounds 3 --compare fp32/contiguous
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

from anofpdm_monai.inferers import VolumeInferer  # noqa: E402
from anofpdm_monai.networks import LAYOUTS, NULL, NoisePredictor, candidate_executions  # noqa: E402
from anofpdm_monai.readers import read_brats  # noqa: E402
from anofpdm_monai.volume_mode import VolumeInputs  # noqa: E402
from data_prep.phantom import generate_cohort  # noqa: E402

STARTUP = ("import time; start = time.perf_counter(); import pipelines.segment; from anofpdm_monai.model import AnoFPDMModel; "
           "AnoFPDMModel.from_folder({model!r}, 'cpu'); print(time.perf_counter() - start)")  # fmt: skip


class TimedPredictor:
    """A noise predictor that adds up the seconds spent in it and the inputs it was given, and after every
    ``probe_every``-th call times one convolution of the same precision and layout (:class:`ConvProbe`), so
    that the network and the machine's convolution throughput are measured side by side under the same load."""

    def __init__(self, predict_eps: NoisePredictor, probe: ConvProbe, probe_every: int = 4) -> None:
        self.predict_eps = predict_eps
        self.autocast = predict_eps.autocast
        self.probe, self.probe_every = probe, probe_every
        self.seconds = self.probe_seconds = self.cpu_seconds = self.probe_cpu_seconds = 0.0
        self.inputs = self.calls = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        start, cpu = time.perf_counter(), time.process_time()
        eps = self.predict_eps(x_t, t, labels)
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu
        self.inputs += x_t.shape[0]
        self.calls += 1
        if self.calls % self.probe_every == 1 or self.probe_every == 1:
            start, cpu = time.perf_counter(), time.process_time()
            self.probe()
            self.probe_seconds += time.perf_counter() - start
            self.probe_cpu_seconds += time.process_time() - cpu
        return eps


class ConvProbe:
    """``repeat`` 64-channel 3 x 3 convolutions on (16, 64, 64, 64) per call (about as long as a network call), in a
    given precision and layout; keeps their FLOP per wall second and per CPU second of this process."""

    FLOPS = 2 * 16 * 64 * 64 * 64 * 64 * 9
    repeat = 6

    def __init__(self, device: torch.device, precision: str, layout: str) -> None:
        fmt = torch.channels_last if layout == LAYOUTS[1] else torch.contiguous_format
        self.conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device).eval().to(memory_format=fmt)
        self.x = torch.randn(16, 64, 64, 64, device=device).contiguous(memory_format=fmt)
        self.device, self.bf16 = device, precision == "bf16"
        self.rates: list[float] = []
        self.cpu_rates: list[float] = []

    def __call__(self) -> None:
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(self.repeat):
                self.conv(self.x)
            self.rates.append(self.repeat * self.FLOPS / (time.perf_counter() - start))
            self.cpu_rates.append(self.repeat * self.FLOPS / (time.process_time() - cpu))


def conv_throughput(device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Median FLOP/s of the probe convolution per candidate precision/layout of this device."""
    out = {}
    for precision, layout in candidate_executions("auto", device):
        probe = ConvProbe(device, precision, layout)
        for _ in range(repeats + 1):
            probe()
        out[f"{precision}/{layout}"] = statistics.median(probe.rates[1:])
    return out


def network_flops(network: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """FLOPs of one network call on (B, C, S, S), per input (convolutions, matmuls, attention)."""
    x = torch.randn(shape)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(x, timesteps=torch.full((shape[0],), 100), class_labels=torch.full((shape[0],), NULL))
    return counter.get_total_flops() / shape[0]


def run_volume(inferer: VolumeInferer, paths: list[Path], case_id: str, out_dir: Path) -> dict:
    """One case through every stage, each timed; returns the seconds and the outputs."""
    slices = inferer.slice_inferer
    execution = slices.predict_eps.execution.split("+")[0].split("/")
    timed = TimedPredictor(slices.predict_eps, ConvProbe(inferer.device, *execution))
    slices.predict_eps = timed
    try:
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        case = inferer.preprocess(paths)
        t1 = time.perf_counter()
        geometry = case.geometry
        result = slices.forward_process(case.images, case_id, geometry.slice_indices)
        t2 = time.perf_counter()
        volume = VolumeInputs.from_slices(case.images, geometry.slice_indices, geometry.slice_voxel_mm) if "volume" in slices.variants else None
        decided = slices.decide(result, inferer.settings.variant, volume)
        output = inferer.to_volume(case, decided)
        t3 = time.perf_counter()
        inferer.write(output, out_dir, case_id)
        t4 = time.perf_counter()
        cpu4 = time.process_time()
    finally:
        slices.predict_eps = timed.predict_eps
    return {"preprocess": t1 - t0, "network": timed.seconds, "engine": t2 - t1 - timed.seconds - timed.probe_seconds,
            "decisions": t3 - t2, "write": t4 - t3, "volume": t4 - t0 - timed.probe_seconds, "inputs": timed.inputs,
            "slices": int(case.images.shape[0]), "conv_during": statistics.median(timed.probe.rates),
            "conv_cpu_during": statistics.median(timed.probe.cpu_rates), "network_cpu": timed.cpu_seconds,
            "volume_cpu": cpu4 - cpu0 - timed.probe_cpu_seconds,
            "mask": output.mask, "anomaly": output.anomaly}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--method", default="anofpdm-ddim")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--steps", type=int, default=None, help="step budget N (default: calibrated; a smaller one for a quick check)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of floor and volume (medians are reported)")
    parser.add_argument("--compare", default=None, metavar="PRECISION/LAYOUT", help="also run in this execution and compare the masks")
    parser.add_argument("--compile", action="store_true", help="also time the compiled network (compile time included)")
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    args = parser.parse_args()
    device = torch.device("cpu")

    startup = float(subprocess.run([sys.executable, "-c", STARTUP.format(model=args.model)], capture_output=True, text=True,
                                   check=True).stdout.split()[-1])  # fmt: skip
    start = time.perf_counter()
    inferer = VolumeInferer(args.model, device="cpu", method=args.method, precision=args.precision, steps=args.steps)
    choose_seconds = time.perf_counter() - start  # includes the first-use timing when nothing is cached
    execution = inferer.slice_inferer.predict_eps.execution
    cfg = inferer.config.network
    flops_per_input = network_flops(inferer.model.network, (16, cfg.in_channels, cfg.image_size, cfg.image_size))
    print(f"model {args.model}: {flops_per_input / 1e9:.3f} GFLOP per network input; runs as {execution} "
          f"(chosen in {choose_seconds:.1f} s, first-use timing included when not cached); startup {startup:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        generate_cohort(Path(tmp) / "raw", "brats", 1, healthy_fraction=0.0, seed=99, progress=False)
        record = read_brats(Path(tmp) / "raw")[0]
        paths = list(record.channels.values())
        rounds = []
        for r in range(args.rounds):
            peak = conv_throughput(device)  # every candidate, to say which one the machine's convolutions prefer
            run = run_volume(inferer, paths, record.case_id, Path(tmp) / "out")
            floor = run["inputs"] * flops_per_input / run["conv_during"]
            floor_cpu = run["inputs"] * flops_per_input / run["conv_cpu_during"]
            row = {**{k: v for k, v in run.items() if k not in ("mask", "anomaly")}, "floor": floor, "conv_before": peak,
                   "volume_over_floor": run["volume"] / floor, "network_fraction": floor / run["network"], "floor_cpu": floor_cpu,
                   "volume_over_floor_cpu": run["volume_cpu"] / floor_cpu, "network_fraction_cpu": floor_cpu / run["network_cpu"]}  # fmt: skip
            rounds.append(row)
            print(f"round {r + 1}: volume {run['volume']:.1f} s = {row['volume_over_floor']:.2f} x the floor {floor:.1f} s "
                  f"(conv {run['conv_during'] / 1e9:.0f} GFLOP/s during the run, {execution}; before it: "
                  + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peak.items()) + f"); network {run['network']:.1f} s = "
                  f"{row['network_fraction']:.0%} of conv throughput; preprocess {run['preprocess']:.1f}, engine "
                  f"{run['engine']:.1f}, decisions {run['decisions']:.1f}, write {run['write']:.1f} s; in CPU seconds of this "
                  f"process: volume {run['volume_cpu']:.1f} = {row['volume_over_floor_cpu']:.2f} x the floor {floor_cpu:.1f}, network at "
                  f"{row['network_fraction_cpu']:.0%} of the conv's FLOP per CPU second")  # fmt: skip
        reference = run
        compare = None
        if args.compare:
            other = VolumeInferer(inferer.model, inferer.settings)
            precision, layout = args.compare.split("/")
            other.slice_inferer.predict_eps = NoisePredictor(inferer.model.network, autocast=precision == "bf16",
                                                             channels_last=layout == LAYOUTS[1])  # fmt: skip
            base = run_volume(other, paths, record.case_id, Path(tmp) / "out_compare")
            compare = {"against": args.compare, "differing_mask_voxels": int((base["mask"] != reference["mask"]).sum()),
                       "mask_voxels": int(base["mask"].sum()), "max_map_difference": float(np.abs(base["anomaly"] - reference["anomaly"]).max()),
                       "network_seconds_compared": base["network"], "network_seconds_chosen": reference["network"]}  # fmt: skip
            inferer.slice_inferer.predict_eps = NoisePredictor(inferer.model.network, autocast=inferer.slice_inferer.predict_eps.autocast,
                                                               channels_last=execution.split("/")[1] == LAYOUTS[1])  # fmt: skip
            print(f"against {args.compare}: {compare['differing_mask_voxels']} of {compare['mask_voxels']} mask voxels differ, "
                  f"max map difference {compare['max_map_difference']:.2e}; network {base['network']:.1f} s there")
        compiled = None
        if args.compile:
            slices = inferer.slice_inferer
            plain = slices.predict_eps
            slices.predict_eps = NoisePredictor(plain.network, autocast=plain.autocast, channels_last=plain.channels_last, compile=True)
            x = torch.randn(16, cfg.in_channels, cfg.image_size, cfg.image_size)
            t, labels = torch.full((16,), 100), torch.full((16,), NULL)
            start = time.perf_counter()
            slices.predict_eps(x, t, labels)
            compile_seconds = time.perf_counter() - start
            run_c = run_volume(inferer, paths, record.case_id, Path(tmp) / "out_compiled")
            slices.predict_eps = plain
            saved = run["network"] - run_c["network"]
            compiled = {"compile_seconds": compile_seconds, "network": run_c["network"], "network_plain": run["network"],
                        "break_even_cases": compile_seconds / saved if saved > 0 else None}  # fmt: skip
            pays = f"pays after {compiled['break_even_cases']:.1f} cases" if saved > 0 else "never pays here (not faster)"
            print(f"compiled: first call {compile_seconds:.0f} s; network {run_c['network']:.1f} s per volume against "
                  f"{run['network']:.1f} s; {pays}")

    keys = ("volume", "floor", "volume_over_floor", "network_fraction", "preprocess", "network", "engine", "decisions", "write",
            "volume_cpu", "floor_cpu", "volume_over_floor_cpu", "network_fraction_cpu")
    summary = {k: statistics.median(r[k] for r in rounds) for k in keys}
    summary["startup"] = startup
    print(f"\nmedian of {args.rounds} rounds: {summary['volume']:.1f} s per volume = {summary['volume_over_floor']:.2f} x the network "
          f"floor ({summary['floor']:.1f} s); network at {summary['network_fraction']:.0%} of the measured convolution throughput")
    print(f"in CPU seconds of this process (what a contended machine cannot take from it): {summary['volume_cpu']:.1f} = "
          f"{summary['volume_over_floor_cpu']:.2f} x the floor ({summary['floor_cpu']:.1f}); network at {summary['network_fraction_cpu']:.0%}")
    print("split (s): " + ", ".join(f"{k} {summary[k]:.1f}" for k in ("startup", "preprocess", "network", "engine", "decisions", "write")))
    write_json(args.out, {"benchmark": "speed", "args": vars(args), "execution": execution, "flops_per_input": flops_per_input,
                          "inputs": rounds[-1]["inputs"], "slices": rounds[-1]["slices"], "summary": summary, "rounds": rounds,
                          "compare": compare, "compiled": compiled})  # fmt: skip


if __name__ == "__main__":
    main()
