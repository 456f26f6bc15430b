"""The cohort report: one self-contained HTML page of an ``evaluate`` results folder.

``RESULTS/report/index.html`` holds the Table-1 summary (methods tuned on pixel labels marked
``†``), a per-case table sortable by column, and for each case the overlays and decision curves of
one method, plus the model's calibration plot. Images are inline PNG data URIs; the page loads
nothing from a network. Everything is read from the results folder (``summary.json``,
``cases.csv``, ``slices.csv``, ``cases/<id>.npz``); the model folder only for the calibration plot.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from anofpdm_monai.bundled import resolve_model_dir
from anofpdm_monai.io import InputError, atomic_write_text, check_case_id, read_json, spacing_volume_mm3
from anofpdm_monai.methods import AnoFPDMMethod, all_methods
from anofpdm_monai.metrics import PIXEL_LABEL_MARKER, SUMMARY_COLUMNS, pixel_label_note
from anofpdm_monai.networks import UNHEALTHY
from anofpdm_monai.provenance import RUN_RECORD
from anofpdm_monai.visualize import curves_png, overlay_png, overlay_slices

REPORT_FOLDER = "report"
PARTIAL = "only a sample of the case's slices was evaluated, so no 3-D DICE"


@dataclass
class CaseRow:
    """One row of the per-case table: a (case, method) pair; volumes in ml, NaN where unknown."""

    case: str
    method: str
    dice_3d: float
    dice_3d_native: float
    lesion_ml: float
    predicted_ml: float
    predicted_unhealthy: float
    true_unhealthy: int
    slices: int
    whole_volume: bool = True


def write_report(results_dir: str | Path, *, model_dir: str | Path | None = None, method: str | None = None) -> Path:
    """Write ``RESULTS/report/index.html`` for an evaluated results folder.

    Args:
        results_dir: a folder ``anofpdm evaluate`` wrote (summary.json, cases.csv, slices.csv, cases/).
        model_dir: the model folder (or ``"bundled"``) whose calibration plot to show; None looks it
            up in ``RESULTS/run.json`` when there is one.
        method: the method whose overlays and curves are shown per case; None takes the first
            AnoFPDM method of the summary (else the first with stored maps).

    Returns:
        The path of ``index.html``.
    """
    results = Path(results_dir)
    summary = load_summary(results)
    cases = read_table(results / "cases.csv", ("case", "method", "dice_3d", "lesion_pixels", "pred_pixels", "slices"))
    slices = read_table(results / "slices.csv", ("case", "method", "label", "pred_label"))
    case_ids = sorted(cases["case"].unique().tolist())
    for case_id in case_ids:
        check_case_id(case_id, results / "cases.csv", "re-run anofpdm evaluate")
    shown = shown_method(summary, results, case_ids, method)
    model = resolve_model_dir(model_dir) if model_dir is not None else recorded_model_dir(results)
    voxel_ml = {c: case_voxel_ml(results / "cases" / f"{c}.npz") for c in case_ids}
    parts = [
        f"<h1>Cohort report: {html.escape(results.resolve().name)}</h1>",
        "<h2>Summary (Table 1)</h2>",
        summary_table(summary),
        "<h2>Cases</h2>",
        case_table(case_rows(cases, slices, voxel_ml)),
        calibration_section(model),
        case_sections(results, case_ids, shown),
    ]
    return atomic_write_text(results / REPORT_FOLDER / "index.html", page("\n".join(parts)))


# ------------------------------------------------------------------------------------ inputs


def load_summary(results: Path) -> dict[str, dict[str, Any]]:
    """``summary.json`` of ``results`` as ``{method: row}``; an InputError when it is missing or malformed."""
    path = results / "summary.json"
    if not path.is_file():
        raise InputError(f"{path}: not found; give the results folder of a finished 'anofpdm evaluate' run")
    summary = read_json(path, "re-run anofpdm evaluate to rewrite it")
    if not isinstance(summary, dict) or not all(isinstance(row, dict) for row in summary.values()):
        raise InputError(f"{path}: not a summary ({{method: row}}); re-run anofpdm evaluate to rewrite it")
    for method, row in summary.items():
        check_summary_row(path, method, row)
    return summary


NUMBER_FIELDS = (*(key for _, key in SUMMARY_COLUMNS), "case_dice_3d", "calls_per_slice", "seconds_per_slice")


def check_summary_row(path: Path, method: str, row: Mapping[str, Any]) -> None:
    """Refuse a hand-edited row whose shown fields have the wrong type (one line naming the method and field)."""
    fix = "re-run anofpdm evaluate to rewrite it, or fix that field"
    for key in NUMBER_FIELDS:
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"{path}: {method}.{key} = {json_repr(value)}: must be a number or null; {fix}")
    undefined = row.get("undefined")
    if undefined is not None and not (isinstance(undefined, dict) and all(isinstance(v, str) for v in undefined.values())):
        raise InputError(f"{path}: {method}.undefined = {json_repr(undefined)}: must map metrics to reasons (text); {fix}")
    if not isinstance(row.get("uses_pixel_labels", False), bool):
        raise InputError(f"{path}: {method}.uses_pixel_labels = {json_repr(row['uses_pixel_labels'])}: must be true or false; {fix}")


def json_repr(value: Any) -> str:
    import json

    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_table(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """A CSV table of the results folder; an InputError naming the file when it is missing or lacks ``columns``."""
    if not path.is_file():
        raise InputError(f"{path}: not found; give the results folder of a finished 'anofpdm evaluate' run")
    try:
        table = pd.read_csv(path, dtype={"case": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable table ({err}); re-run anofpdm evaluate") from None
    missing = sorted(set(columns) - set(table.columns))
    if missing:
        raise InputError(f"{path}: lacks the columns {missing}; re-run anofpdm evaluate with this version")
    return table


def recorded_model_dir(results: Path) -> Path | None:
    """The model folder ``RESULTS/run.json`` records (``{"model": {"path": ...}}``), or None."""
    path = results / RUN_RECORD
    if not path.is_file():
        return None
    record = read_json(path, "delete it or re-run anofpdm evaluate")
    model = record.get("model") if isinstance(record, dict) else None
    folder = model.get("path") if isinstance(model, dict) else None
    return Path(folder) if isinstance(folder, str) and Path(folder).is_dir() else None


def shown_method(summary: Mapping[str, Any], results: Path, case_ids: Sequence[str], method: str | None) -> str | None:
    """The method of the per-case figures: ``method``, or the first AnoFPDM one of the summary, or the first with maps."""
    stored: set[str] = set()
    if case_ids:
        with np.load(results / "cases" / f"{case_ids[0]}.npz") as data:
            stored = {key.split("/")[0] for key in data.files if key.endswith("/maps")}
    if method is not None:
        if method not in stored:
            raise InputError(f"{results}: no maps of method {method!r} stored; choose one of {sorted(stored)}")
        return method
    with_maps = [m for m in summary if m in stored]
    registry = all_methods()
    anofpdm = [m for m in with_maps if isinstance(registry.get(m), AnoFPDMMethod)]
    return (anofpdm or with_maps or [None])[0]


def case_voxel_ml(path: Path) -> float:
    """Volume in ml of one voxel of a case's stacked slices (NaN when its file does not record ``voxel_mm``)."""
    with np.load(path) as data:
        return spacing_volume_mm3(data["voxel_mm"]) / 1000.0 if "voxel_mm" in data.files else math.nan


def case_rows(cases: pd.DataFrame, slices: pd.DataFrame, voxel_ml: Mapping[str, float]) -> list[CaseRow]:
    """The per-case table: ``cases.csv`` joined with the health decisions counted in ``slices.csv``."""
    decided = slices.assign(
        true_unhealthy=slices["label"] == UNHEALTHY,
        predicted_unhealthy=(slices["pred_label"] == UNHEALTHY).where(slices["pred_label"].notna()),
    ).groupby(["case", "method"])
    true_counts = decided["true_unhealthy"].sum()
    predicted = decided["predicted_unhealthy"].agg(lambda v: v.sum() if v.notna().all() else math.nan)
    rows = []
    for r in cases.itertuples(index=False):
        key, ml = (r.case, r.method), voxel_ml.get(r.case, math.nan)
        rows.append(CaseRow(
            case=r.case, method=r.method, dice_3d=float(r.dice_3d),
            dice_3d_native=float(getattr(r, "dice_3d_native", math.nan)),
            lesion_ml=r.lesion_pixels * ml, predicted_ml=r.pred_pixels * ml,
            predicted_unhealthy=float(predicted.get(key, math.nan)), true_unhealthy=int(true_counts.get(key, 0)),
            slices=int(r.slices), whole_volume=bool(getattr(r, "whole_volume", True)),
        ))  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------ HTML


def number(value: Any, spec: str, scale: float = 1.0) -> tuple[str, str]:
    """``(shown text, sort key)`` of a value; ``–`` and an empty key when it is missing or not finite."""
    if value is None or isinstance(value, str) or not math.isfinite(float(value)):
        return "–", ""
    return format(float(value) * scale, spec), repr(float(value))


def cell(value: Any, spec: str, scale: float = 1.0, why: str | None = None) -> str:
    text, key = number(value, spec, scale)
    title = f' title="{html.escape(why)}"' if why and not key else ""
    return f'<td data-v="{key}"{title}>{text}</td>'


def summary_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """Table 1 (percent, one decimal) with the † methods marked and their footnote; '–' cells say why on hover."""
    head = ["method", *(title for title, _ in SUMMARY_COLUMNS), "3-D DICE / case", "calls/slice", "s/slice"]
    lines = ['<table class="sortable"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for method, row in summary.items():
        why = row.get("undefined") if isinstance(row.get("undefined"), dict) else {}
        mark = f" {PIXEL_LABEL_MARKER}" if row.get("uses_pixel_labels") else ""
        cells = [f'<td data-v="{html.escape(method)}">{html.escape(method)}{mark}</td>']
        cells += [cell(row.get(key), ".1f", 100.0, why.get(key)) for _, key in SUMMARY_COLUMNS]
        cells += [cell(row.get("case_dice_3d"), ".1f", 100.0), cell(row.get("calls_per_slice"), ".1f"), cell(row.get("seconds_per_slice"), ".3f")]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</tbody></table>")
    note = pixel_label_note(summary)
    if note:
        lines.append(f'<p class="note">{html.escape(note)}</p>')
    lines.append('<p class="note">Percent. "–": undefined for these slices (hover for the reason). Click a column to sort.</p>')
    return "\n".join(lines)


def case_table(rows: Sequence[CaseRow]) -> str:
    """The per-case table, one row per (case, method), sortable by column."""
    native = any(math.isfinite(r.dice_3d_native) for r in rows)
    head = ["case", "method", "3-D DICE"] + (["3-D DICE, input grid"] if native else []) + [
        "lesion ml", "predicted ml", "predicted unhealthy slices", "true unhealthy slices", "slices"]  # fmt: skip
    lines = ['<table class="sortable" id="cases"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        name = html.escape(r.case)
        cells = [f'<td data-v="{name}"><a href="#case-{name}">{name}</a></td>', f'<td data-v="{html.escape(r.method)}">{html.escape(r.method)}</td>']
        cells.append(cell(r.dice_3d, ".1f", 100.0, None if r.whole_volume else PARTIAL))
        if native:
            cells.append(cell(r.dice_3d_native, ".1f", 100.0))
        cells += [cell(r.lesion_ml, ".2f"), cell(r.predicted_ml, ".2f"), cell(r.predicted_unhealthy, ".0f", why="no slice-level health decision"),
                  cell(r.true_unhealthy, ".0f"), cell(r.slices, ".0f")]  # fmt: skip
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</tbody></table>")
    lines.append('<p class="note">3-D DICE in percent of the mixed-setup masks (\"–\": hover for why); volumes in ml '
                 "of the evaluated slices on the model's slice grid (\"–\": the results do not record the voxel size); "
                 "a slice is truly unhealthy when it holds lesion pixels.</p>")  # fmt: skip
    return "\n".join(lines)


def image(png: bytes, alt: str) -> str:
    """An ``<img>`` of inline PNG bytes (a data URI: the page needs no other file)."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def calibration_section(model: Path | None) -> str:
    """The model's calibration plot(s), ``calibration*.png`` of the model folder, or why there is none."""
    lines = ["<h2>Calibration</h2>"]
    plots = sorted(model.glob("calibration*.png")) if model is not None and model.is_dir() else []
    if model is None:
        lines.append("<p>The results folder does not record its model folder, so the calibration plot is not shown; "
                     "run <code>anofpdm report RESULTS -m MODEL</code> to include it.</p>")  # fmt: skip
    elif not plots:
        lines.append(f"<p>No calibration plot (calibration*.png) in {html.escape(str(model))}.</p>")
    for plot in plots:
        lines.append(f"<figure>{image(plot.read_bytes(), plot.name)}<figcaption>{html.escape(plot.name)} of "
                     f"{html.escape(str(model))}</figcaption></figure>")  # fmt: skip
    return "\n".join(lines)


def case_sections(results: Path, case_ids: Sequence[str], method: str | None) -> str:
    """Per case: the overlay of ``method`` and its health-score and d(t) curves."""
    if method is None:
        return "<h2>Per case</h2>\n<p>No method with stored maps in these results: no overlays.</p>"
    lines = [f"<h2>Per case: {html.escape(method)}</h2>",
             '<p class="note">Each overlay shows the slices of the largest predicted and true lesions first: image '
             "above, anomaly map below; prediction (mixed setup) in red, ground truth in cyan; L / R is the patient's "
             "left / right. The curves: the health score per slice (slices above the dashed line are predicted "
             "unhealthy; red bands are truly unhealthy slices) and d(t) of the overlay's slices with their "
             "end step t_e (dotted).</p>"]  # fmt: skip
    for case_id in case_ids:
        lines.append(f'<section id="case-{html.escape(case_id)}"><h3>{html.escape(case_id)}</h3>')
        lines += case_figures(results / "cases" / f"{case_id}.npz", case_id, method)
        lines.append("</section>")
    return "\n".join(lines)


def case_figures(path: Path, case_id: str, method: str) -> list[str]:
    """The ``<img>`` tags of one case: overlay, then curves (or a line saying what is not stored)."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if "/" not in k or k.startswith(f"{method}/")}
    if f"{method}/maps" not in arrays:
        return [f"<p>No maps of {html.escape(method)} stored for this case.</p>"]
    truth = torch.from_numpy(arrays["truth"])
    maps = torch.from_numpy(arrays[f"{method}/maps"]).float()
    masks = torch.from_numpy(arrays.get(f"{method}/mixed_masks", arrays[f"{method}/masks"]))
    z = arrays["slice_indices"]
    shown = overlay_slices(maps, masks, 4, truth).tolist()
    out = [image(overlay_png(torch.from_numpy(arrays["intensity"]), maps, masks, truth=truth, slice_indices=z.tolist(),
                             title=f"{case_id}: {method}"), f"overlay of {case_id}")]  # fmt: skip
    if f"{method}/health" in arrays and f"{method}/divergence" in arrays:
        png = curves_png(
            arrays[f"{method}/health"], float(arrays[f"{method}/health_threshold"]), z, arrays["truth"].reshape(len(z), -1).any(1),
            arrays[f"{method}/timesteps"], arrays[f"{method}/divergence"], arrays[f"{method}/t_e"], shown,
            title=f"{case_id}: {method}",
        )  # fmt: skip
        out.append(image(png, f"health score and d(t) of {case_id}"))
    else:
        out.append("<p>The curves of this method are not stored in these results (made by an older version or a baseline).</p>")
    return out


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1250px; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
th { background: #e8eef6; cursor: pointer; user-select: none; }
th.asc::after { content: " \\25B2"; } th.desc::after { content: " \\25BC"; }
tbody tr:nth-child(even) { background: #f6f6f6; }
.note { font-size: 12px; color: #555; }
img { max-width: 100%; display: block; margin: 0.3em 0; }
section { border-top: 1px solid #ddd; margin-top: 1em; }
"""

SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], up = !th.classList.contains("asc");
    th.parentNode.querySelectorAll("th").forEach(function (h) { h.classList.remove("asc", "desc"); });
    th.classList.add(up ? "asc" : "desc");
    var rows = Array.from(body.rows), key = function (r) { return r.cells[col].dataset.v; };
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === "" || y === "") { return (x === "") - (y === ""); }  // missing values last
      var d = isNaN(x) || isNaN(y) ? x.localeCompare(y) : x - y;
      return up ? d : -d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
window.addEventListener("load", function () {  // for tests and readers: images that failed to load
  var broken = Array.from(document.images).filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  document.documentElement.dataset.brokenImages = broken.length;
});
"""


def page(body: str) -> str:
    """The whole HTML document around ``body``: inline style and script, nothing fetched."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>anofpdm cohort report</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n<script>{SCRIPT}</script></body></html>\n")  # fmt: skip
