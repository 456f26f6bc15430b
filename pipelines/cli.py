"""The ``anofpdm`` command: one sub-command per user verb, each a thin layer over the library."""

from __future__ import annotations

import argparse
import importlib
import sys

from anofpdm_monai.io import InputError

# verb -> (module under pipelines/, one-line help)
VERBS = {
    "demo": ("demo", "segment and evaluate fresh phantom patients with the bundled model (start here)"),
    "phantom": ("phantom", "write a synthetic cohort (BraTS21 or ATLAS v2.0 layout) with ground truth"),
    "preprocess": ("preprocess", "raw NIfTI cohort -> preprocessed slice store"),
    "train": ("train", "train the classifier-free-guided diffusion model (torchrun for several processes)"),
    "calibrate": ("calibrate", "choose guidance w, health threshold and D on validation slices (image labels only)"),
    "segment": ("segment", "segment patient volumes: NIfTI in, mask + anomaly-map NIfTI out on the input grid"),
    "evaluate": ("evaluate", "evaluate methods on a test cohort: per-slice/per-case tables and Table 1"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anofpdm", description="AnoFPDM brain-MRI anomaly segmentation without pixel labels (MONAI)."
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (module, help_text) in VERBS.items():
        verb_parser = sub.add_parser(verb, help=help_text, description=help_text)
        importlib.import_module(f"pipelines.{module}").add_arguments(verb_parser)
    return parser


def cli_reference() -> str:
    """Markdown of every verb's ``--help`` (docs/cli.md is this text; a test keeps them equal)."""
    import os

    os.environ["COLUMNS"] = "100"
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = [
        "# CLI reference\n",
        "Generated from the parser: `python -c \"from pipelines.cli import cli_reference; print(cli_reference(), end='')\" > docs/cli.md`.\n",
        "```text\n" + parser.format_help() + "```\n",
    ]
    for verb, verb_parser in sub.choices.items():
        parts.append(f"## anofpdm {verb}\n\n```text\n{verb_parser.format_help()}```\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"pipelines.{VERBS[args.verb][0]}")
    try:
        return int(module.run(args) or 0)
    except (InputError, FileNotFoundError, ValueError) as err:
        print(f"anofpdm {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
