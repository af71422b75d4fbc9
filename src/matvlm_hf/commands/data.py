"""`matvlm data`: write the synthetic visual-QA data set (the world: `synthetic/synthetic_vqa.py`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..synthetic import synthetic_vqa


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matvlm data", description=synthetic_vqa.__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (train.json, test.json, images/); required")
    parser.add_argument("--n-train", type=int, default=10000, help="training images (default: 10000)")
    parser.add_argument("--n-test", type=int, default=1000, help="held-out images (default: 1000)")
    parser.add_argument("--image-size", type=int, default=64, help="image side, pixels (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--question-types",
        default=None,
        help=f"comma-separated subset of {','.join(synthetic_vqa.QUESTION_TYPES)} (default: all)",
    )
    parser.add_argument(
        "--questions-per-image", type=int, default=1, help="questions asked about each image (default: 1)"
    )
    parser.add_argument(
        "--contact-sheet",
        default=None,
        help="also save a PNG grid of the first 16 training images to this file (default: none)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder (built beside it, swapped in at the end) (default: off)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Parse `argv`, write the data set (`synthetic_vqa.write_dataset`), print and return its paths."""
    args = build_parser().parse_args(argv)
    return synthetic_vqa.write_dataset(
        args.out,
        overwrite=args.overwrite,
        contact_sheet=args.contact_sheet,
        n_train=args.n_train,
        n_test=args.n_test,
        image_size=args.image_size,
        seed=args.seed,
        question_types=args.question_types.split(",") if args.question_types else None,
        questions_per_image=args.questions_per_image,
    )


if __name__ == "__main__":
    main()
