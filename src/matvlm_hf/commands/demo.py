"""`matvlm demo`: the whole conversion path on an embedded default (the work: `synthetic/demo.py`)."""

from __future__ import annotations

import argparse

from ..synthetic import demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matvlm demo", description=demo.__doc__.split("\n\n")[0])
    parser.add_argument(
        "--teacher", default=None, help="TinyLLaVA checkpoint folder to convert (default: fabricate a tiny random one)"
    )
    parser.add_argument(
        "--workdir", default="matvlm-demo", help="folder the checkpoints are written to (default: matvlm-demo)"
    )
    parser.add_argument(
        "--mamba-ratio", type=float, default=0.25, help="fraction of decoder layers turned into Mamba-2 (default: 0.25)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=32, help="tokens each model generates for the question (default: 32)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the fabricated weights (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv` and run the demo (`synthetic.demo.run`); returns its answers and speeds per model."""
    args = build_parser().parse_args(argv)
    return demo.run(
        args.workdir, teacher=args.teacher, mamba_ratio=args.mamba_ratio, new_tokens=args.new_tokens, seed=args.seed
    )


if __name__ == "__main__":
    main()
