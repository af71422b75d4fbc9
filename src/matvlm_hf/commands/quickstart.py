"""`matvlm quickstart`: the whole MaTVLM recipe on a CPU, from nothing (the work: `synthetic/quickstart.py`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..synthetic import quickstart


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matvlm quickstart",
        description=quickstart.__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=quickstart.__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--workdir",
        default="matvlm-quickstart",
        help="folder for data, checkpoints and the summary (default: matvlm-quickstart)",
    )
    parser.add_argument(
        "--teacher",
        default=None,
        help="TinyLLaVA checkpoint folder (or Hub id) to start from (default: train one from scratch)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of data, teacher and hybrid (default: 0)")
    parser.add_argument(
        "--fast", action="store_true", help="CI scale: tiny data and a few steps, accuracies meaningless (default: off)"
    )
    parser.add_argument(
        "--teacher-steps",
        type=int,
        default=None,
        help="optimizer steps of the teacher's training (default: 700; 20 with --fast)",
    )
    parser.add_argument(
        "--distill-steps",
        type=int,
        default=None,
        help="optimizer steps of the distillation (default: 150; 8 with --fast)",
    )
    parser.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="training images, one conversation each (default: 6000; 128 with --fast)",
    )
    parser.add_argument(
        "--n-test", type=int, default=None, help="held-out images, one question each (default: 400; 40 with --fast)"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv` and run the quickstart (`synthetic.quickstart.run`); returns its results."""
    args = build_parser().parse_args(argv)
    from ..extras import require

    require("matplotlib", "matvlm quickstart's summary plot")
    return quickstart.run(
        args.workdir,
        teacher=args.teacher,
        seed=args.seed,
        fast=args.fast,
        teacher_steps=args.teacher_steps,
        distill_steps=args.distill_steps,
        n_train=args.n_train,
        n_test=args.n_test,
    )


if __name__ == "__main__":
    main()
