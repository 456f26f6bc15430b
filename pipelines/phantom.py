"""``anofpdm phantom``: write a synthetic cohort with ground truth in a real dataset's layout."""

from __future__ import annotations

import argparse

from anofpdm_monai.logs import get_logger
from data_prep.phantom import LESION_KINDS, WHOLE_HEAD_DEFAULT, generate_cohort


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
    head = parser.add_mutually_exclusive_group()
    head.add_argument("--whole-head", dest="whole_head", action="store_true", default=None,
                      help="draw the head around the brain: CSF rim, skull, scalp, Rician noise in the air (default for atlas, "
                           "as ATLAS v2.0 ships)")  # fmt: skip
    head.add_argument("--skull-stripped", dest="whole_head", action="store_false",
                      help="the brain alone on a zero background (default for brats, as BraTS ships)")


def run(args: argparse.Namespace) -> int:
    ids = generate_cohort(
        args.output, args.layout, args.cases, args.healthy_fraction, args.seed, args.workers, lesions=args.lesions,
        whole_head=args.whole_head,
    )
    head = WHOLE_HEAD_DEFAULT[args.layout] if args.whole_head is None else args.whole_head
    get_logger().info(f"wrote {len(ids)} {args.layout} cases ({'whole heads' if head else 'skull-stripped'}) to {args.output} "
                      "(lesion kinds: ROOT/phantom_lesions.json)")  # fmt: skip
    return 0
