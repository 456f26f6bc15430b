"""Accuracy on a phantom test cohort of patients unseen in training: every method, Table-1 form.

Generates a BraTS-layout phantom test cohort (seed 2 by default; the bundled model was trained on
seed 1) and a small validation cohort (seed 4) for the ddib baseline's pixel-label threshold,
preprocesses both with the model's settings, runs ``anofpdm evaluate`` with all methods and prints
the summary beside the oracle intensity-threshold figure.

    python benchmarks/accuracy.py --cases 20 --max-slices 600
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

from anofpdm_monai.config import ModelConfig  # noqa: E402
from anofpdm_monai.evaluation import ALL_METHODS  # noqa: E402
from data_prep.phantom import generate_cohort  # noqa: E402
from pipelines.cli import main as cli  # noqa: E402
from pipelines.segment import resolve_model  # noqa: E402


def build_store(work: Path, name: str, cases: int, seed: int, split: str, size: int, healthy: float) -> Path:
    raw, store = work / f"{name}_raw", work / f"{name}_store"
    if not (store / "manifest.csv").is_file():
        generate_cohort(raw, "brats", cases, healthy_fraction=healthy, seed=seed, workers=2)
        assert cli(["preprocess", "-i", str(raw), "-o", str(store), "--dataset", "brats", "--size", str(size),
                    "--split", split, "--workers", "2"]) == 0  # fmt: skip
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2, help="test cohort seed (never a training seed)")
    parser.add_argument("--max-slices", type=int, default=600)
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--work", default="/tmp/anofpdm_accuracy")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ddib-depth", type=int, default=300, help="encoding depth of the ddib baseline")
    parser.add_argument("--out", default="benchmarks/results/accuracy.json")
    args = parser.parse_args()
    model = resolve_model(args.model)
    size = ModelConfig.load(model / "config.json").network.image_size
    work = Path(args.work)
    test = build_store(work, "test", args.cases, args.seed, "0,0,1", size, healthy=0.2)
    val = build_store(work, "val", 5, 4, "0,1,0", size, healthy=0.2)
    start = time.perf_counter()
    results = work / "results"
    code = cli(["evaluate", "-m", str(model), "-i", str(test), "-o", str(results), "--methods", args.methods,
                "--max-slices", str(args.max_slices), "--val-data", str(val), "--batch-size", str(args.batch_size),
                "--ddib-depth", str(args.ddib_depth)])  # fmt: skip
    summary = json.loads((results / "summary.json").read_text())
    write_json(args.out, {"benchmark": "accuracy", "args": vars(args), "exit_code": code,
                          "seconds": time.perf_counter() - start, "summary": summary,
                          "summary_md": (results / "summary.md").read_text()})  # fmt: skip


if __name__ == "__main__":
    main()
