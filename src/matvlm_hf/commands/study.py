"""`matvlm study`: the MaTVLM study on the synthetic visual-QA world (the stages: `synthetic/study.py`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..synthetic import study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matvlm study",
        description=study.__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=study.__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "stage",
        choices=("all", "teacher", "variant", "variants", "report"),
        help="what to run: all | teacher | variant (one) | variants (several) | report",
    )
    parser.add_argument(
        "--docs",
        default="docs/study",
        help="report: folder for results.md, study.png, study.json (default: docs/study)",
    )
    parser.add_argument(
        "--note", default="", help="report: a paragraph put under the title, e.g. scale and caveats (default: none)"
    )
    parser.add_argument("--workdir", required=True, help="folder for data, checkpoints and results; required")
    parser.add_argument("--name", help="variant: one of VARIANTS, or a new name with --ratio etc. (default: none)")
    parser.add_argument("--only", nargs="*", help="variants: run only these names (default: every VARIANTS entry)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="variants: processes run at once, one variant each; one GPU holds several (default: 1)",
    )
    _add_variant_options(parser)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="knob overrides, e.g. device=cpu (see STUDY; default: none)",
    )
    return parser


def _add_variant_options(parser: argparse.ArgumentParser) -> None:
    """`variant`'s conversion and distillation choices (each defaults to the named variant's)."""
    parser.add_argument(
        "--ratio",
        type=float,
        help="variant: fraction of decoder layers turned into Mamba-2 (default: the named variant's)",
    )
    parser.add_argument(
        "--placement",
        choices=("even", "start", "middle", "end"),
        help="variant: where the Mamba layers go (default: the named variant's)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        help="variant: exactly these Mamba layer indices, instead of --ratio / --placement (default: none)",
    )
    parser.add_argument(
        "--init",
        choices=("attention", "random"),
        help="variant: mixer initialisation from attention (paper) or random (default: the named variant's)",
    )
    parser.add_argument(
        "--loss", choices=tuple(study.LOSSES), help="variant: which distillation losses (default: the named variant's)"
    )


def main(argv: list[str] | None = None) -> str | None:
    """Parse `argv` and run its stage; returns the report's text (results.md) when the stage wrote one."""
    args = build_parser().parse_args(argv)
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    from ..extras import require
    from ..safe_output import check_output, claim_workdir

    if args.stage in ("all", "report"):
        require("matplotlib", "matvlm study's report")
    if args.stage == "report":
        work = Path(args.workdir)
        check_output(args.docs, [("--workdir", work)], option="--docs")
    else:
        work = claim_workdir(args.workdir)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    set_seed(args.seed)
    if args.stage in ("teacher", "all"):
        study.train_teacher_stage(work, {**study.STUDY, **study.parse_sets(args.set)}, args.seed)
    if args.stage in ("variant", "variants", "all"):
        _variants(args, work)
    if args.stage in ("report", "all"):
        text = study.report_stage(work, Path(args.docs), args.note)
        print(text)
        return text
    return None


def _variants(args: argparse.Namespace, work: Path) -> None:
    """`variant` (one, by name and options) or `variants` (--only, or all of VARIANTS; --jobs at a time)."""
    knobs = study.load_knobs(work, study.parse_sets(args.set))
    if args.stage == "variant":
        ratio, placement, init, loss = study.VARIANTS.get(args.name, (0.25, "even", "attention", "layer+prob"))
        study.variant_stage(
            work,
            knobs,
            args.name,
            args.ratio if args.ratio is not None else ratio,
            args.placement or placement,
            args.init or init,
            args.loss or loss,
            args.seed,
            args.layers,
        )
    elif args.jobs > 1:
        study.run_parallel(work, args.only or list(study.VARIANTS), args.set, args.seed, args.jobs)
    else:
        for name in args.only or study.VARIANTS:
            study.variant_stage(work, knobs, name, *study.VARIANTS[name], args.seed)


if __name__ == "__main__":
    main()
