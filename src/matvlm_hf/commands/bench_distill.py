"""`matvlm bench-distill`: distillation step time, tokens/s, peak memory and the largest micro-batch (the benchmark:
`synthetic/distill_benchmark.py`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..synthetic import distill_benchmark


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matvlm bench-distill",
        description=distill_benchmark.__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=distill_benchmark.__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--workdir", required=True, help="folder for checkpoints and data, reused when present; required"
    )
    parser.add_argument("--out", required=True, help="results JSON file; required")
    parser.add_argument(
        "--size",
        choices=("full", "tiny"),
        default="full",
        help="model sizes: full (TinyLLaVA-3.1B, GPU) | tiny (CPU smoke run) (default: full)",
    )
    parser.add_argument(
        "--ratio",
        type=float,
        default=0.25,
        help="fraction of the student's decoder layers that are Mamba-2 (default: 0.25)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=1428,
        help="tokens per sample, image tokens included (default: 1428, the authors')",
    )
    parser.add_argument(
        "--batch-size", type=int, default=1, help="samples per forward pass of the timed run (default: 1)"
    )
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of the timed run (default: 30)")
    parser.add_argument(
        "--search-steps", type=int, default=2, help="optimizer steps per try of the largest-batch search (default: 2)"
    )
    parser.add_argument("--no-search", action="store_true", help="skip the largest-micro-batch search (default: off)")
    parser.add_argument(
        "--train-mode",
        default="mamba+connector",
        help="what trains: mamba+connector | mamba | mamba+mlp+connector | all (default: mamba+connector)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv` and run the benchmark (`synthetic.distill_benchmark.benchmark`); returns its results."""
    return distill_benchmark.benchmark(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
