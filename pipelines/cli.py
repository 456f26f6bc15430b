"""The ``anofpdm`` command: one sub-command per user verb, each a thin layer over the library."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Collection, Iterator, Sequence

from anofpdm_monai import __version__

# The library (torch, MONAI) is imported only by the verb that runs: `anofpdm --help` imports neither, and a
# verb's flags come from its own module alone (tests/test_cli.py counts what `--help` and `phantom` import).
# verb -> (module under pipelines/, one-line help)
VERBS = {
    "demo": ("demo", "segment and evaluate fresh phantom patients with the bundled model (start here)"),
    "phantom": ("phantom", "write a synthetic cohort (BraTS21 or ATLAS v2.0 layout) with ground truth"),
    "preprocess": ("preprocess", "raw NIfTI cohort -> preprocessed slice store"),
    "train": ("train", "train the classifier-free-guided diffusion model (torchrun for several processes)"),
    "calibrate": ("calibrate", "choose guidance w, health threshold and D on validation slices (image labels only)"),
    "segment": ("segment", "segment patient volumes: NIfTI in, mask + anomaly-map NIfTI out on the input grid"),
    "evaluate": ("evaluate", "evaluate methods on a test cohort: per-slice/per-case tables and Table 1"),
    "export-bundle": ("export_bundle", "write a model folder as a MONAI bundle (python -m monai.bundle run segments with it)"),
    "report": ("report", "write the cohort report of an evaluate results folder: RESULTS/report/index.html"),
    "score": ("score", "score saved masks against label files: DICE, HD95, lesion-wise detection, volumes (nnU-Net evaluate_folder)"),
}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except where it says nothing (None, an off switch) or the help gives it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser(verbs: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``anofpdm`` parser; only the verbs in ``verbs`` (default: all) get their flags (importing their modules)."""
    parser = argparse.ArgumentParser(
        prog="anofpdm", description="AnoFPDM brain-MRI anomaly segmentation without pixel labels (MONAI).",
        formatter_class=DefaultsHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"anofpdm {__version__}", help="print the version and exit")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (module, help_text) in VERBS.items():
        verb_parser = sub.add_parser(verb, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter)
        if verbs is None or verb in verbs:
            importlib.import_module(f"pipelines.{module}").add_arguments(verb_parser)
    return parser


def verb_in(argv: Sequence[str]) -> list[str]:
    """The verb ``argv`` names (the first word that is one), as a list of none or one."""
    return [word for word in argv if word in VERBS][:1]


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


@contextlib.contextmanager
def restored_environment(*names: str) -> Iterator[None]:
    """Undo what a verb sets in ``os.environ`` for its children (e.g. ``--max-voxels``) once it returns."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def restored_threads() -> Iterator[None]:
    """Give torch its thread count back once the verb returns (``main`` may run several verbs in one process)."""
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    args = build_parser(verb_in(sys.argv[1:] if argv is None else argv)).parse_args(argv)
    from anofpdm_monai.io import MAX_VOXELS_ENV, InputError, set_max_voxels
    from anofpdm_monai.logs import verb_logging
    from anofpdm_monai.outputs import release_locks
    from anofpdm_monai.provenance import command_line
    from anofpdm_monai.threads import configure_threads
    from pipelines.options import cli_message

    args.command_line = command_line(argv)  # for the run record (run.json); not a flag
    module = importlib.import_module(f"pipelines.{VERBS[args.verb][0]}")
    with verb_logging(args.verb) as logger:  # console + the log file a verb adds; warnings routed in, once each
        try:
            with restored_environment(MAX_VOXELS_ENV), restored_threads():
                set_max_voxels(getattr(args, "max_voxels", None))
                if hasattr(args, "threads"):  # the inference verbs: threads from the usable CPUs, or --threads
                    configure_threads(args.threads)
                return int(module.run(args) or 0)
        except (InputError, FileNotFoundError, ValueError) as err:
            logger.error(cli_message(err, module.add_arguments))  # one line: "anofpdm VERB: error: ...", flags named as flags
            return 2
        except KeyboardInterrupt:  # every file is written atomically: what is under a final name is whole
            logger.error("interrupted (Ctrl-C); files already written are whole, finished cases are kept "
                         "(rerun with --continue or --resume where the verb has it)")  # fmt: skip
            return 130
        finally:
            release_locks()


if __name__ == "__main__":
    sys.exit(main())
