"""Preprocessing throughput: cases per minute of ``anofpdm preprocess`` on a phantom BraTS cohort.

    python benchmarks/preprocess_throughput.py --cases 6 --workers 1,2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

from data_prep.phantom import generate_cohort  # noqa: E402
from pipelines.cli import main as cli  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--out", default="benchmarks/results/preprocess_throughput.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate_cohort(Path(tmp) / "raw", "brats", args.cases, healthy_fraction=0.2, seed=5, progress=False)
        generation = (time.perf_counter() - start) / args.cases
        for workers in [int(w) for w in args.workers.split(",")]:
            store = Path(tmp) / f"store_{workers}"
            start = time.perf_counter()
            cli(["preprocess", "-i", str(Path(tmp) / "raw"), "-o", str(store), "--dataset", "brats",
                 "--size", str(args.size), "--workers", str(workers)])  # fmt: skip
            seconds = time.perf_counter() - start
            rows.append({"workers": workers, "cases": args.cases, "size": args.size, "seconds": seconds,
                         "cases_per_minute": 60.0 * args.cases / seconds})  # fmt: skip
    print_table(rows, ["workers", "cases", "size", "seconds", "cases_per_minute"])
    print(f"phantom generation: {generation:.1f} s per 240x240x155 BraTS-layout case")
    write_json(args.out, {"benchmark": "preprocess_throughput", "args": vars(args), "rows": rows,
                          "phantom_seconds_per_case": generation})  # fmt: skip


if __name__ == "__main__":
    main()
