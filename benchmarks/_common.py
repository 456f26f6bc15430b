"""Helpers shared by the benchmark scripts: machine description, JSON output, table printing."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import torch


def machine() -> dict:
    """The machine a figure was measured on."""
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        info["cpu"] = model
    except (OSError, StopIteration):
        pass
    return info


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite({"machine": machine(), **payload}), indent=2, default=float, allow_nan=False)
    path.write_text(text + "\n")
    print(f"wrote {path}")


def _finite(value):
    """``value`` with every NaN or infinite float (numpy ones too) replaced by None, so the file is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def markdown_table(rows: dict[str, dict], columns: list[str], first: str = "method", headers: dict | None = None
                   ) -> str:  # fmt: skip
    """A markdown table with a row per key of ``rows`` and a column per entry of ``columns``.

    ``rows`` maps a row name to ``{column: value}`` (missing: blank); ``headers`` renames columns
    in the header line. Floats are printed with 3 decimals, NaN as ``n/a``.
    """
    headers = headers or {}
    lines = ["| " + " | ".join([first, *(headers.get(c, c) for c in columns)]) + " |",
             "|" + "---|" * (len(columns) + 1)]  # fmt: skip
    for name, row in rows.items():
        lines.append("| " + " | ".join([name, *(_cell(row.get(c)) for c in columns)]) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
