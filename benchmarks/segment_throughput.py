"""Cohort throughput of ``anofpdm segment``: cases per hour at each number of loader/writer processes.

Generates a phantom cohort (seed 31, used nowhere else) and segments it once per ``--workers`` value with
the same model and settings through :func:`anofpdm_monai.api.segment_records`, the verb's own loop: 0 runs
one step after the other (read + preprocess, infer, write); W > 0 loads cases ahead in W spawned processes
and writes them in W others while the network runs. Prints the device's default
(:func:`anofpdm_monai.api.default_workers`) and checks that every run wrote identical masks.

    python benchmarks/segment_throughput.py --cases 10 --workers 0,1
    python benchmarks/segment_throughput.py --device cuda --cases 20 --workers 0,1,3 --batch-size 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

from anofpdm_monai.api import default_workers, segment_records  # noqa: E402
from anofpdm_monai.inferers import VolumeInferer  # noqa: E402
from anofpdm_monai.readers import read_cases  # noqa: E402
from data_prep.phantom import generate_cohort  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--layout", default="brats", choices=["brats", "atlas"])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--method", default="anofpdm-ddim")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", default="0,1", help="comma list of loader/writer process counts")
    parser.add_argument("--steps", type=int, default=None, help="step budget N (default: calibrated)")
    parser.add_argument("--stride", type=int, default=None, help="stride k (default: calibrated)")
    parser.add_argument("--out", default="benchmarks/results/segment_throughput.json")
    args = parser.parse_args()
    inferer = VolumeInferer(args.model, device=args.device, method=args.method, batch_size=args.batch_size, steps=args.steps,
                            stride=args.stride)  # fmt: skip
    workers = [int(w) for w in args.workers.split(",")]
    print(f"device {inferer.device}; default workers there: {default_workers(inferer.device)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cohort = Path(tmp) / "cohort"
        generate_cohort(cohort, args.layout, args.cases, healthy_fraction=0.2, seed=31)
        records = read_cases(cohort, args.layout)
        for count in workers:
            out = Path(tmp) / f"workers{count}"
            out.mkdir()
            start = time.perf_counter()
            outcomes = list(segment_records(inferer, records, out, keep_results=False, num_workers=count))
            seconds = time.perf_counter() - start
            failed = [o.case_id for o in outcomes if o.error is not None]
            rows.append({"workers": count, "cases": len(records), "failed": len(failed), "seconds": seconds,
                         "cases_per_hour": 3600 * len(records) / seconds})  # fmt: skip
        first = Path(tmp) / f"workers{workers[0]}"
        same = all(
            np.array_equal(np.asarray(nib.load(str(p)).dataobj), np.asarray(nib.load(str(Path(tmp) / f"workers{w}" / p.name)).dataobj))
            for p in first.glob("*.nii.gz") for w in workers[1:]
        )
    print_table(rows, ["workers", "cases", "failed", "seconds", "cases_per_hour"])
    print("speed-up against the first: " + ", ".join(f"{r['workers']} workers {rows[0]['seconds'] / r['seconds']:.2f}x" for r in rows[1:])
          + f"; identical outputs: {same}")
    write_json(args.out, {"benchmark": "segment_throughput", "args": vars(args), "rows": rows, "identical_outputs": same})


if __name__ == "__main__":
    main()
