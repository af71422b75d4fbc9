"""`matvlm bench`: decode speed, prefill time, peak memory and largest batch, teacher vs hybrids (the measurements:
`synthetic/benchmark.py`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..synthetic import benchmark
from ..synthetic.benchmark import MODELS, PARTS, SIZES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matvlm bench", description=benchmark.__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        choices=list(SIZES),
        default="full",
        help="model sizes: full (TinyLLaVA-3.1B, GPU) | tiny (CPU smoke run) (default: full)",
    )
    parser.add_argument(
        "--out", default="docs/benchmarks", help="folder for benchmark.json and the plots (default: docs/benchmarks)"
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated models to time (default: all: {','.join(MODELS)})"
    )
    parser.add_argument(
        "--plot-only", action="store_true", help="only redraw the plots from OUT/benchmark.json (default: off)"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add to OUT/benchmark.json instead of replacing it; same device (default: off)",
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated measurements (default: all: {','.join(PARTS)})"
    )
    parser.add_argument(
        "--batches", default=None, help="comma-separated batch sizes of the decode points (default: the size's list)"
    )
    parser.add_argument(
        "--contexts",
        default=None,
        help="comma-separated context lengths of the decode points, tokens (default: the size's list)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv`, run the benchmark (`synthetic.benchmark.run`) or only redraw its plots; returns the results."""
    import torch

    from ..extras import require
    from ..safe_output import check_output

    parser = build_parser()
    args = parser.parse_args(argv)
    require("matplotlib", "matvlm bench's plots")
    out = Path(args.out)
    check_output(out, option="--out")
    if args.plot_only:
        results = json.loads((out / "benchmark.json").read_text())
        benchmark.plot(results, out)
        return results
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size == "full" and device != "cuda":
        parser.error("--size full needs a CUDA GPU; use --size tiny on a CPU")
    models = {m: MODELS[m] for m in args.models.split(",")}
    knobs = {
        name: [int(x) for x in value.split(",")]
        for name, value in (("batches", args.batches), ("contexts", args.contexts))
        if value
    }
    results = benchmark.run(
        args.size, out, device, models, append=args.append, parts=tuple(args.parts.split(",")), **knobs
    )
    summary = {
        name: {"largest_batch": r.get("largest_batch", {}).get("batch"), "compiled": r["compiled"]}
        for name, r in results["models"].items()
    }
    print(json.dumps(summary, indent=1)[:4000])
    return results


if __name__ == "__main__":
    main()
