"""Speed: seconds and network calls per slice against the stride k, the DICE each stride keeps, and
one phantom volume end to end (load, preprocess, infer, write) with the calibrated settings.

Every stride uses the same calibration (w*, thr_01, D of the shipped model), so the DICE column
shows what skipping steps costs at fixed decisions; each network precision (fp32, bf16 autocast) is
timed on the same slices. Unhealthy-setup DICE on the unhealthy slices of a phantom test store
(build one with benchmarks/accuracy.py, or any store of the model's size). The volume is run with
the default precision (``auto``).

    python benchmarks/stride_speed.py --store /tmp/anofpdm_accuracy/test_store --slices 48 --strides 1,5,10,20,30
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

from anofpdm_monai.bundled import resolve_model_dir  # noqa: E402
from anofpdm_monai.data import PreprocessedStore  # noqa: E402
from anofpdm_monai.inferers import ForwardProcessInferer, VolumeInferer  # noqa: E402
from anofpdm_monai.metrics import dice_iou_per_slice  # noqa: E402
from anofpdm_monai.networks import NoisePredictor, use_bf16  # noqa: E402
from anofpdm_monai.readers import read_brats  # noqa: E402
from data_prep.phantom import generate_cohort  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--store", required=True, help="preprocessed store with unhealthy test slices")
    parser.add_argument("--split", default="test")
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--strides", default="1,5,10,20,30")
    parser.add_argument("--precisions", default="fp32,bf16", help="network precisions to time the strides with")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/stride_speed.json")
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model)
    volume = VolumeInferer(model_dir, batch_size=args.batch_size, device="cpu")
    base = volume.slice_inferer
    store = PreprocessedStore(args.store)
    rows = store.rows(args.split)
    rows = rows[rows["label"] == 1].sample(n=min(args.slices, int(rows["label"].sum())), random_state=0)
    images, masks, _ = store.load_slices(rows)
    table = []
    for precision in args.precisions.split(","):
        predict_eps = NoisePredictor(base.predict_eps.network, autocast=use_bf16(precision, torch.device("cpu")))
        for stride in [int(k) for k in args.strides.split(",")]:
            inferer = ForwardProcessInferer(predict_eps, base.alphas_cumprod, base.calibration, stride=stride,
                                   setup="unhealthy", batch_size=args.batch_size)  # fmt: skip
            start = time.perf_counter()
            out = inferer(images)["aggregated"]
            seconds = time.perf_counter() - start
            dice, _ = dice_iou_per_slice(out.masks, masks)
            table.append({"precision": precision, "stride": stride, "calls_per_slice": out.network_calls,
                          "s_per_slice": seconds / len(images), "unhealthy_dice": float(np.mean(dice)),
                          "slices": len(images), "calibrated": stride == base.calibration.stride})  # fmt: skip
            print_table(table[-1:], list(table[-1]))
    print()
    print_table(table, list(table[0]))

    with tempfile.TemporaryDirectory() as tmp:
        generate_cohort(Path(tmp) / "raw", "brats", 1, healthy_fraction=0.0, seed=99, progress=False)
        record = read_brats(Path(tmp) / "raw")[0]
        start = time.perf_counter()
        result = volume(list(record.channels.values()))
        volume.write(result, Path(tmp) / "out", record.case_id)
        end_to_end = time.perf_counter() - start
    e2e = {"seconds": end_to_end, "brain_slices": len(result.slices.sim), "shape": list(result.mask.shape),
           "stride": base.stride, "steps": base.steps, "bf16": base.predict_eps.autocast, "calls_per_slice": result.slices.network_calls, "batch_size": args.batch_size,
           "peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # fmt: skip
    print(f"\none 240x240x155 phantom volume end to end (load, infer, write): {end_to_end:.1f} s, "
          f"{e2e['brain_slices']} brain slices, N={base.steps}, k={base.stride}, {e2e['calls_per_slice']} calls per slice, "
          f"{'bf16' if base.predict_eps.autocast else 'fp32'}, "
          f"peak RSS of this process {e2e['peak_rss_mb_process']:.0f} MB")
    write_json(args.out, {"benchmark": "speed", "args": vars(args), "strides": table, "volume_end_to_end": e2e})


if __name__ == "__main__":
    main()
