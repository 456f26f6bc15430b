"""``anofpdm phantom``: write a synthetic cohort with ground truth in a real dataset's layout."""

from __future__ import annotations

import argparse

from anofpdm_monai.logs import get_logger
from data_prep.phantom import LESION_KINDS, generate_cohort


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, help="cohort folder to write")
    parser.add_argument("--layout", choices=["brats", "atlas"], default="brats", help="folder layout and channels of the cohort")
    parser.add_argument("--cases", type=int, default=10, help="patients to generate")
    parser.add_argument("--healthy-fraction", type=float, default=0.2, help="fraction of patients without a lesion")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole cohort (same seed, same files)")
    parser.add_argument("--workers", type=int, default=1, help="patients generated in parallel (processes)")
    parser.add_argument(
        "--lesions",
        default=None,
        help="comma list of lesion kinds; each lesion case draws one uniformly. brats: "
        f"{','.join(LESION_KINDS['brats'])} (default: all three); atlas: {','.join(LESION_KINDS['atlas'])} "
        "(default: stroke)",
    )


def run(args: argparse.Namespace) -> int:
    ids = generate_cohort(
        args.output, args.layout, args.cases, args.healthy_fraction, args.seed, args.workers, lesions=args.lesions
    )
    get_logger().info(f"wrote {len(ids)} {args.layout} cases to {args.output} (lesion kinds: ROOT/phantom_lesions.json)")
    return 0
