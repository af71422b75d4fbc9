"""`matvlm convert`: a TinyLLaVA checkpoint -> a MaTVLM hybrid (the library: `convert/conversion.py`).

matvlm convert --input TINYLLAVA_DIR --output OUT_DIR --mamba-ratio 0.25
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..convert import conversion
from ..errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matvlm convert", description=conversion.__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input",
        required=True,
        help="TinyLLaVA checkpoint folder (or Hub repo id); its remote code is never run; required",
    )
    parser.add_argument("--output", required=True, help="output folder for the MaTVLM checkpoint; required")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--mamba-ratio",
        type=float,
        default=None,
        help="fraction of decoder layers turned into Mamba-2; 0 = the teacher repackaged (default: 0)",
    )
    which.add_argument(
        "--mamba-layers",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        default=None,
        help="exactly these Mamba layer indices, comma-separated, e.g. 0,4,8 (default: from --mamba-ratio)",
    )
    parser.add_argument(
        "--placement",
        choices=["even", "start", "middle", "end"],
        default="even",
        help="where --mamba-ratio puts the Mamba layers (default: even, evenly spaced from layer 0)",
    )
    parser.add_argument(
        "--init",
        choices=["attention", "random", "random-layer"],
        default="attention",
        help="initialisation: attention (x <- W_V, B <- W_K, C <- W_Q; the paper's Eq. 6) | random "
        "(fresh mixer) | random-layer (fresh mixer, MLP and norms) (default: attention)",
    )
    parser.add_argument(
        "--preset",
        choices=["matvlm", "paper"],
        default="matvlm",
        help="paper: the authors' bias-free mixers, layer lists (12.5 %% = 0,6,12,18 of 32) and "
        "random-init ablation (--init random = random-layer); matvlm: this project's choices "
        "(default: matvlm)",
    )
    parser.add_argument(
        "--dtype",
        choices=list(conversion.DTYPES),
        default=None,
        help="weight dtype of the output (default: the source's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the fresh mixer parameters (default: 0)")
    parser.add_argument(
        "--max-shard-size",
        type=int,
        default=2 * 1024**3,
        help="largest output shard, bytes (default: 2147483648 = 2 GiB)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output (default: off)")
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        default=None,
        help="also upload the result to this Hub repo (default: no upload)",
    )
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Parse `argv`, convert, print and return the output folder; a user's mistake exits 2 with its message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        out = conversion.convert_tinyllava_to_matvlm(  # through the module: patches of it apply
            args.input,
            args.output,
            mamba_ratio=args.mamba_ratio,
            mamba_layers=args.mamba_layers,
            placement=args.placement,
            init=args.init,
            preset=args.preset,
            dtype=args.dtype,
            seed=args.seed,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
            push_to_hub=args.push_to_hub,
        )
    except UserError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
