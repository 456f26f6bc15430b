"""Command-line options shared by several verbs (each verb module imports from here, never from another verb)."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anofpdm_monai.config import BRAIN_MASK_MODES
from anofpdm_monai.io import DEFAULT_MAX_VOXELS, MAX_VOXELS_ENV, InputError
from anofpdm_monai.networks import PRECISIONS
from anofpdm_monai.provenance import run_record


def add_max_voxels_argument(parser: argparse.ArgumentParser) -> None:
    """``--max-voxels``: the largest volume a NIfTI header may claim before any voxel is read."""
    parser.add_argument(
        "--max-voxels", type=int, default=None, metavar="N",
        help=f"refuse volumes whose header claims more voxels than this, before reading them "
             f"(default {DEFAULT_MAX_VOXELS} = 2 GiB as float32, or ${MAX_VOXELS_ENV})",
    )  # fmt: skip


def add_batch_size_argument(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``: slices per forward process; None (the default) lets the loaded model choose for its device
    (:meth:`anofpdm_monai.model.AnoFPDMModel.default_batch_size`)."""
    from anofpdm_monai.model import DEFAULT_BATCH_SIZE

    parser.add_argument("--batch-size", type=int, default=None, help=f"slices per forward process (2 x this per network call); "
                        f"bounds memory (default: {DEFAULT_BATCH_SIZE} on a CPU; on a GPU as many as fit in half its free memory)")


def add_brain_mask_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--brain-mask``: how the chain finds the brain (docs/data.md); ``default`` says what None means for the verb."""
    parser.add_argument(
        "--brain-mask", default=None, choices=BRAIN_MASK_MODES,
        help=f"nonzero (skull-stripped input), template (the MNI152 brain mask fitted by affine registration: whole "
             f"heads such as ATLAS v2.0) or files (CASE_brainmask.nii.gz beside the channels, or a manifest brain_mask "
             f"column); {default}",
    )  # fmt: skip


def add_parts_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """``--num-parts``, ``--part-id``, ``--parts-from`` of a cohort verb (``segment``, ``evaluate``): which part of the
    cohort this process runs (:func:`anofpdm_monai.distributed.resolve_parts`)."""
    from anofpdm_monai.distributed import PARTS_FROM

    parser.add_argument("--num-parts", type=int, default=1, help="split the cases into this many parts (nnU-Net style; "
                        "under torchrun each part is split again among the ranks)")  # fmt: skip
    parser.add_argument("--part-id", type=int, default=0, help=f"which part this process {verb}, in [0, --num-parts)")
    parser.add_argument("--parts-from", default="args", choices=PARTS_FROM,
                        help="where the part comes from: args (--num-parts/--part-id), torchrun (one per rank) or slurm "
                             "(one per array task: SLURM_ARRAY_TASK_ID, _COUNT, ...) (docs/cluster.md)")  # fmt: skip


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--precision``, shared by every verb that runs the network for inference."""
    parser.add_argument("--device", default="auto", help="where the network runs: auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="network precision; auto: fp32 or bf16, whichever runs the network faster on this machine "
                        "(timed once, cached in ~/.cache/anofpdm; ANOFPDM_MEASURE=0: bf16 where the device advertises it)")
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="CPU compute threads (default: torch's, capped at the CPUs this process may use: affinity and cgroup quota)",
    )  # fmt: skip


def record_of(verb: str, args: argparse.Namespace, resolved: dict[str, Any] | None = None, model_dir: str | Path | None = None) -> dict:
    """The run record (``run.json``) of ``anofpdm VERB``: every flag's value, overridden by what it ``resolved`` to.

    Args:
        verb: the sub-command.
        args: the parsed flags (``pipelines.cli.main`` adds the command line as ``args.command_line``).
        resolved: settings as the run resolved them, e.g. ``{"precision": "fp32", "device": "cpu"}`` for
            ``--precision auto --device auto``, or the calibrated N and k; they replace the flags' values.
        model_dir: the model folder the run uses (its ``model.pt`` is hashed).
    """
    flags = {k: v for k, v in vars(args).items() if k not in ("verb", "command_line")}
    return run_record(verb, getattr(args, "command_line", None), {**flags, **(resolved or {})}, model_dir)


@functools.cache
def flag_names(add_arguments: Callable[[argparse.ArgumentParser], None]) -> dict[str, str]:
    """Each argument of a verb, by its Python name, and the verb's flag for it (``batch_size`` -> ``--batch-size``).

    Args:
        add_arguments: the verb module's ``add_arguments``; the names are the parser's ``dest``s, the flags their
            longest option string.
    """
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return {action.dest: max(action.option_strings, key=len) for action in parser._actions if action.option_strings}


def cli_message(err: BaseException, add_arguments: Callable[[argparse.ArgumentParser], None]) -> str:
    """``err`` as the CLI prints it: the arguments a library :class:`InputError` names, spelled as the verb's flags."""
    if isinstance(err, InputError):
        return err.renamed(flag_names(add_arguments))
    return str(err)
