"""Accuracy on a phantom test cohort of patients unseen in training: every method, Table-1 form, per lesion kind.

Generates a phantom test cohort (seed 2 for brats, 12 for atlas by default; the bundled models were
trained on seeds 1 and 11) and, with ddib, a validation cohort (seed 4, same layout and lesion mix)
for its pixel-label threshold,
preprocesses both with the model's settings and runs ``anofpdm evaluate`` on whole volumes (the
``-volume`` methods decide in 3-D). From its results folder, the phantom's lesion metadata and the
store's case geometry it then breaks every method down:

* per lesion kind (the case's kind, lesion slices only): unhealthy DICE, pooled AUPRC over the brain
  pixels and health recall, beside the oracle intensity threshold tuned on that kind (an upper bound;
  its direction, like evaluate's, follows the map channels' sequence: lesions above the cut on
  FLAIR/T2, below it on T1w);
* per slice lesion size (lesion pixels at S, with the mm^2 they cover): unhealthy DICE and the
  fraction of lesion slices left with an empty mask;
* per 3-D lesion volume (26-connected truth components over consecutive slices, mm^3): the fraction
  of lesions the mixed mask touches, and false-positive components per case.

``--input-grid`` evaluates the raw cohort instead of the store (the same chain, so the same slices), so
that ``evaluate`` also scores each method's written mask lesion by lesion on the input's own grid
(``summary.json``'s ``lesion_detection``: :func:`anofpdm_monai.scoring.match_lesions`, volume bins
< 100, 100-500, 500-1,500, > 1,500 mm^3, false-positive components farther than 2 mm from any lesion,
per case and per healthy case), beside the oracle intensity threshold decided on the input grid too
(:func:`input_grid_oracle`). ``--healthy-fraction`` sets the share of lesion-free patients.

    python benchmarks/accuracy.py --cases 20
    python benchmarks/accuracy.py --layout atlas --model bundled-atlas --cases 20
    python benchmarks/accuracy.py --cases 4 --max-slices 40 --methods anofpdm-ddim,threshold
    python benchmarks/accuracy.py --layout atlas --cases 10 --whole-head --methods anofpdm-ddim,anofpdm-ddim-volume
    python benchmarks/accuracy.py --lesions ms --cases 16 --healthy-fraction 0.25 --input-grid \
        --methods anofpdm-ddim,anofpdm-ddim-volume,threshold

The test cohort is drawn skull-stripped (as before whole heads existed). ``--whole-head`` draws the same
patients (same seed, the same brains voxel for voxel) a second time as whole heads (scalp, skull, noise in
the air; ``anofpdm phantom --whole-head``), preprocesses both with the layout's brain mask (atlas: template)
and reports both, the DICE difference per method, the slices and crop each store kept per case, and the
mask pixels outside the brain (the store's brain foreground).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_json  # noqa: E402

from anofpdm_monai.baselines import Direction, apply_threshold, best_threshold_dice, lesion_polarity  # noqa: E402
from anofpdm_monai.bundled import resolve_model_dir  # noqa: E402
from anofpdm_monai.config import ModelConfig  # noqa: E402
from anofpdm_monai.evaluation import load_case_results  # noqa: E402
from anofpdm_monai.model import available_methods  # noqa: E402
from anofpdm_monai.methods import get_method  # noqa: E402
from anofpdm_monai.metrics import PooledAUPRC, dice_iou_per_slice  # noqa: E402
from anofpdm_monai.networks import UNHEALTHY  # noqa: E402
from anofpdm_monai.readers import read_cases  # noqa: E402
from anofpdm_monai.scoring import DETECTION_BINS_MM3, lesion_detection_summary, match_lesions, read_mask  # noqa: E402
from anofpdm_monai.metrics import volume_dice  # noqa: E402
from data_prep.phantom import generate_cohort, load_lesion_metadata, parse_lesions  # noqa: E402
from pipelines.cli import main as cli  # noqa: E402

SIZE_BINS = {"1-10": (1, 10), "11-30": (11, 30), "31-100": (31, 100), ">100": (101, np.inf)}
"""Slice lesion-size bins: lesion pixels of one S x S slice (inclusive ranges)."""

VOLUME_BINS = {"<100": (0, 100), "100-1000": (100, 1000), "1000-10000": (1000, 10000), ">10000": (10000, np.inf)}
"""3-D lesion volume bins in mm^3, [low, high)."""

CONNECTIVITY_26 = np.ones((3, 3, 3), bool)
ORACLE_ROW = "oracle threshold (per kind)"
TEST_SEEDS = {"brats": 2, "atlas": 12}
"""Default test cohort seed per layout: no training cohort uses it (docs/bundled_model.md)."""


def model_methods(model: Path) -> list[str]:
    """Every method ``model`` supports (the library's :func:`~anofpdm_monai.model.available_methods`)."""
    return available_methods(model)


def check_kinds(raw: Path, kinds: tuple[str, ...], name: str) -> tuple[dict[str, int], list[str]]:
    """Cases per kind of a phantom cohort, and the requested kinds it lacks (printed, with a warning)."""
    counts = dict(Counter(case["kind"] for case in load_lesion_metadata(raw).values()))
    missing = [k for k in kinds if k not in counts]
    print(f"{name} cohort: {counts}")
    if missing:
        print(f"WARNING: the {name} cohort holds no case of kind(s) {', '.join(missing)}; use more cases or a new seed")
    return counts, missing


def build_store(work: Path, name: str, layout: str, kinds: tuple[str, ...], cases: int, seed: int, split: str,
                size: int, healthy: float, whole_head: bool = False) -> tuple[Path, Path]:  # fmt: skip
    """(raw cohort, preprocessed store) of a phantom cohort, reused when a previous run already built it."""
    share = "" if healthy == 0.2 else f"_healthy{healthy:g}"  # (0.2: the tags of the runs before the option existed)
    tag = f"{name}_{layout}_{'-'.join(kinds)}_{cases}c_seed{seed}{share}_{size}px{'_wholehead' if whole_head else ''}"
    raw, store = work / f"{tag}_raw", work / f"{tag}_store"
    if not (store / "manifest.csv").is_file():
        generate_cohort(raw, layout, cases, healthy_fraction=healthy, seed=seed, workers=2, lesions=kinds,
                        whole_head=whole_head)  # fmt: skip
        assert cli(["preprocess", "-i", str(raw), "-o", str(store), "--dataset", layout, "--size", str(size),
                    "--split", split, "--workers", "2"]) == 0  # fmt: skip
    return raw, store


class Evaluated:
    """An ``anofpdm evaluate`` results folder with each case's lesion kind and slice geometry.

    Iterating yields ``(case, arrays)`` of every evaluated case, loading one ``cases/<case>.npz`` at a
    time (whole volumes of every method do not all fit in memory at once); it can be iterated again.
    """

    def __init__(self, results: Path, raw: Path, store: Path) -> None:
        self.results = results
        self.summary = json.loads((results / "summary.json").read_text())
        self.slices = pd.read_csv(results / "slices.csv", dtype={"case": str})
        self.case_ids = sorted(self.slices["case"].unique())
        metadata = load_lesion_metadata(raw)
        self.kind = {c: metadata[c]["kind"] for c in self.case_ids}
        self.voxel_mm = {c: json.loads((store / "cases" / f"{c}.json").read_text())["slice_voxel_mm"]
                         for c in self.case_ids}  # fmt: skip
        self.slices["kind"] = self.slices["case"].map(self.kind)
        threshold = self.summary.get("threshold", {})
        self.oracle = {"threshold": threshold.get("oracle_threshold"), "direction": threshold.get("oracle_direction")}

    def __iter__(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        for case in self.case_ids:
            yield case, load_case_results(self.results / "cases" / f"{case}.npz")[0]


def method_outputs(arrays: dict[str, np.ndarray], method: str, oracle: dict) -> tuple[np.ndarray, ...]:
    """(maps, unhealthy-setup masks, mixed masks) of ``method`` on one case, scored as ``anofpdm evaluate`` does.

    ``threshold`` is the intensity map binarised with ``oracle`` ({"threshold", "direction"}) inside
    the brain; its map is the intensity, negated for a "low" threshold.
    """
    if method == "threshold":
        intensity = arrays["intensity"]
        masks = apply_threshold(intensity, oracle["threshold"], oracle["direction"]) & arrays["foreground"]
        return (intensity if oracle["direction"] == "high" else -intensity), masks, masks
    masks = arrays[f"{method}/masks"]
    return arrays[f"{method}/maps"], masks, arrays.get(f"{method}/mixed_masks", masks)


def health_recall(pred_label: pd.Series) -> float:
    """Fraction of (lesion) slices classified unhealthy; NaN for a method that does not classify."""
    return float((pred_label == UNHEALTHY).mean()) if pred_label.notna().any() else float("nan")


def kind_table(evaluated: Evaluated, methods: list[str], kinds: tuple[str, ...], direction: Direction) -> dict:
    """Per lesion kind, over the lesion slices of that kind's cases: DICE, AUPRC, health recall, oracle threshold.

    DICE is the unhealthy-setup DICE averaged over the slices; AUPRC pools the brain pixels of those
    slices (maps vs truth); recall is the fraction of them classified unhealthy. The extra row
    :data:`ORACLE_ROW` is the intensity threshold tuned on each kind's own slices (best pooled DICE in
    ``direction``, see :func:`lesion_polarity`): an upper bound for ``threshold``, whose row uses
    evaluate's single cohort-wide cut.
    """
    lesion = evaluated.slices[(evaluated.slices["label"] == UNHEALTHY) & evaluated.slices["method"].isin(methods)]
    table = {"dice": {}, "auprc": {}, "recall": {}}
    for method, group in lesion.groupby("method", sort=False):
        table["dice"][method] = group.groupby("kind")["dice"].mean().to_dict()
        table["recall"][method] = group.groupby("kind")["pred_label"].apply(health_recall).to_dict()
    pooled = defaultdict(PooledAUPRC)
    pixels = defaultdict(list)  # kind -> [(intensity, truth, foreground) of its lesion slices]
    for case, arrays in evaluated:
        kind, truth, fg = evaluated.kind[case], arrays["truth"], arrays["foreground"]
        keep = truth.any(axis=(1, 2))
        if not keep.any():
            continue
        pixels[kind].append((arrays["intensity"][keep], truth[keep], fg[keep]))
        for method in methods:
            maps = method_outputs(arrays, method, evaluated.oracle)[0]
            pooled[method, kind].update(maps[keep], truth[keep], fg[keep])
    for method in methods:
        table["auprc"][method] = {k: pooled[method, k].compute() for k in kinds if (method, k) in pooled}
    table["oracle"] = {k: kind_oracle(*map(np.concatenate, zip(*pixels[k])), direction) for k in kinds if pixels[k]}
    for metric in ("dice", "auprc"):
        table[metric][ORACLE_ROW] = {k: o[metric] for k, o in table["oracle"].items()}
    per_slice = lesion.drop_duplicates(["case", "slice"])
    table["lesion_slices"] = {k: int(v) for k, v in per_slice["kind"].value_counts().items()}
    return table


def kind_oracle(intensity: np.ndarray, truth: np.ndarray, fg: np.ndarray, direction: Direction) -> dict:
    """The intensity threshold (``direction``) tuned on these slices' brain pixels, and the DICE / AUPRC it reaches."""
    best = best_threshold_dice(intensity[fg], truth[fg], direction=direction)
    oracle = {"threshold": best.threshold, "direction": best.direction}
    maps, masks, _ = method_outputs({"intensity": intensity, "foreground": fg}, "threshold", oracle)
    auprc = PooledAUPRC()
    auprc.update(maps, truth, fg)
    return {**oracle, "pooled_dice": best.dice, "dice": float(dice_iou_per_slice(masks, truth)[0].mean()),
            "auprc": auprc.compute()}  # fmt: skip


def size_table(evaluated: Evaluated, methods: list[str]) -> dict:
    """Per slice lesion-size bin (:data:`SIZE_BINS`, lesion pixels at S): unhealthy DICE and empty-mask fraction.

    A bin's mm^2 range is its pixel range times the pixel area (slice_voxel_mm x * y, median over cases).
    """
    area = float(np.median([mm[0] * mm[1] for mm in evaluated.voxel_mm.values()]))
    slices = evaluated.slices[(evaluated.slices["lesion_pixels"] > 0) & evaluated.slices["method"].isin(methods)]
    edges = [lo - 0.5 for lo, _ in SIZE_BINS.values()] + [np.inf]
    slices = slices.assign(bin=pd.cut(slices["lesion_pixels"], edges, labels=list(SIZE_BINS)),
                           empty=slices["pred_pixels"] == 0)  # fmt: skip
    table = {"dice": {}, "empty_fraction": {}}
    for method, group in slices.groupby("method", sort=False):
        by_bin = group.groupby("bin", observed=True)
        table["dice"][method] = by_bin["dice"].mean().to_dict()
        table["empty_fraction"][method] = by_bin["empty"].mean().to_dict()
    table["lesion_slices"] = slices.drop_duplicates(["case", "slice"])["bin"].value_counts().astype(int).to_dict()
    table["pixel_mm2"] = area
    table["mm2"] = {name: [lo * area, hi * area] for name, (lo, hi) in SIZE_BINS.items()}
    return table


def stack(slices: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(N, S, S) slices placed at their slice indices in a (max - min + 1, S, S) volume; gaps stay empty."""
    volume = np.zeros((indices.max() - indices.min() + 1, *slices.shape[1:]), slices.dtype)
    volume[indices - indices.min()] = slices
    return volume


def detection_table(evaluated: Evaluated, methods: list[str]) -> dict:
    """Lesion-wise detection per 3-D lesion volume bin (:data:`VOLUME_BINS`, mm^3) and false positives per case.

    Lesions are the 26-connected components of a case's truth stacked over its slice indices (a
    ``--max-slices`` subset breaks them at the gaps); volume = voxels x prod(slice_voxel_mm). A lesion
    is detected when the method's mixed mask overlaps it anywhere; a false positive is a predicted
    component touching no lesion.
    """
    names, lows = list(VOLUME_BINS), [lo for lo, _ in VOLUME_BINS.values()]
    lesions, hits, false_positives = Counter(), defaultdict(Counter), Counter()
    for case, arrays in evaluated:
        indices = arrays["slice_indices"].astype(int)
        truth, n = ndimage.label(stack(arrays["truth"], indices), CONNECTIVITY_26)
        volumes = np.bincount(truth.ravel(), minlength=n + 1)[1:] * float(np.prod(evaluated.voxel_mm[case]))
        bins = np.array([names[i] for i in np.searchsorted(lows, volumes, side="right") - 1], dtype=object)
        lesions.update(bins)
        for method in methods:
            mixed = stack(method_outputs(arrays, method, evaluated.oracle)[2], indices)
            hits[method].update(bins[np.unique(truth[mixed & (truth > 0)]) - 1])
            predicted, k = ndimage.label(mixed, CONNECTIVITY_26)
            false_positives[method] += k - np.unique(predicted[(truth > 0) & (predicted > 0)]).size
    cases = len(evaluated.case_ids)
    return {
        "detected": {m: {b: hits[m][b] / lesions[b] for b in names if lesions[b]} for m in methods},
        "fp_per_case": {m: false_positives[m] / cases for m in methods},
        "lesions": {b: lesions[b] for b in names},
        "cases": cases,
    }


def input_grid_oracle(raw: Path, layout: str, channels: list[str], direction: Direction) -> dict:
    """The oracle intensity threshold decided on the input grid, scored as ``evaluate`` scores the methods there.

    Per case the map channels (e.g. FLAIR and T2) are each divided by their median over the brain (the
    non-zero voxels: skull-stripped cohorts only) and averaged; one cohort-wide cut, the one of best pooled
    DICE over every brain voxel of every case (:func:`~anofpdm_monai.baselines.best_threshold_dice`), is an
    upper bound no label-free method can tune. Its masks are then scored lesion by lesion
    (:func:`~anofpdm_monai.scoring.match_lesions`) and per case (3-D DICE) on each case's own grid.
    """
    cases = []
    for record in read_cases(raw, layout):
        images = [np.asarray(nib.load(str(record.channels[c])).dataobj, dtype=np.float32) for c in channels]
        brain = np.logical_and.reduce([image != 0 for image in images])
        intensity = np.mean([image / np.median(image[brain]) for image in images], axis=0)
        truth, label_image = read_mask(record.label)
        cases.append((intensity, brain, truth, label_image.affine))
    values = np.concatenate([i[b] for i, b, _, _ in cases])
    labels = np.concatenate([t[b] for _, b, t, _ in cases])
    cut = best_threshold_dice(values, labels, direction=direction)
    matches, dice = [], []
    for intensity, brain, truth, affine in cases:
        mask = apply_threshold(intensity, cut.threshold, cut.direction) & brain
        matches.append(match_lesions(mask, truth, affine))
        if truth.any():
            dice.append(volume_dice(mask, truth))
    return {"threshold": float(cut.threshold), "direction": cut.direction, "pooled_dice": float(cut.dice),
            "case_dice_3d": float(np.mean(dice)) if dice else float("nan"),
            "lesion_detection": lesion_detection_summary(matches)}  # fmt: skip


def lesion_table(detection: dict[str, dict]) -> str:
    """Lesion-wise detection on the input grid per volume bin, and false positives, one row per method."""
    fp = ("FP comp. / patient", "max FP comp.", "FP ml / patient", "healthy: FP comp.", "healthy: ml (max)", "3-D DICE")
    rows, counts = {}, {}
    for method, d in detection.items():
        rows[method] = {name: float("nan") if d["bins"][name]["rate"] is None else d["bins"][name]["rate"]
                        for name in DETECTION_BINS_MM3}  # (an empty bin: null in summary.json)
        rows[method].update(zip(fp, (d["fp_components_per_case"], d["max_fp_components"], d["fp_ml_per_case"],
                                     d["fp_components_per_healthy_case"], d["max_healthy_ml"], d["case_dice_3d"])))  # fmt: skip
        counts = {name: d["bins"][name]["lesions"] for name in DETECTION_BINS_MM3}
        cases = (d["cases"], d["healthy_cases"])
    rows["lesions"] = counts
    return (f"### Lesion-wise on the input grid (detected = any overlap; {cases[0]} patients with lesions, {cases[1]} healthy)\n\n"
            + markdown_table(rows, [*DETECTION_BINS_MM3, *fp], headers={b: f"{b} mm³" for b in DETECTION_BINS_MM3}))


def tables_markdown(by_kind: dict, by_size: dict, detection: dict, kinds: tuple[str, ...], threshold: dict) -> str:
    """The three breakdowns as markdown tables: methods as rows, kinds / bins as columns."""
    cut = threshold["threshold"]
    cut = "" if cut is None else f"`threshold`: one cohort-wide cut {cut:.3f} ({threshold['direction']}); "
    parts = [f"### Per lesion kind (lesion slices only; {cut}`{ORACLE_ROW}`: tuned on each kind, an upper bound)"]
    count = {"lesion slices": by_kind["lesion_slices"]}
    for metric, title in (("dice", "unhealthy DICE"), ("auprc", "AUPRC"), ("recall", "health recall")):
        parts += [title, markdown_table({**by_kind[metric], **count}, list(kinds))]
    oracle = {k: f"{o['threshold']:.3f} ({o['direction']})" for k, o in by_kind["oracle"].items()}
    parts.append(markdown_table({ORACLE_ROW: oracle}, list(kinds), first="intensity cut"))

    mm2 = by_size["mm2"]
    headers = {b: f"{b} px ({lo:.3g}-{hi:.3g} mm²)" for b, (lo, hi) in mm2.items()}
    headers[">100"] = f">100 px (>{mm2['>100'][0]:.3g} mm²)"
    count = {"lesion slices": by_size["lesion_slices"]}
    for metric, title in (("dice", "unhealthy DICE"), ("empty_fraction", "share of lesion slices with an empty mask")):
        parts += [f"### Per slice lesion size: {title}",
                  markdown_table({**by_size[metric], **count}, list(SIZE_BINS), headers=headers)]  # fmt: skip

    fp = "FP components / case"
    rows = {m: {**hit, fp: detection["fp_per_case"][m]} for m, hit in detection["detected"].items()}
    rows["lesions"] = detection["lesions"]
    parts += [f"### Lesion-wise detection by 3-D volume (fraction hit by the mixed mask; {detection['cases']} cases)",
              markdown_table(rows, [*VOLUME_BINS, fp], headers={b: f"{b} mm³" for b in VOLUME_BINS})]  # fmt: skip
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or bundled name (default: the layout's bundled model)")
    parser.add_argument("--layout", choices=["brats", "atlas"], default="brats")
    parser.add_argument("--lesions", default=None, help="comma list of lesion kinds (default: the layout's mix)")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None, help=f"test cohort seed, never a training seed (default: {TEST_SEEDS})")
    parser.add_argument("--max-slices", type=int, default=0, help="seeded slice subset (0: whole volumes, which "
                        "the -volume methods need for their 3-D decisions)")  # fmt: skip
    parser.add_argument("--methods", default=None, help="comma list (default: every method the model supports)")
    parser.add_argument("--val-cases", type=int, default=10, help="the pixel-label baselines' validation cohort (10: every brats kind)")
    parser.add_argument("--work", default="/tmp/anofpdm_accuracy")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward process (8: the fastest per slice on 2 CPU cores)")
    parser.add_argument("--tune", action="append", default=[], metavar="METHOD.PARAM=V1,V2",
                        help="passed to evaluate: a pixel-label baseline's grid (default: each method's own grid)")
    parser.add_argument("--tune-slices", type=int, default=None, help="passed to evaluate: validation slices the baselines are tuned on")
    parser.add_argument("--whole-head", action="store_true", help="also draw the test patients as whole heads and "
                        "compare (atlas: through the template brain mask)")  # fmt: skip
    parser.add_argument("--healthy-fraction", type=float, default=0.2, help="share of the test patients without any lesion")
    parser.add_argument("--input-grid", action="store_true", help="evaluate the raw cohort: also lesion-wise figures on the "
                        "input grid, beside the oracle threshold decided there")  # fmt: skip
    parser.add_argument("--out", default=None, help="JSON (default: benchmarks/results/accuracy.json, accuracy_atlas.json)")
    args = parser.parse_args()
    layout_defaults = {"brats": ("bundled", "accuracy.json"), "atlas": ("bundled-atlas", "accuracy_atlas.json")}
    args.model = args.model or layout_defaults[args.layout][0]
    args.out = args.out or f"benchmarks/results/{layout_defaults[args.layout][1]}"
    args.seed = TEST_SEEDS[args.layout] if args.seed is None else args.seed  # recorded in the JSON's args
    model = resolve_model_dir(args.model)
    methods = args.methods.split(",") if args.methods else model_methods(model)
    kinds = parse_lesions(args.layout, args.lesions)
    config = ModelConfig.load(model / "config.json")
    size, direction = config.network.image_size, lesion_polarity(config.preprocess.map_channels)
    work = Path(args.work)
    raw, test = build_store(work, "test", args.layout, kinds, args.cases, args.seed, "0,0,1", size, healthy=args.healthy_fraction)
    cohort_kinds, missing = check_kinds(raw, kinds, "test")
    val_args = []
    if any(get_method(m).kind == "reconstruction" for m in methods):  # the pixel-label baselines tune on a validation cohort
        val_raw, val = build_store(work, "val", args.layout, kinds, args.val_cases, 4, "0,1,0", size, healthy=0.2)
        check_kinds(val_raw, kinds, "val")
        val_args = ["--val-data", str(val)]
    if not args.whole_head:
        body = run_cohort(args, model, methods, kinds, raw, test, val_args, direction)
        write_json(args.out, {"benchmark": "accuracy", "args": vars(args), "missing_kinds": missing, **body})
        return
    runs = {"skull-stripped": (raw, test)}
    runs["whole-head"] = build_store(work, "test", args.layout, kinds, args.cases, args.seed, "0,0,1", size,
                                     healthy=args.healthy_fraction, whole_head=True)  # fmt: skip
    results = {head: run_cohort(args, model, methods, kinds, cohort, store, val_args, direction)
               for head, (cohort, store) in runs.items()}  # fmt: skip
    comparison = head_comparison(results, runs)
    print(json.dumps({k: v for k, v in comparison.items() if k != "cases"}, indent=1))
    write_json(args.out, {"benchmark": "accuracy_whole_head", "args": vars(args), "comparison": comparison, **results})


def run_cohort(args: argparse.Namespace, model: Path, methods: list[str], kinds: tuple[str, ...], raw: Path, test: Path,
               val_args: list[str], direction: Direction) -> dict:  # fmt: skip
    """``anofpdm evaluate`` of ``methods`` on one test store, and its breakdowns (the JSON body of one run)."""
    start = time.perf_counter()
    # one results folder per method set, so runs with other methods on the same cohort keep theirs
    results = test.parent / f"{test.name.removesuffix('_store')}_results_{'+'.join(methods)}"
    subset = ["--max-slices", str(args.max_slices)] if args.max_slices > 0 else []
    tune = [a for t in args.tune for a in ("--tune", t)]
    tune += ["--tune-slices", str(args.tune_slices)] if args.tune_slices else []
    source = test
    if args.input_grid and raw.name.endswith("_raw") and "_wholehead" not in raw.name:
        source = raw  # the raw cohort, through the model's chain: the same slices, and the masks on the input grid
        results = results.with_name(results.name + "_inputgrid")
    # --continue: a rerun after an interruption keeps the cases already evaluated (same model and settings)
    code = cli(["evaluate", "-m", str(model), "-i", str(source), "-o", str(results), "--methods", ",".join(methods),
                "--batch-size", str(args.batch_size), "--continue", *tune, *val_args, *subset])  # fmt: skip
    seconds = time.perf_counter() - start
    evaluated = Evaluated(results, raw, test)
    methods = [m for m in methods if m in evaluated.summary]
    by_kind = kind_table(evaluated, methods, kinds, direction)
    by_size = size_table(evaluated, methods)
    detection = detection_table(evaluated, methods)
    tables = tables_markdown(by_kind, by_size, detection, kinds, evaluated.oracle)
    per_case = pd.read_csv(results / "cases.csv", dtype={"case": str})
    per_case = per_case[per_case["lesion_pixels"] > 0]
    input_grid = {m: {**evaluated.summary[m]["lesion_detection"],
                      "case_dice_3d": float(per_case.loc[per_case["method"] == m, "dice_3d_native"].mean())}
                  for m in methods if "lesion_detection" in evaluated.summary[m]}  # fmt: skip
    oracle_input_grid = None
    if input_grid:
        config = ModelConfig.load(model / "config.json")
        oracle_input_grid = input_grid_oracle(raw, args.layout, list(config.preprocess.map_channels), direction)
        input_grid["oracle threshold (input grid)"] = {**oracle_input_grid["lesion_detection"],
                                                       "case_dice_3d": oracle_input_grid["case_dice_3d"]}  # fmt: skip
        tables += "\n" + lesion_table(input_grid)
    print("\n" + tables)
    outside = {m: int(sum((method_outputs(a, m, evaluated.oracle)[1] & ~a["foreground"]).sum() for _, a in evaluated))
               for m in methods}  # fmt: skip
    cohort_kinds = dict(Counter(case["kind"] for case in load_lesion_metadata(raw).values()))
    return {"methods": methods, "kinds": list(kinds), "cohort_kinds": cohort_kinds, "exit_code": code,
            "seconds": seconds, "summary": evaluated.summary, "summary_md": (results / "summary.md").read_text(),
            "by_kind": by_kind, "by_size": by_size, "detection": detection, "tables_md": tables,
            "input_grid": input_grid, "oracle_input_grid": oracle_input_grid,
            "mask_pixels_outside_brain": outside}  # fmt: skip


def head_comparison(results: dict, runs: dict) -> dict:
    """Whole heads against the same patients skull-stripped: unhealthy DICE per method (and the difference in
    points), mask pixels outside the brain foreground, and per case the slices and crop box each store kept."""
    dice = {head: {m: r["summary"][m]["unhealthy_dice"] for m in r["methods"]} for head, r in results.items()}
    ss, wh = dice["skull-stripped"], dice["whole-head"]
    cases: dict[str, dict] = {}
    for head, (_, store) in runs.items():
        for meta in sorted((store / "cases").glob("*.json")):
            info = json.loads(meta.read_text())
            cases.setdefault(meta.stem, {})[head] = {"slices": [min(info["slices"]), max(info["slices"])],
                                                      "crop_box": info.get("crop_box")}  # fmt: skip
    return {"unhealthy_dice": dice, "dice_difference_points": {m: 100.0 * (wh[m] - ss[m]) for m in ss if m in wh},
            "mask_pixels_outside_brain": {h: r["mask_pixels_outside_brain"] for h, r in results.items()}, "cases": cases}


if __name__ == "__main__":
    main()
