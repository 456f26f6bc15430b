"""Peak memory: of the forward process against the step budget N (flat by design), and of
``segment`` on a 240 x 240 x 155 phantom volume against --batch-size. Each point runs in a fresh
subprocess and reports its peak resident set size (CPU) or peak CUDA allocation.

    python benchmarks/memory.py --steps 60,150,300,600 --batch-sizes 8,32,64
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

ENGINE = """
import resource, sys, torch
from anofpdm_monai.config import DiffusionConfig
from anofpdm_monai.forward_process import run_forward_process
from anofpdm_monai.networks import NoisePredictor, build_scheduler, load_model_folder
from anofpdm_monai.bundled import resolve_model_dir
net, cfg = load_model_folder(resolve_model_dir(sys.argv[1]))
x0 = torch.rand(16, cfg.network.in_channels, cfg.network.image_size, cfg.network.image_size) * 2 - 1
abar = build_scheduler(DiffusionConfig()).alphas_cumprod
steps, stride = int(sys.argv[2]), int(sys.argv[3])
run_forward_process(NoisePredictor(net), x0, abar, guidance_scales=[2.0], steps=steps, stride=stride, map_channels=[0, 3])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

SEGMENT = """
import resource, sys
from pathlib import Path
from anofpdm_monai.inferers import VolumeInferer
from anofpdm_monai.readers import read_brats
from anofpdm_monai.bundled import resolve_model_dir
record = read_brats(Path(sys.argv[2]))[0]
inferer = VolumeInferer(resolve_model_dir(sys.argv[1]), batch_size=int(sys.argv[3]), device="cpu")
inferer.write(inferer(list(record.channels.values())), Path(sys.argv[4]), record.case_id)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_mb(script: str, *argv: str) -> float:
    out = subprocess.run([sys.executable, "-c", script, *argv], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--steps", default="60,150,300,600")
    parser.add_argument("--stride", type=int, default=20)
    parser.add_argument("--batch-sizes", default="8,32,64")
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    args = parser.parse_args()
    engine = [{"steps": int(n), "stride": args.stride, "slices": 16, "peak_rss_mb": peak_mb(ENGINE, args.model, n, str(args.stride))}
              for n in args.steps.split(",")]  # fmt: skip
    print_table(engine, ["steps", "stride", "slices", "peak_rss_mb"])
    from data_prep.phantom import generate_cohort

    segment = []
    with tempfile.TemporaryDirectory() as tmp:
        generate_cohort(Path(tmp) / "raw", "brats", 1, healthy_fraction=0.0, seed=99, progress=False)
        for b in args.batch_sizes.split(","):
            segment.append({"volume": "240x240x155", "batch_size": int(b),
                            "peak_rss_mb": peak_mb(SEGMENT, args.model, str(Path(tmp) / "raw"), b, str(Path(tmp) / "out"))})  # fmt: skip
    print_table(segment, ["volume", "batch_size", "peak_rss_mb"])
    write_json(args.out, {"benchmark": "memory", "args": vars(args), "engine": engine, "segment": segment})


if __name__ == "__main__":
    main()
