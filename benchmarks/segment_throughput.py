"""Cohort throughput of ``anofpdm segment``: cases per hour, serial against overlapped loading and writing.

Generates a phantom cohort (seed 31, used nowhere else) and segments it twice with the same model and
settings through :func:`anofpdm_monai.api.segment_records`, the verb's own loop: once one step after
the other (read + preprocess, infer, write), once with the next case loaded and the last one written
in threads while the network runs. Checks that both runs wrote identical masks.

    python benchmarks/segment_throughput.py --cases 10
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

from anofpdm_monai.api import segment_records  # noqa: E402
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
    parser.add_argument("--out", default="benchmarks/results/segment_throughput.json")
    args = parser.parse_args()
    inferer = VolumeInferer(args.model, device="cpu", method=args.method, batch_size=args.batch_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cohort = Path(tmp) / "cohort"
        generate_cohort(cohort, args.layout, args.cases, healthy_fraction=0.2, seed=31)
        records = read_cases(cohort, args.layout)
        for overlap in (False, True):
            out = Path(tmp) / ("overlapped" if overlap else "serial")
            out.mkdir()
            start = time.perf_counter()
            outcomes = list(segment_records(inferer, records, out, keep_results=False, overlap=overlap))
            seconds = time.perf_counter() - start
            failed = [o.case_id for o in outcomes if o.error is not None]
            rows.append({"mode": out.name, "cases": len(records), "failed": len(failed), "seconds": seconds,
                         "cases_per_hour": 3600 * len(records) / seconds})  # fmt: skip
        same = all(
            np.array_equal(np.asarray(nib.load(str(p)).dataobj), np.asarray(nib.load(str(Path(tmp) / "overlapped" / p.name)).dataobj))
            for p in (Path(tmp) / "serial").glob("*.nii.gz")
        )
    print_table(rows, ["mode", "cases", "failed", "seconds", "cases_per_hour"])
    print(f"speed-up {rows[0]['seconds'] / rows[1]['seconds']:.2f}x; identical outputs: {same}")
    write_json(args.out, {"benchmark": "segment_throughput", "args": vars(args), "rows": rows, "identical_outputs": same})


if __name__ == "__main__":
    main()
