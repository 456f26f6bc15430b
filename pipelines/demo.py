"""``anofpdm demo``: phantom patients never seen in training, segmented with a bundled model, evaluated.

``--layout brats`` (default) uses ``bundled`` on BraTS-layout patients; ``--layout atlas`` uses
``bundled-atlas`` on ATLAS v2.0-layout patients (T1w, stroke lesions).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from anofpdm_monai.baselines import lesion_polarity
from anofpdm_monai.bundled import bundled_model_dir
from anofpdm_monai.evaluation import EvaluationSettings, evaluate_cohort
from anofpdm_monai.io import InputError
from anofpdm_monai.model import AnoFPDMModel, InferenceSettings, available_methods
from data_prep.phantom import generate_cohort
from pipelines.options import add_batch_size_argument, add_device_arguments

DEMO_SEED = 2026  # the bundled models were trained on seeds 1 (brats) and 11 (atlas), benchmarked on 2 and 12
DEMO_METHODS = ("anofpdm-ddim-volume", "anofpdm-ddim", "threshold")  # the first one's masks are written
# layout -> (bundled model, default patients). One whole volume costs about 0.37 s per slice per 30 network
# calls on 2 CPU cores (docs/benchmarks.md), ~135 brain slices in either layout; an ATLAS calibration over
# w up to 30 may keep the largest budget (N = 600: 60 calls per slice at k = 10, ~100 s per volume), so the
# ATLAS demo segments two patients to stay within 5 minutes whatever N its calibration chose.
DEMO_LAYOUTS = {"brats": ("bundled", 3), "atlas": ("bundled-atlas", 2)}
POLARITY_WORDS = {"high": "lesions brighter", "low": "lesions darker", "best": "either direction"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default="anofpdm_demo", help="folder for the demo's files")
    parser.add_argument("--layout", choices=list(DEMO_LAYOUTS), default="brats",
                        help="brats: -m bundled on BraTS-layout patients; atlas: -m bundled-atlas on ATLAS v2.0-layout (T1w) ones")
    parser.add_argument("--cases", type=int, default=None, help="phantom patients to generate and segment (default: brats 3, atlas 2)")
    add_device_arguments(parser)
    add_batch_size_argument(parser)


def run(args: argparse.Namespace) -> int:
    name, default_cases = DEMO_LAYOUTS[args.layout]
    cases = default_cases if args.cases is None else args.cases
    if cases < 1:
        raise InputError(f"--cases {cases}: give at least 1 patient")
    return run_demo(Path(args.output), args.layout, cases, bundled_model_dir(name), device=args.device,
                    precision=args.precision, batch_size=args.batch_size)  # fmt: skip


def run_demo(out: Path, layout: str, cases: int, model_dir: Path, *, device: str = "auto", precision: str = "auto",
             batch_size: int | None = None) -> int:  # fmt: skip
    """Generate ``cases`` fresh ``layout`` phantom patients under ``out``, segment and evaluate them with ``model_dir``
    (``batch_size`` None: the model's default for its device)."""
    start = time.perf_counter()
    raw, segmentations, evaluation = out / "phantom", out / "segmentations", out / "evaluation"
    print(f"1/3 generating {cases} phantom {layout.upper()}-layout patients (seed {DEMO_SEED}) in {raw}")
    generate_cohort(raw, layout, cases, healthy_fraction=0.0, seed=DEMO_SEED)
    methods = [m for m in DEMO_METHODS if m in available_methods(model_dir)]
    print(f"2/3 segmenting them with the model {model_dir.name} ({', '.join(methods[:-1])}: both families, "
          "one forward process, calibrated fast mode)")
    model = AnoFPDMModel.from_folder(model_dir, device)
    settings = InferenceSettings(batch_size=batch_size or model.default_batch_size(), precision=precision)
    evaluate_cohort(model, raw, evaluation, settings, EvaluationSettings(methods=tuple(methods)), outputs_dir=segmentations)
    channels = "+".join(c.upper() for c in model.config.preprocess.map_channels)
    polarity = lesion_polarity(model.config.preprocess.map_channels)
    print(f"3/3 Table-1-style summary (threshold = oracle intensity threshold on {channels}, "
          f"{POLARITY_WORDS[polarity]}: an upper bound that uses pixel labels)")
    print((evaluation / "summary.md").read_text())
    print(f"{methods[0]} masks and anomaly maps (NIfTI, on each input's grid) and PNG overlays: {segmentations}")
    print(f"tables: {evaluation / 'slices.csv'}, {evaluation / 'cases.csv'}, {evaluation / 'summary.json'}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0
